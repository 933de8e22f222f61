/* dwsctl extract: write a step's folder atomically. Files go into a hidden
 * sibling folder that is renamed into place only when everything is written;
 * a failure removes it. */
#include "step.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* 1 MiB: larger writes measured slower here (page reclaim of big buffers) */
enum { EXTRACT_BUF = 1 << 20 };

static int mkdirs_for(int dirfd, const char *path, dws_error *err)
{
	char *p = dws_xstrdup(path);
	int rc = DWS_OK;
	for (char *s = strchr(p, '/'); s; s = strchr(s + 1, '/')) {
		*s = 0;
		if (mkdirat(dirfd, p, 0755) != 0 && errno != EEXIST)
			rc = dws_fail(err, DWS_EIO, "%s: cannot create folder: %s", p, strerror(errno));
		*s = '/';
		if (rc)
			break;
	}
	free(p);
	return rc;
}

static int write_all(int fd, const void *buf, size_t n, const char *what,
		     dws_error *err)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return dws_fail(err, DWS_EIO, "%s: write: %s", what, strerror(errno));
		}
		p += w;
		n -= (size_t)w;
	}
	return DWS_OK;
}

static int remove_tree(int dirfd, const char *name)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return unlinkat(dirfd, name, 0);
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -1;
	}
	struct dirent *de;
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			remove_tree(fd, de->d_name);
	closedir(d);
	return unlinkat(dirfd, name, AT_REMOVEDIR);
}

int dws_extract(dws_step *s, const char *outdir, const dws_progress *pr,
		dws_error *err)
{
	struct stat st;
	if (lstat(outdir, &st) == 0) {
		bool empty = false;
		if (S_ISDIR(st.st_mode)) {
			DIR *d = opendir(outdir);
			empty = true;
			struct dirent *de;
			while (d && (de = readdir(d)))
				if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
					empty = false;
			if (d)
				closedir(d);
		}
		if (!empty)
			return dws_fail(err, DWS_EINVAL, "%s: already exists and is not an empty folder", outdir);
	}
	char *o1 = dws_xstrdup(outdir), *o2 = dws_xstrdup(outdir);
	char *parent = dirname(o1), *base = basename(o2);
	char *tmpname = dws_xasprintf(".%s.dwsfs-tmp.%ld", base, (long)getpid());
	int rc = DWS_OK;
	int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pfd < 0) {
		rc = dws_fail(err, DWS_EIO, "%s: cannot open the parent folder: %s", parent, strerror(errno));
		goto done;
	}
	if (mkdirat(pfd, tmpname, 0755) != 0) {
		rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", parent, tmpname, strerror(errno));
		goto done;
	}
	int tfd = openat(pfd, tmpname, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	uint64_t total = 0, done = 0;
	for (size_t i = 0; i < dws_step_file_count(s); i++)
		total += dws_step_file(s, i)->size;
	char *buf = dws_xmalloc(EXTRACT_BUF);
	for (size_t i = 0; i < dws_step_file_count(s) && !rc && tfd >= 0; i++) {
		const dws_file_info *fi = dws_step_file(s, i);
		rc = mkdirs_for(tfd, fi->path, err);
		if (rc)
			break;
		int fd = openat(tfd, fi->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0) {
			rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", outdir, fi->path, strerror(errno));
			break;
		}
		for (uint64_t off = 0; off < fi->size && !rc;) {
			int64_t n = dws_step_read(s, i, off, buf, EXTRACT_BUF, err);
			if (n <= 0) {
				rc = n < 0 ? (int)n : dws_fail(err, DWS_EIO, "%s: ended early at %llu", fi->path, (unsigned long long)off);
				break;
			}
			rc = write_all(fd, buf, (size_t)n, fi->path, err);
			off += (uint64_t)n;
			done += (uint64_t)n;
			if (pr && pr->fn)
				pr->fn(pr->ctx, fi->path, done, total);
		}
		if (close(fd) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: close: %s", fi->path, strerror(errno));
	}
	free(buf);
	if (tfd >= 0)
		close(tfd);
	else if (!rc)
		rc = dws_fail(err, DWS_EIO, "%s/%s: cannot open: %s", parent, tmpname, strerror(errno));
	if (!rc && renameat(pfd, tmpname, pfd, base) != 0)
		rc = dws_fail(err, DWS_EIO, "%s: cannot move the finished folder into place: %s", outdir, strerror(errno));
	if (rc)
		remove_tree(pfd, tmpname);
done:
	if (pfd >= 0)
		close(pfd);
	free(tmpname);
	free(o1);
	free(o2);
	return rc;
}
