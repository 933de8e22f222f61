/* Logging (see log.h). Lines carry an ISO 8601 UTC timestamp and a level;
 * bytes that a terminal or a log reader would take as commands (object
 * names and server texts are hostile) are written as \xNN. Nothing is lost
 * silently: without a syslog socket the lines stay on stderr, and a log file
 * that cannot be (re)opened says so on stderr. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static struct {
	pthread_mutex_t lock;
	dws_log_level level;
	enum { SINK_STDERR, SINK_SYSLOG, SINK_FILE } sink;
	char *path;          /* SINK_FILE */
	FILE *file;
	atomic_bool reopen;  /* set by a signal handler (SIGHUP) */
} L = {.lock = PTHREAD_MUTEX_INITIALIZER, .level = DWS_LOG_INFO};

static const char *const names[] = {"error", "warn", "info", "debug"};

const char *dws_log_level_name(dws_log_level lv)
{
	return lv >= DWS_LOG_ERROR && lv <= DWS_LOG_DEBUG ? names[lv] : "?";
}

bool dws_log_level_parse(const char *s, dws_log_level *out)
{
	for (int i = DWS_LOG_ERROR; i <= DWS_LOG_DEBUG; i++)
		if (s && !strcmp(s, names[i])) {
			*out = (dws_log_level)i;
			return true;
		}
	return false;
}

void dws_log_set_level(dws_log_level lv) { L.level = lv; }
bool dws_log_enabled(dws_log_level lv) { return lv <= L.level; }

static FILE *open_file(const char *path)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
	FILE *f = fd >= 0 ? fdopen(fd, "a") : NULL;
	if (!f && fd >= 0)
		close(fd);
	if (f)
		setvbuf(f, NULL, _IOLBF, 0);
	return f;
}

int dws_log_to_file(const char *path, dws_error *err)
{
	FILE *f = open_file(path);
	if (!f) { /* by hand: the log calls nothing of the other modules */
		err->code = DWS_EIO;
		snprintf(err->msg, sizeof(err->msg), "log_file %s: %s", path, strerror(errno));
		return DWS_EIO;
	}
	pthread_mutex_lock(&L.lock);
	if (L.file)
		fclose(L.file);
	free(L.path);
	L.path = strdup(path); /* NULL on no memory: then nothing reopens */
	L.file = f;
	L.sink = SINK_FILE;
	pthread_mutex_unlock(&L.lock);
	return DWS_OK;
}

bool dws_log_to_syslog(const char *ident)
{
	struct stat st;
	if (stat("/dev/log", &st) != 0 || !S_ISSOCK(st.st_mode))
		return false; /* no syslog here (a container): stay on stderr */
	openlog(ident, LOG_PID, LOG_DAEMON);
	pthread_mutex_lock(&L.lock);
	if (L.sink != SINK_FILE)
		L.sink = SINK_SYSLOG;
	pthread_mutex_unlock(&L.lock);
	return true;
}

void dws_log_reopen(void) { atomic_store(&L.reopen, true); }

/* Under L.lock: a log file reopened after rotation (SIGHUP). */
static void reopen_locked(void)
{
	if (!atomic_exchange(&L.reopen, false) || L.sink != SINK_FILE || !L.path)
		return;
	FILE *f = open_file(L.path);
	if (!f) {
		fprintf(stderr, "dwsfs: log_file %s: cannot reopen: %s (keeping the old one)\n", L.path, strerror(errno));
		return;
	}
	fclose(L.file);
	L.file = f;
}

static void escape_controls(const char *in, char *out, size_t cap)
{
	size_t o = 0;
	for (const unsigned char *p = (const unsigned char *)in; *p && o + 5 < cap; p++) {
		if (*p < 0x20 || *p == 0x7f)
			o += (size_t)snprintf(out + o, cap - o, "\\x%02x", *p);
		else
			out[o++] = (char)*p;
	}
	out[o] = 0;
}

void dws_log_at(dws_log_level lv, const char *fmt, ...)
{
	if (lv > L.level)
		return;
	char raw[1024], line[4096], when[40];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(raw, sizeof(raw), fmt, ap);
	va_end(ap);
	escape_controls(raw, line, sizeof(line));
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	size_t n = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(when + n, sizeof(when) - n, ".%03ldZ", ts.tv_nsec / 1000000);
	static const int prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
	pthread_mutex_lock(&L.lock);
	reopen_locked();
	if (L.sink == SINK_SYSLOG)
		syslog(prio[lv], "%s", line);
	else
		fprintf(L.sink == SINK_FILE ? L.file : stderr, "dwsfs %s %s %s\n", when, names[lv], line);
	pthread_mutex_unlock(&L.lock);
}

void dws_log(const char *fmt, ...)
{
	if (DWS_LOG_INFO > L.level)
		return;
	char raw[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(raw, sizeof(raw), fmt, ap);
	va_end(ap);
	dws_log_at(DWS_LOG_INFO, "%s", raw);
}
