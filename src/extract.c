/* dwsctl extract: write a step's folder atomically. Files go into a hidden
 * sibling folder that is renamed into place only when everything is written;
 * a failure removes it. */
#include "step.h"

#include <sys/mman.h>

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

/* A two-stage pipeline over 1 MiB pieces in file order: a producer thread
 * reads and patches, this thread writes. Two writers to one file would only
 * queue on the inode lock; this way the patching overlaps the kernel's copy. */
enum { RING = 4 };

struct piece {
	size_t file;
	uint64_t off;
	size_t n;
	int state; /* 0 free, 1 filled, 2 failed */
	char *buf;
};

/* outdir must not exist, or be an empty folder (renamed over). */
static int check_outdir(const char *outdir, dws_error *err)
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
	return DWS_OK;
}

struct job {
	dws_step *s;
	int *fds;
	size_t nf;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct piece ring[RING];
	bool stop;      /* the writer failed: the producer stops */
	dws_error err;  /* the producer's error */
};

/* The k-th piece in file order, or false past the end. */
static bool next_piece(const dws_step *s, size_t *file, uint64_t *off, size_t *n)
{
	while (*file < dws_step_file_count(s) && *off >= dws_step_file(s, *file)->size) {
		(*file)++;
		*off = 0;
	}
	if (*file >= dws_step_file_count(s))
		return false;
	uint64_t left = dws_step_file(s, *file)->size - *off;
	*n = left < EXTRACT_BUF ? (size_t)left : EXTRACT_BUF;
	return true;
}

static void *producer(void *arg)
{
	struct job *j = arg;
	size_t file = 0, n = 0;
	uint64_t off = 0;
	for (unsigned k = 0; next_piece(j->s, &file, &off, &n); k++) {
		struct piece *p = &j->ring[k % RING];
		pthread_mutex_lock(&j->lock);
		while (p->state != 0 && !j->stop)
			pthread_cond_wait(&j->cond, &j->lock);
		bool stop = j->stop;
		pthread_mutex_unlock(&j->lock);
		if (stop)
			break;
		dws_error e = {0};
		int64_t got = dws_step_read(j->s, file, off, p->buf, n, &e);
		pthread_mutex_lock(&j->lock);
		p->file = file;
		p->off = off;
		p->n = n;
		if (got != (int64_t)n) {
			if (got >= 0)
				dws_fail(&e, DWS_EIO, "%s: ended early at %llu", dws_step_file(j->s, file)->path, (unsigned long long)off);
			j->err = e;
			p->state = 2;
		} else {
			p->state = 1;
		}
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		if (got != (int64_t)n)
			break;
		off += n;
	}
	return NULL;
}

/* The writer: takes the pieces in order. */
static int write_pieces(struct job *j, const dws_progress *pr, uint64_t total, dws_error *err)
{
	size_t file = 0, n = 0;
	uint64_t off = 0, done = 0;
	int rc = DWS_OK;
	for (unsigned k = 0; !rc && next_piece(j->s, &file, &off, &n); k++, off += n) {
		struct piece *p = &j->ring[k % RING];
		pthread_mutex_lock(&j->lock);
		while (p->state == 0)
			pthread_cond_wait(&j->cond, &j->lock);
		int state = p->state;
		pthread_mutex_unlock(&j->lock);
		if (state == 2)
			return dws_fail(err, j->err.code, "%s", j->err.msg);
		const char *path = dws_step_file(j->s, p->file)->path;
		for (size_t w = 0; !rc && w < p->n;) {
			ssize_t r = pwrite(j->fds[p->file], p->buf + w, p->n - w, (off_t)(p->off + w));
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				rc = dws_fail(err, DWS_EIO, "%s: write: %s", path, strerror(errno));
			else
				w += (size_t)r;
		}
		done += p->n;
		if (!rc && pr && pr->fn)
			pr->fn(pr->ctx, path, done, total);
		pthread_mutex_lock(&j->lock);
		p->state = 0;
		j->stop = rc != DWS_OK;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
	}
	return rc;
}

int dws_extract(dws_step *s, const char *outdir, const dws_progress *pr,
		dws_error *err)
{
	int crc = check_outdir(outdir, err);
	if (crc)
		return crc;
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
	struct job j = {.s = s, .fds = dws_xcalloc(nf ? nf : 1, sizeof(int)), .nf = nf};
	uint64_t total = 0;
	pthread_mutex_init(&j.lock, NULL);
	pthread_cond_init(&j.cond, NULL);
	for (size_t i = 0; i < nf; i++)
		j.fds[i] = -1;
	for (size_t i = 0; i < nf && tfd >= 0 && !rc; i++) {
		const dws_file_info *fi = dws_step_file(s, i);
		total += fi->size;
		rc = mkdirs_for(tfd, fi->path, err);
		if (rc)
			break;
		j.fds[i] = openat(tfd, fi->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (j.fds[i] < 0)
			rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", outdir, fi->path, strerror(errno));
	}
	if (!rc && tfd >= 0) {
		for (int k = 0; k < RING; k++)
			j.ring[k].buf = dws_xmalloc(EXTRACT_BUF);
		pthread_t th;
		if (pthread_create(&th, NULL, producer, &j) != 0) {
			rc = dws_fail(err, DWS_EIO, "%s: cannot start a thread", outdir);
		} else {
			rc = write_pieces(&j, pr, total, err);
			pthread_mutex_lock(&j.lock);
			j.stop = true;
			pthread_cond_broadcast(&j.cond);
			pthread_mutex_unlock(&j.lock);
			pthread_join(th, NULL);
		}
		for (int k = 0; k < RING; k++)
			free(j.ring[k].buf);
	}
	for (size_t i = 0; i < nf; i++)
		if (j.fds[i] >= 0 && close(j.fds[i]) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: close: %s", dws_step_file(s, i)->path, strerror(errno));
	free(j.fds);
	pthread_cond_destroy(&j.cond);
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

/* ---- overlapped extract ---- */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct ofile {
	int fd;
	uint64_t size;
	bool *copied;   /* per extent: its bytes are in the file already */
	char *map;
};

struct overlap {
	dws_step *first;     /* the anchor step: sources, no patches */
	struct ofile *of;
	size_t nf;
	dws_step *final;
	pthread_mutex_t lock;
	size_t file, ext;    /* patch pass cursor */
	dws_error err;
};

/* The file an extent's bytes come from unchanged, or -1. */
static int copy_source(const dws_step *s, const dws_out_file *f, const dws_extent *x, uint64_t *off)
{
	if (x->slot < 0) {
		*off = x->off;
		return f->blob->fd;
	}
	const dws_src *src = &s->src[x->slot];
	if (src->blob->fd < 0 || src->dtype != s->layout->slots[x->slot].dtype || s->patch[x->slot])
		return -1;
	*off = src->off;
	return src->blob->fd;
}

/* Phase 1 (a thread): every extent of the anchor step that is a plain copy of
 * a local file goes through the kernel. Failures only mean "not copied". */
static void *copy_main(void *arg)
{
	struct overlap *o = arg;
	const dws_layout *L = o->first->layout;
	for (size_t fi = 0; fi < o->nf; fi++) {
		const dws_out_file *f = &L->files[fi];
		for (size_t k = 0; k < f->next; k++) {
			const dws_extent *x = &f->ext[k];
			uint64_t soff;
			int sfd = copy_source(o->first, f, x, &soff);
			if (sfd < 0)
				continue;
			loff_t in = (loff_t)soff, out = (loff_t)x->off;
			uint64_t left = x->len;
			while (left) {
				ssize_t r = copy_file_range(sfd, &in, o->of[fi].fd, &out, left, 0);
				if (r < 0 && errno == EINTR)
					continue;
				if (r <= 0)
					break;
				left -= (uint64_t)r;
			}
			o->of[fi].copied[k] = left == 0;
		}
	}
	return NULL;
}

static bool same_src(const dws_src *a, const dws_src *b)
{
	return a->blob == b->blob && a->off == b->off && a->dtype == b->dtype;
}

/* Phase 3 (two threads): extents the chain changed, written in place. */
static void *patch_main(void *arg)
{
	struct overlap *o = arg;
	const dws_layout *L = o->final->layout;
	for (;;) {
		pthread_mutex_lock(&o->lock);
		while (o->file < o->nf && o->ext >= L->files[o->file].next) {
			o->file++;
			o->ext = 0;
		}
		if (o->err.code || o->file >= o->nf) {
			pthread_mutex_unlock(&o->lock);
			return NULL;
		}
		size_t fi = o->file, k = o->ext++;
		pthread_mutex_unlock(&o->lock);

		const dws_extent *x = &L->files[fi].ext[k];
		char *dst = o->of[fi].map + x->off;
		int rc = DWS_OK;
		dws_error e = {0};
		bool copied = o->of[fi].copied[k];
		if (copied && x->slot >= 0 && !same_src(&o->first->src[x->slot], &o->final->src[x->slot]))
			copied = false; /* a dense overlay replaced the tensor */
		if (!copied) {
			int64_t got = dws_step_read(o->final, fi, x->off, dst, (size_t)x->len, &e);
			if (got != (int64_t)x->len)
				rc = got < 0 ? (int)got : dws_fail(&e, DWS_EIO, "%s: short read", L->files[fi].info.path);
		} else if (x->slot >= 0 && o->final->patch[x->slot]) {
			const dws_slot *sl = &L->slots[x->slot];
			const dws_patchset *ps = o->final->patch[x->slot];
			if (sl->dtype == DWS_DT_BF16 && ((uintptr_t)dst & 1) == 0) {
				/* window by window, every run in order: each window is
				 * written while it sits in the cache, not once per run */
				uint16_t *d = (uint16_t *)(void *)dst;
				uint32_t cur[DWS_MAX_RUNS + 1] = {0};
				enum { WIN = 128 * 1024 };
				for (uint64_t w = 0; w < sl->numel; w += WIN) {
					uint64_t end = w + WIN;
					for (uint32_t r = 0; r < ps->nruns; r++) {
						const dws_patch *p = ps->runs[r];
						uint32_t i = cur[r];
						for (; i < p->n && p->idx[i] < end; i++)
							d[p->idx[i]] = p->val[i];
						cur[r] = i;
					}
				}
			} else {
				/* the same conversions as the read path, element by element */
				size_t osz = dws_dtype_size(sl->dtype);
				for (uint32_t r = 0; r < ps->nruns; r++)
					for (uint32_t i = 0; i < ps->runs[r]->n; i++) {
						uint64_t el = ps->runs[r]->idx[i];
						if (dws_step_read(o->final, fi, x->off + el * osz, dst + el * osz, osz, &e) != (int64_t)osz) {
							rc = e.code ? e.code : DWS_EIO;
							break;
						}
					}
			}
		}
		if (rc) {
			pthread_mutex_lock(&o->lock);
			if (!o->err.code)
				o->err = e;
			pthread_mutex_unlock(&o->lock);
		}
	}
}

int dws_extract_step(dws_builder *bl, uint64_t step, const char *outdir,
		     const dws_progress *pr, dws_error *err)
{
	const dws_stepfile *a = dws_catalog_anchor_for(dws_builder_catalog(bl), step);
	dws_step *first = NULL, *final = NULL;
	int rc;
	if (!a || a->step == step) {
		/* nothing to overlap: the anchor itself, or a base-only chain */
		rc = dws_builder_build(bl, step, &final, err);
		if (!rc)
			rc = dws_extract(final, outdir, pr, err);
		dws_step_unref(final);
		return rc;
	}
	rc = check_outdir(outdir, err);
	if (!rc)
		rc = dws_builder_build(bl, a->step, &first, err);
	if (rc)
		return rc;
	char *o1 = dws_xstrdup(outdir), *o2 = dws_xstrdup(outdir);
	char *parent = dirname(o1), *base = basename(o2);
	char *tmpname = dws_xasprintf(".%s.dwsfs-tmp.%ld", base, (long)getpid());
	const dws_layout *L = first->layout;
	struct overlap o = {.first = first, .nf = L->nfiles, .of = dws_xcalloc(L->nfiles ? L->nfiles : 1, sizeof(struct ofile))};
	pthread_mutex_init(&o.lock, NULL);
	for (size_t i = 0; i < o.nf; i++)
		o.of[i].fd = -1;
	int tfd = -1, pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (pfd < 0 || mkdirat(pfd, tmpname, 0755) != 0 || (tfd = openat(pfd, tmpname, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		rc = dws_fail(err, DWS_EIO, "%s: cannot create a folder beside it: %s", outdir, strerror(errno));
		goto out;
	}
	for (size_t i = 0; i < o.nf && !rc; i++) {
		const dws_out_file *f = &L->files[i];
		rc = mkdirs_for(tfd, f->info.path, err);
		if (rc)
			break;
		o.of[i].fd = openat(tfd, f->info.path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		o.of[i].size = f->info.size;
		o.of[i].copied = dws_xcalloc(f->next ? f->next : 1, sizeof(bool));
		if (o.of[i].fd < 0 || ftruncate(o.of[i].fd, (off_t)f->info.size) != 0)
			rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", outdir, f->info.path, strerror(errno));
	}
	if (rc)
		goto out;
	if (pr && pr->fn)
		pr->fn(pr->ctx, "copying the anchor while decoding the chain", 0, 2);
	pthread_t th;
	bool threaded = pthread_create(&th, NULL, copy_main, &o) == 0;
	if (!threaded)
		copy_main(&o);
	rc = dws_builder_build(bl, step, &final, err);
	if (threaded)
		pthread_join(th, NULL);
	if (rc)
		goto out;
	if (final->layout != first->layout) {
		rc = dws_fail(err, DWS_EINVAL, "step %llu: layout changed within a chain", (unsigned long long)step);
		goto out;
	}
	if (pr && pr->fn)
		pr->fn(pr->ctx, "writing what the chain changed", 1, 2);
	for (size_t i = 0; i < o.nf && !rc; i++) {
		if (!o.of[i].size)
			continue;
		o.of[i].map = mmap(NULL, o.of[i].size, PROT_READ | PROT_WRITE, MAP_SHARED, o.of[i].fd, 0);
		if (o.of[i].map == MAP_FAILED) {
			o.of[i].map = NULL;
			rc = dws_fail(err, DWS_EIO, "%s: mmap: %s", L->files[i].info.path, strerror(errno));
			break;
		}
		madvise(o.of[i].map, o.of[i].size, MADV_POPULATE_WRITE); /* bulk faults; a hint */
	}
	if (!rc) {
		o.final = final;
		pthread_t pt;
		bool two = pthread_create(&pt, NULL, patch_main, &o) == 0;
		patch_main(&o);
		if (two)
			pthread_join(pt, NULL);
		if (o.err.code)
			rc = dws_fail(err, o.err.code, "%s", o.err.msg);
	}
	for (size_t i = 0; i < o.nf; i++)
		if (o.of[i].map && munmap(o.of[i].map, o.of[i].size) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: munmap: %s", L->files[i].info.path, strerror(errno));
	if (pr && pr->fn && !rc)
		pr->fn(pr->ctx, "done", 2, 2);
out:
	for (size_t i = 0; i < o.nf; i++) {
		if (o.of[i].fd >= 0 && close(o.of[i].fd) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: close: %s", L->files[i].info.path, strerror(errno));
		free(o.of[i].copied);
	}
	free(o.of);
	pthread_mutex_destroy(&o.lock);
	if (tfd >= 0)
		close(tfd);
	if (pfd >= 0) {
		if (!rc && renameat(pfd, tmpname, pfd, base) != 0)
			rc = dws_fail(err, DWS_EIO, "%s: cannot move the finished folder into place: %s", outdir, strerror(errno));
		if (rc)
			remove_tree(pfd, tmpname);
		close(pfd);
	}
	dws_step_unref(first);
	dws_step_unref(final);
	free(tmpname);
	free(o1);
	free(o2);
	return rc;
}
