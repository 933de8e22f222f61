/* A materialized copy brought forward in place (see matpatch.h). */
#include "matpatch.h"
#include "step.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* The patch's header (its own format: dws_st_parse checks every offset). */
static int read_header(dws_patchfile *p, dws_st_file **st, dws_error *err)
{
	unsigned char len8[8];
	if (dws_patchfile_read(p, 0, len8, 8, err) != 8)
		return dws_code_of(err, DWS_EIO);
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | len8[i];
	if (hlen > DWS_ST_MAX_HEADER || hlen + 8 > dws_patchfile_size(p))
		return dws_fail(err, DWS_EFORMAT, "patch: header length %llu", (unsigned long long)hlen);
	unsigned char *buf = dws_xmalloc((size_t)hlen + 8);
	int rc = dws_patchfile_read(p, 0, buf, (size_t)hlen + 8, err) == (int64_t)hlen + 8 ? DWS_OK : DWS_EIO;
	if (!rc)
		rc = dws_st_parse(buf, (size_t)hlen + 8, dws_patchfile_size(p), "patch", st, NULL, err);
	free(buf);
	return rc;
}

/* The copy's files, written with pread/pwrite a 2 MiB chunk at a time.
 *
 * Not through a shared mapping: a write fault per 4 KiB page (12-18 s a step
 * at 8 GB), and pages that had left the page cache came back in small folios,
 * so a loader's warm mmap of the copy took a fault per 64 KiB (0.09x of a
 * local copy at 8 GB). A chunk's old bytes come from the page cache when it
 * holds them all (RWF_NOWAIT), else from the disk with O_DIRECT, leaving no
 * page behind; the chunk's one aligned 2 MiB write then puts it in the page
 * cache as one large folio. A chunk with few changes gets them one by one. */
enum { CHUNK = 2u << 20, SPARSE_PAGES = 8 }; /* under a change per 8 pages: one by one */

struct target {
	const int *fd;
	int *dfd;             /* O_DIRECT opens, -1: none (tmpfs) */
	uint64_t *size;
	size_t n;
	unsigned char *buf;   /* CHUNK, page-aligned */
};

static void target_free(struct target *t)
{
	for (size_t i = 0; t->dfd && i < t->n; i++)
		if (t->dfd[i] >= 0)
			close(t->dfd[i]);
	free(t->dfd);
	free(t->size);
	free(t->buf);
}

static int target_open(const int *fds, size_t n, struct target *t, dws_error *err)
{
	t->fd = fds;
	t->n = n;
	t->dfd = dws_xcalloc(n ? n : 1, sizeof(*t->dfd));
	t->size = dws_xcalloc(n ? n : 1, sizeof(*t->size));
	for (size_t i = 0; i < n; i++)
		t->dfd[i] = -1;
	if (posix_memalign((void **)&t->buf, 4096, CHUNK) != 0)
		abort(); /* out of memory */
	for (size_t i = 0; i < n; i++) {
		struct stat st;
		if (fstat(fds[i], &st) != 0)
			return dws_fail(err, DWS_EIO, "materialized file %zu: %s", i, strerror(errno));
		t->size[i] = (uint64_t)st.st_size;
		char proc[64];
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fds[i]);
		t->dfd[i] = open(proc, O_RDONLY | O_DIRECT | O_CLOEXEC);
	}
	return DWS_OK;
}

/* [at, at+n) of fd into p: what it holds from flag (0 or RWF_NOWAIT: the
 * page cache's pages only), stopping short where that ends. */
static size_t pread_some(int fd, unsigned char *p, size_t n, uint64_t at, int flag)
{
	size_t got = 0;
	while (got < n) {
		struct iovec v = {p + got, n - got};
		ssize_t k = preadv2(fd, &v, 1, (off_t)(at + got), flag);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	return got;
}

/* [p, p+n) at off of file f. */
static int write_at(const struct target *t, size_t f, const void *p, size_t n, uint64_t off, dws_error *err)
{
	if (dws_pwrite_all(t->fd[f], p, n, off))
		return DWS_OK;
	return dws_fail(err, DWS_EIO, "materialized file %zu: write at %llu: %s", f, (unsigned long long)off,
			strerror(errno));
}

/* Chunk [c0, c0+len) of file f into t->buf. */
static int chunk_read(const struct target *t, size_t f, uint64_t c0, size_t len, dws_error *err)
{
	errno = 0; /* a short read sets none */
	size_t got = pread_some(t->fd[f], t->buf, len, c0, RWF_NOWAIT);
	if (got < len && t->dfd[f] >= 0) {
		got &= ~(size_t)4095; /* O_DIRECT: aligned; the end rounded up (a short read at the file's end) */
		size_t want = (len - got + 4095) & ~(size_t)4095;
		got += pread_some(t->dfd[f], t->buf + got, want, c0 + got, 0);
	}
	if (got < len)
		got += pread_some(t->fd[f], t->buf + got, len - got, c0 + got, 0);
	if (got < len)
		return dws_fail(err, DWS_EIO, "materialized file %zu: read at %llu: %s", f, (unsigned long long)c0,
				errno ? strerror(errno) : "short");
	return DWS_OK;
}

/* Tensor `name`'s place in the copy: its file, offset, element size and count. */
static int place_of(const dws_layout *L, const struct target *t, const char *name, size_t *file, uint64_t *at,
		    size_t *osz, uint64_t *numel, dws_error *err)
{
	size_t si;
	if (!dws_strmap_get(&L->by_name, name, &si))
		return dws_fail(err, DWS_EFORMAT, "patch: no tensor '%s' in the model", name);
	const dws_slot *sl = &L->slots[si];
	*osz = dws_dtype_size(sl->dtype);
	uint64_t bytes, end;
	if (sl->file >= t->n || !dws_mul_ok(sl->numel, *osz, &bytes) || !dws_add_ok(sl->off, bytes, &end) ||
	    end > t->size[sl->file])
		return dws_fail(err, DWS_EFORMAT, "patch: tensor '%s' lies outside its materialized file", name);
	*file = sl->file;
	*at = sl->off;
	*numel = sl->numel;
	return DWS_OK;
}

/* The pages of [p, p+n) leave the process: the patch's pages do not pile
 * up in the daemon's RSS as a patch goes through a large model. */
static void drop_pages(const void *p, size_t n)
{
	uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p & ~(pg - 1);
	if (n)
		madvise((void *)a, (uintptr_t)p + n - a, MADV_DONTNEED);
}

enum { DROP_EVERY = 16u << 20 };

/* A tensor's entries as the patch holds them. */
struct entries {
	const unsigned char *ix, *vals;
	uint64_t count, numel, at; /* at: the tensor's offset in its file */
	size_t osz, file;
	const char *iname;
};

static int position(const struct entries *e, uint64_t k, uint64_t *off, dws_error *err)
{
	uint64_t pos;
	memcpy(&pos, e->ix + k * 8, 8);
	if (pos >= e->numel)
		return dws_fail(err, DWS_EFORMAT, "patch: '%s' position %llu past its %llu elements", e->iname,
				(unsigned long long)pos, (unsigned long long)e->numel);
	*off = e->at + pos * e->osz;
	return DWS_OK;
}

/* Entries [k, ...) that fall in k's chunk, written: the chunk read, changed
 * and written whole, or entry by entry when they are few. *next: the first
 * entry after them. */
static int write_chunk(const struct target *t, const struct entries *e, uint64_t k, uint64_t *next, dws_error *err)
{
	uint64_t off = 0;
	int rc = position(e, k, &off, err);
	if (rc)
		return rc;
	uint64_t c0 = off & ~(uint64_t)(CHUNK - 1), c1 = c0 + CHUNK < t->size[e->file] ? c0 + CHUNK : t->size[e->file];
	uint64_t j = k, o = off;
	while (!rc && j < e->count && o >= c0 && o + e->osz <= c1 && ++j < e->count)
		rc = position(e, j, &o, err);
	if (rc)
		return rc;
	if (j == k) /* an element across the chunk's end */
		j = k + 1;
	*next = j;
	if (j - k < (c1 - c0) / 4096 / SPARSE_PAGES || j == k + 1) {
		for (uint64_t i = k; i < j && !rc; i++)
			if (!(rc = position(e, i, &o, err)))
				rc = write_at(t, e->file, e->vals + i * e->osz, e->osz, o, err);
		return rc;
	}
	rc = chunk_read(t, e->file, c0, (size_t)(c1 - c0), err);
	for (uint64_t i = k; i < j && !rc; i++)
		if (!(rc = position(e, i, &o, err)))
			memcpy(t->buf + (o - c0), e->vals + i * e->osz, e->osz);
	return rc ? rc : write_at(t, e->file, t->buf, (size_t)(c1 - c0), c0, err);
}

/* Every element of a dense entry, written from the patch. */
static int write_dense(const struct target *t, const struct entries *e, dws_error *err)
{
	for (uint64_t b = 0, all = e->numel * e->osz; b < all; b += DROP_EVERY) {
		size_t w = all - b < DROP_EVERY ? (size_t)(all - b) : DROP_EVERY;
		int rc = write_at(t, e->file, e->vals + b, w, e->at + b, err);
		if (rc)
			return rc;
		drop_pages(e->vals + b, w);
	}
	return DWS_OK;
}

/* One tensor's entries of the patch (mapped at pm) into the copy. */
static int apply_tensor(const dws_st_file *st, const unsigned char *pm, const dws_layout *L, const struct target *t,
			const dws_st_tensor *vt, dws_error *err)
{
	size_t nl = strlen(vt->name);
	char *name = dws_xasprintf("%.*s", (int)(nl - 7), vt->name); /* less ".values" */
	char *iname = dws_xasprintf("%s.indices", name);
	const dws_st_tensor *it = dws_st_find(st, iname);
	struct entries e = {.vals = pm + dws_st_data_start(st) + vt->begin, .count = vt->numel, .iname = iname};
	int rc = place_of(L, t, name, &e.file, &e.at, &e.osz, &e.numel, err);
	if (!rc && dws_dtype_size(vt->dtype) != e.osz)
		rc = dws_fail(err, DWS_EFORMAT, "patch: '%s' has another dtype than the model", vt->name);
	if (!rc && !it) { /* dense: every element */
		if (vt->numel != e.numel)
			rc = dws_fail(err, DWS_EFORMAT, "patch: dense '%s' has %llu elements, the tensor %llu", vt->name,
				      (unsigned long long)vt->numel, (unsigned long long)e.numel);
		else
			rc = write_dense(t, &e, err);
	} else if (!rc) {
		if (it->dtype != DWS_DT_I64 || it->numel != vt->numel)
			rc = dws_fail(err, DWS_EFORMAT, "patch: '%s' does not match its values", iname);
		e.ix = pm + dws_st_data_start(st) + it->begin;
		for (uint64_t k = 0, dropped = 0; k < e.count && !rc;) {
			rc = write_chunk(t, &e, k, &k, err);
			if (k - dropped >= DROP_EVERY / 8 || k == e.count) {
				drop_pages(e.ix + dropped * 8, (size_t)((k - dropped) * 8));
				drop_pages(e.vals + dropped * e.osz, (size_t)((k - dropped) * e.osz));
				dropped = k;
			}
		}
	}
	free(iname);
	free(name);
	return rc;
}

int dws_matpatch_apply(dws_patchfile *p, dws_step *to, const int *fds, size_t n, dws_error *err)
{
	const dws_layout *L = dws_step_layout(to);
	if (n != L->nfiles)
		return dws_fail(err, DWS_EINVAL, "patch: %zu materialized files for a model of %zu", n, L->nfiles);
	dws_st_file *st = NULL;
	int rc = read_header(p, &st, err);
	uint64_t psize = dws_patchfile_size(p);
	void *pm = MAP_FAILED;
	if (!rc) {
		pm = mmap(NULL, psize, PROT_READ, MAP_SHARED, dws_patchfile_fd(p), 0);
		if (pm == MAP_FAILED)
			rc = dws_fail(err, DWS_EIO, "patch: mmap: %s", strerror(errno));
	}
	struct target t = {0};
	if (!rc)
		rc = target_open(fds, n, &t, err);
	for (size_t i = 0; !rc && i < dws_st_count(st); i++) {
		const dws_st_tensor *vt = dws_st_at(st, i);
		size_t nl = strlen(vt->name);
		if (nl > 7 && !strcmp(vt->name + nl - 7, ".values"))
			rc = apply_tensor(st, pm, L, &t, vt, err);
	}
	target_free(&t);
	if (pm != MAP_FAILED)
		munmap(pm, psize);
	dws_st_free(st);
	return rc;
}

/* ---- does anything still use the copy? ---- */

int dws_matpatch_reopen(int fd)
{
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	return open(proc, O_RDWR | O_CLOEXEC);
}

bool dws_matpatch_in_use(const int *fds, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (fcntl(fds[i], F_SETLEASE, F_WRLCK) != 0)
			return true; /* EAGAIN: another open; else leases off: cannot tell */
		fcntl(fds[i], F_SETLEASE, F_UNLCK);
	}
	return false;
}
