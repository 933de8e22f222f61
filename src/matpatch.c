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

/* Maps of the copy's files, written through. */
struct target {
	unsigned char **map;
	uint64_t *size;
	size_t n;
};

static void unmap_all(struct target *t)
{
	for (size_t i = 0; i < t->n; i++)
		if (t->map[i] && t->map[i] != MAP_FAILED && t->size[i])
			munmap(t->map[i], t->size[i]);
	free(t->map);
	free(t->size);
}

static int map_all(const int *fds, size_t n, struct target *t, dws_error *err)
{
	t->n = n;
	t->map = dws_xcalloc(n ? n : 1, sizeof(*t->map));
	t->size = dws_xcalloc(n ? n : 1, sizeof(*t->size));
	for (size_t i = 0; i < n; i++) {
		struct stat st;
		if (fstat(fds[i], &st) != 0)
			return dws_fail(err, DWS_EIO, "materialized file %zu: %s", i, strerror(errno));
		t->size[i] = (uint64_t)st.st_size;
		if (!t->size[i])
			continue;
		t->map[i] = mmap(NULL, t->size[i], PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
		if (t->map[i] == MAP_FAILED)
			return dws_fail(err, DWS_EIO, "materialized file %zu: mmap: %s", i, strerror(errno));
	}
	return DWS_OK;
}

/* Tensor `name`'s place in the copy: its bytes, element size and count. */
static int place_of(const dws_layout *L, const struct target *t, const char *name, unsigned char **at, size_t *osz,
		    uint64_t *numel, dws_error *err)
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
	*at = t->map[sl->file] + sl->off;
	*numel = sl->numel;
	return DWS_OK;
}

/* The pages of [p, p+n) leave the process (a shared file mapping: written
 * pages stay dirty in the page cache): the copy's and the patch's pages do
 * not pile up in the daemon's RSS as a patch goes through a large model. */
static void drop_pages(const void *p, size_t n)
{
	uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p & ~(pg - 1);
	if (n)
		madvise((void *)a, (uintptr_t)p + n - a, MADV_DONTNEED);
}

enum { DROP_EVERY = 16u << 20 };

/* One tensor's entries of the patch (mapped at pm) into the copy. */
static int apply_tensor(const dws_st_file *st, const unsigned char *pm, const dws_layout *L, const struct target *t,
			const dws_st_tensor *vt, dws_error *err)
{
	size_t nl = strlen(vt->name);
	char *name = dws_xasprintf("%.*s", (int)(nl - 7), vt->name); /* less ".values" */
	char *iname = dws_xasprintf("%s.indices", name);
	const dws_st_tensor *it = dws_st_find(st, iname);
	unsigned char *at = NULL;
	size_t osz = 0;
	uint64_t numel = 0;
	int rc = place_of(L, t, name, &at, &osz, &numel, err);
	const unsigned char *vals = pm + dws_st_data_start(st) + vt->begin;
	if (!rc && dws_dtype_size(vt->dtype) != osz)
		rc = dws_fail(err, DWS_EFORMAT, "patch: '%s' has another dtype than the model", vt->name);
	if (!rc && !it) { /* dense: every element */
		if (vt->numel != numel)
			rc = dws_fail(err, DWS_EFORMAT, "patch: dense '%s' has %llu elements, the tensor %llu", vt->name,
				      (unsigned long long)vt->numel, (unsigned long long)numel);
		else
			for (uint64_t b = 0, all = numel * osz; b < all; b += DROP_EVERY) {
				size_t w = all - b < DROP_EVERY ? (size_t)(all - b) : DROP_EVERY;
				memcpy(at + b, vals + b, w);
				drop_pages(at + b, w);
				drop_pages(vals + b, w);
			}
	} else if (!rc) {
		if (it->dtype != DWS_DT_I64 || it->numel != vt->numel)
			rc = dws_fail(err, DWS_EFORMAT, "patch: '%s' does not match its values", iname);
		const unsigned char *ix = pm + dws_st_data_start(st) + it->begin;
		uint64_t dropped = 0; /* bytes of the tensor behind the positions (sorted) */
		for (uint64_t k = 0; k < vt->numel && !rc; k++) {
			uint64_t pos;
			memcpy(&pos, ix + k * 8, 8);
			if (pos >= numel)
				rc = dws_fail(err, DWS_EFORMAT, "patch: '%s' position %llu past its %llu elements", iname,
					      (unsigned long long)pos, (unsigned long long)numel);
			else
				memcpy(at + pos * osz, vals + k * osz, osz);
			if (!rc && pos * osz >= dropped + DROP_EVERY) {
				drop_pages(at + dropped, (size_t)(pos * osz - dropped));
				dropped = pos * osz;
			}
		}
		drop_pages(at + dropped, (size_t)(numel * osz - dropped));
		drop_pages(ix, (size_t)(vt->numel * 8));
		drop_pages(vals, (size_t)(vt->numel * osz));
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
		rc = map_all(fds, n, &t, err);
	for (size_t i = 0; !rc && i < dws_st_count(st); i++) {
		const dws_st_tensor *vt = dws_st_at(st, i);
		size_t nl = strlen(vt->name);
		if (nl > 7 && !strcmp(vt->name + nl - 7, ".values"))
			rc = apply_tensor(st, pm, L, &t, vt, err);
	}
	unmap_all(&t);
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
