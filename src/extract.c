/* dwsctl extract: write a step's folder atomically. Files go into a hidden
 * sibling folder that is renamed into place only when everything is written;
 * a failure removes it. */
#include "step.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
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

struct job {
	dws_step *s;
	const dws_progress *pr;
	int *fds;
	size_t nf;
	pthread_mutex_t lock; /* the cursor, progress and the first error */
	size_t file;
	uint64_t off, done, total;
	dws_error err;
};

static void *worker(void *arg)
{
	struct job *j = arg;
	char *buf = dws_xmalloc(EXTRACT_BUF);
	for (;;) {
		pthread_mutex_lock(&j->lock);
		while (j->file < j->nf && j->off >= dws_step_file(j->s, j->file)->size) {
			j->file++;
			j->off = 0;
		}
		if (j->err.code || j->file >= j->nf) {
			pthread_mutex_unlock(&j->lock);
			break;
		}
		size_t fi = j->file;
		uint64_t off = j->off, size = dws_step_file(j->s, fi)->size;
		size_t n = size - off < EXTRACT_BUF ? (size_t)(size - off) : EXTRACT_BUF;
		j->off += n;
		pthread_mutex_unlock(&j->lock);

		dws_error e = {0};
		const char *path = dws_step_file(j->s, fi)->path;
		int64_t got = dws_step_read(j->s, fi, off, buf, n, &e);
		int rc = got < 0 ? (int)got : got != (int64_t)n ? dws_fail(&e, DWS_EIO, "%s: ended early at %llu", path, (unsigned long long)off) : DWS_OK;
		for (size_t w = 0; !rc && w < n;) {
			ssize_t r = pwrite(j->fds[fi], buf + w, n - w, (off_t)(off + w));
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				rc = dws_fail(&e, DWS_EIO, "%s: write: %s", path, strerror(errno));
			else
				w += (size_t)r;
		}
		pthread_mutex_lock(&j->lock);
		if (rc && !j->err.code)
			j->err = e;
		j->done += n;
		if (!rc && j->pr && j->pr->fn)
			j->pr->fn(j->pr->ctx, path, j->done, j->total);
		pthread_mutex_unlock(&j->lock);
	}
	free(buf);
	return NULL;
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
	size_t nf = dws_step_file_count(s);
	struct job j = {.s = s, .pr = pr, .fds = dws_xcalloc(nf ? nf : 1, sizeof(int)), .nf = nf};
	pthread_mutex_init(&j.lock, NULL);
	for (size_t i = 0; i < nf; i++)
		j.fds[i] = -1;
	for (size_t i = 0; i < nf && tfd >= 0 && !rc; i++) {
		const dws_file_info *fi = dws_step_file(s, i);
		j.total += fi->size;
		rc = mkdirs_for(tfd, fi->path, err);
		if (rc)
			break;
		j.fds[i] = openat(tfd, fi->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (j.fds[i] < 0)
			rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", outdir, fi->path, strerror(errno));
	}
	if (!rc && tfd >= 0) {
		/* workers take 1 MiB pieces in file order: one produces while the
		 * other's write is in the kernel */
		long cpus = sysconf(_SC_NPROCESSORS_ONLN);
		unsigned nt = cpus < 2 ? 1 : cpus > 4 ? 4 : (unsigned)cpus;
		pthread_t th[4];
		unsigned started = 0;
		for (unsigned t = 1; t < nt; t++)
			if (pthread_create(&th[started], NULL, worker, &j) == 0)
				started++;
		worker(&j);
		for (unsigned t = 0; t < started; t++)
			pthread_join(th[t], NULL);
		if (j.err.code)
			rc = dws_fail(err, j.err.code, "%s", j.err.msg);
	}
	for (size_t i = 0; i < nf; i++)
		if (j.fds[i] >= 0 && close(j.fds[i]) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: close: %s", dws_step_file(s, i)->path, strerror(errno));
	free(j.fds);
	pthread_mutex_destroy(&j.lock);
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
