/* Catch-up patches (see patchfile.h). Within a chain of sparse deltas the
 * patch is made from the deltas after FROM up to TO alone: their indices,
 * merged per tensor (newest value wins), are exactly the elements that may
 * differ, and their values are TO's; no tensor is read. Otherwise (another
 * anchor, a dense file between) each tensor of TO is compared with FROM's
 * whole, window by window. The whole file is an unnamed file: the data goes
 * in as it is made, after room for the header, which can only be made last:
 * the room is the size of the header every tensor that may appear would
 * have, with the widest numbers, and the header is padded with spaces to
 * fill it (safetensors allows that). One file, so the mount can hand it to
 * the kernel to read (passthrough) and dwsctl can link it into place. */
#include "patchfile.h"
#include "step.h"

#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { WINDOW = 1 << 20 };   /* elements compared at a time */
#define DENSE_SHARE 3        /* dense past a third of a tensor's elements */

struct entry {
	char *name;        /* "T.indices" or "T.values" */
	dws_dtype dtype;
	uint32_t ndim;
	uint64_t shape[16];
	uint64_t nbytes;
	uint32_t full_ndim; /* T's own shape */
	uint64_t full_shape[16];
};

struct dws_patchfile {
	atomic_long refs;
	uint64_t from, to;
	int fd;            /* the whole file */
	uint64_t size;
	uint64_t changed;  /* elements written */
	size_t sparse, dense;
};

/* The data file being written, and the header's entries. */
struct out {
	int fd;
	uint64_t off;
	unsigned char *buf;
	size_t blen;
	struct entry *e;
	size_t n, cap;
	uint64_t changed;
	size_t sparse, dense;
};

static int out_flush(struct out *o, dws_error *err)
{
	if (!dws_pwrite_all(o->fd, o->buf, o->blen, o->off))
		return dws_fail(err, DWS_EIO, "patch file: write: %s", strerror(errno));
	o->off += o->blen;
	o->blen = 0;
	return DWS_OK;
}

static int out_put(struct out *o, const void *p, size_t n, dws_error *err)
{
	const unsigned char *c = p;
	while (n) {
		size_t k = WINDOW - o->blen < n ? WINDOW - o->blen : n;
		memcpy(o->buf + o->blen, c, k);
		o->blen += k;
		c += k;
		n -= k;
		if (o->blen == WINDOW) {
			int rc = out_flush(o, err);
			if (rc)
				return rc;
		}
	}
	return DWS_OK;
}

static void out_entry(struct out *o, const dws_slot *sl, const char *suffix, dws_dtype dt, uint64_t n, bool full)
{
	if (o->n == o->cap) {
		o->cap = o->cap ? 2 * o->cap : 64;
		o->e = dws_xrealloc(o->e, o->cap * sizeof(*o->e));
	}
	struct entry *e = &o->e[o->n++];
	memset(e, 0, sizeof(*e));
	e->name = dws_xasprintf("%s%s", sl->name, suffix);
	e->dtype = dt;
	if (full) {
		e->ndim = sl->ndim <= 16 ? sl->ndim : 1;
		if (sl->ndim <= 16)
			memcpy(e->shape, sl->shape, sl->ndim * sizeof(uint64_t));
		else
			e->shape[0] = n;
	} else {
		e->ndim = 1;
		e->shape[0] = n;
	}
	e->nbytes = n * dws_dtype_size(dt);
	e->full_ndim = sl->ndim <= 16 ? sl->ndim : 0;
	memcpy(e->full_shape, sl->shape, e->full_ndim * sizeof(uint64_t));
}

/* ---- within a chain: the deltas' entries ---- */

/* A BF16 value as the served dtype writes it. */
static void put_value(unsigned char *dst, dws_dtype out, uint16_t v)
{
	if (out == DWS_DT_F32) {
		uint32_t u = (uint32_t)v << 16;
		memcpy(dst, &u, 4);
	} else if (out == DWS_DT_F16) {
		uint16_t h = dws_bf16_to_f16(v);
		memcpy(dst, &h, 2);
	} else {
		memcpy(dst, &v, 2);
	}
}

/* One param's entries decoded (checked as decoding checks them). */
static int decode_param(const dws_delta_param *p, uint64_t numel, const char *what, uint32_t *idx, dws_error *err)
{
	uint64_t last = UINT64_MAX, ix;
	for (uint64_t k = 0; k < p->count; k++) {
		if (!dws_idx_entry(p->idx_kind, p->idx_raw, k, last, &ix))
			return dws_idx_order_fail(p, k, last, what, err);
		idx[k] = (uint32_t)ix;
		last = ix;
	}
	if (p->count && last >= numel)
		return dws_idx_range_fail(p, last, numel, what, err);
	return DWS_OK;
}

/* (a, an) older, (b, bn) newer into (o, *on): sorted, unique, newest wins. */
static void merge(const uint32_t *ai, const uint16_t *av, uint64_t an, const uint32_t *bi, const uint16_t *bv,
		  uint64_t bn, uint32_t *oi, uint16_t *ov, uint64_t *on)
{
	uint64_t i = 0, j = 0, k = 0;
	while (i < an || j < bn) {
		if (j == bn || (i < an && ai[i] < bi[j])) {
			oi[k] = ai[i];
			ov[k++] = av[i++];
		} else {
			i += i < an && ai[i] == bi[j];
			oi[k] = bi[j];
			ov[k++] = bv[j++];
		}
	}
	*on = k;
}

/* The entries of params ps[0..np) (files in chain order) of tensor sl,
 * merged into (*idx, *val): sorted, unique, the newest value; *n of them. */
static int merge_params(const dws_slot *sl, const dws_delta_param *const *ps, const char *const *what, size_t np,
			uint32_t **idx, uint16_t **val, uint64_t *n, dws_error *err)
{
	uint64_t total = 0;
	for (size_t k = 0; k < np; k++)
		total += ps[k]->count;
	size_t t = (size_t)(total ? total : 1);
	uint32_t *ai = dws_xmalloc(t * 4), *oi = dws_xmalloc(t * 4), *pi = dws_xmalloc(t * 4);
	uint16_t *av = dws_xmalloc(t * 2), *ov = dws_xmalloc(t * 2), *pv = dws_xmalloc(t * 2);
	uint64_t m = 0;
	int rc = DWS_OK;
	for (size_t k = 0; k < np && !rc; k++) {
		if (k == 0) { /* nothing to merge with yet */
			rc = decode_param(ps[k], sl->numel, what[k], ai, err);
			memcpy(av, ps[k]->val, ps[k]->count * 2); /* unaligned in the file */
			m = ps[k]->count;
			continue;
		}
		rc = decode_param(ps[k], sl->numel, what[k], pi, err);
		memcpy(pv, ps[k]->val, ps[k]->count * 2);
		merge(ai, av, m, pi, pv, ps[k]->count, oi, ov, &m);
		uint32_t *si = ai;
		ai = oi, oi = si;
		uint16_t *sv = av;
		av = ov, ov = sv;
	}
	free(oi);
	free(ov);
	free(pi);
	free(pv);
	*idx = ai;
	*val = av;
	*n = m;
	return rc;
}

/* Slot sl's params merged and written. */
static int sparse_slot(struct out *o, const dws_slot *sl, const dws_delta_param *const *ps, const char *const *what,
		       size_t np, dws_error *err)
{
	uint32_t *idx;
	uint16_t *val;
	uint64_t n;
	int rc = merge_params(sl, ps, what, np, &idx, &val, &n, err);
	size_t osz = dws_dtype_size(sl->dtype);
	uint64_t chunk[1024];
	for (uint64_t k = 0; k < n && !rc; k += 1024) {
		size_t c = n - k < 1024 ? (size_t)(n - k) : 1024;
		for (size_t i = 0; i < c; i++)
			chunk[i] = idx[k + i];
		rc = out_put(o, chunk, c * 8, err);
	}
	if (sl->dtype == DWS_DT_BF16 && !rc) {
		rc = out_put(o, val, n * 2, err);
	} else {
		for (uint64_t k = 0; k < n && !rc; k++) {
			unsigned char v[4];
			put_value(v, sl->dtype, val[k]);
			rc = out_put(o, v, osz, err);
		}
	}
	free(idx);
	free(val);
	if (!rc && n) {
		out_entry(o, sl, ".indices", DWS_DT_I64, n, false);
		out_entry(o, sl, ".values", sl->dtype, n, false);
		o->changed += n;
		o->sparse++;
	}
	return rc;
}

static int from_chain(struct out *o, const dws_lazy_chain *lc, dws_error *err)
{
	const dws_layout *L = dws_step_layout(lc->first);
	int rc = DWS_OK;
	const dws_delta_param **ps = dws_xcalloc(lc->nfiles ? lc->nfiles : 1, sizeof(*ps));
	const char **what = dws_xcalloc(lc->nfiles ? lc->nfiles : 1, sizeof(*what));
	for (size_t slot = 0; slot < L->nslots && !rc; slot++) {
		size_t np = 0;
		for (size_t f = 0; f < lc->nfiles; f++)
			for (size_t k = 0; k < lc->files[f].np; k++)
				if (lc->files[f].ps[k].slot == slot) { /* each file names a tensor once */
					ps[np] = &lc->files[f].ps[k];
					what[np++] = lc->files[f].what;
				}
		if (np)
			rc = sparse_slot(o, &L->slots[slot], ps, what, np, err);
	}
	free(ps);
	free(what);
	return rc;
}

/* ---- across chains: tensors compared whole ---- */

/* Elements [e0, e0+n) of slot sl of step s, as served. */
static int read_elems(dws_step *s, const dws_slot *sl, uint64_t e0, uint64_t n, void *buf, dws_error *err)
{
	size_t osz = dws_dtype_size(sl->dtype);
	int64_t got = dws_step_read(s, sl->file, sl->off + e0 * osz, buf, (size_t)(n * osz), err);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got != n * osz)
		return dws_fail(err, DWS_EIO, "patch: tensor '%s' of step %llu is cut short", sl->name,
				(unsigned long long)dws_step_number(s));
	return DWS_OK;
}

static int dense_slot(struct out *o, dws_step *to, const dws_slot *sl, unsigned char *buf, dws_error *err)
{
	size_t osz = dws_dtype_size(sl->dtype);
	int rc = DWS_OK;
	for (uint64_t e = 0; e < sl->numel && !rc; e += WINDOW) {
		uint64_t n = sl->numel - e < WINDOW ? sl->numel - e : WINDOW;
		rc = read_elems(to, sl, e, n, buf, err);
		if (!rc)
			rc = out_put(o, buf, n * osz, err);
	}
	if (!rc) {
		out_entry(o, sl, ".values", sl->dtype, sl->numel, true);
		o->changed += sl->numel;
		o->dense++;
	}
	return rc;
}

/* The elements of a tensor that differ, into (*pos, *val) while they stay
 * under a third of it: *n, or UINT64_MAX once they pass it. */
static int diff_slot(dws_step *from, const dws_slot *fs, dws_step *to, const dws_slot *ts, unsigned char *a,
		     unsigned char *b, uint64_t **pos, unsigned char **val, uint64_t *n, dws_error *err)
{
	size_t osz = dws_dtype_size(ts->dtype);
	uint64_t cap = ts->numel / DENSE_SHARE, k = 0;
	*pos = dws_xmalloc((cap ? cap : 1) * 8);
	*val = dws_xmalloc((cap ? cap : 1) * osz);
	int rc = DWS_OK;
	for (uint64_t e = 0; e < ts->numel && !rc && k != UINT64_MAX; e += WINDOW) {
		uint64_t w = ts->numel - e < WINDOW ? ts->numel - e : WINDOW;
		rc = read_elems(from, fs, e, w, a, err);
		if (!rc)
			rc = read_elems(to, ts, e, w, b, err);
		for (uint64_t i = 0; i < w && !rc; i++) {
			if (!memcmp(a + i * osz, b + i * osz, osz))
				continue;
			if (k == cap) {
				k = UINT64_MAX; /* dense */
				break;
			}
			(*pos)[k] = e + i;
			memcpy(*val + k * osz, b + i * osz, osz);
			k++;
		}
	}
	*n = k;
	return rc;
}

static int whole_slot(struct out *o, dws_step *from, dws_step *to, const dws_slot *ts, unsigned char *a,
		      unsigned char *b, dws_error *err)
{
	const dws_layout *FL = dws_step_layout(from);
	size_t fi;
	bool same = dws_strmap_get(&FL->by_name, ts->name, &fi) && FL->slots[fi].dtype == ts->dtype &&
		    FL->slots[fi].numel == ts->numel;
	if (!same) /* a tensor FROM has not, or not so: all of it */
		return dense_slot(o, to, ts, b, err);
	uint64_t *pos = NULL, n = 0;
	unsigned char *val = NULL;
	int rc = diff_slot(from, &FL->slots[fi], to, ts, a, b, &pos, &val, &n, err);
	if (!rc && n == UINT64_MAX)
		rc = dense_slot(o, to, ts, b, err);
	else if (!rc && n) {
		rc = out_put(o, pos, n * 8, err);
		if (!rc)
			rc = out_put(o, val, n * dws_dtype_size(ts->dtype), err);
		if (!rc) {
			out_entry(o, ts, ".indices", DWS_DT_I64, n, false);
			out_entry(o, ts, ".values", ts->dtype, n, false);
			o->changed += n;
			o->sparse++;
		}
	}
	free(pos);
	free(val);
	return rc;
}

static int from_whole(struct out *o, dws_step *from, dws_step *to, dws_error *err)
{
	const dws_layout *L = dws_step_layout(to);
	unsigned char *a = dws_xmalloc((size_t)WINDOW * 8), *b = dws_xmalloc((size_t)WINDOW * 8);
	int rc = DWS_OK;
	for (size_t slot = 0; slot < L->nslots && !rc; slot++)
		rc = whole_slot(o, from, to, &L->slots[slot], a, b, err);
	free(a);
	free(b);
	return rc;
}

/* ---- the file ---- */

/* {"T": [dims], ...} of the sparse tensors: a reader that updates the
 * model in place needs each tensor's full shape (vLLM's patches do). */
static char *shapes_json(const struct out *o)
{
	json_t *j = json_object();
	for (size_t i = 0; i < o->n; i++) {
		const struct entry *e = &o->e[i];
		size_t nl = strlen(e->name);
		if (nl < 8 || strcmp(e->name + nl - 8, ".indices"))
			continue;
		json_t *dims = json_array();
		for (uint32_t d = 0; d < e->full_ndim; d++)
			json_array_append_new(dims, json_integer((json_int_t)e->full_shape[d]));
		char *name = dws_xasprintf("%.*s", (int)(nl - 8), e->name);
		json_object_set_new(j, name, dims);
		free(name);
	}
	char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(j);
	return s ? s : dws_xstrdup("{}");
}

/* The header of entries e[0..n) with these numbers, length prefix included. */
static int build_header(const struct entry *e, size_t n, const uint64_t nums[5], char **out, size_t *len,
			dws_error *err)
{
	struct out o = {.e = (struct entry *)e, .n = n};
	dws_st_out_tensor *ts = dws_xcalloc(n ? n : 1, sizeof(*ts));
	for (size_t i = 0; i < n; i++)
		ts[i] = (dws_st_out_tensor){e[i].name, e[i].dtype, e[i].ndim, e[i].shape, e[i].nbytes};
	char v[5][24];
	for (int i = 0; i < 5; i++)
		snprintf(v[i], sizeof(v[i]), "%llu", (unsigned long long)nums[i]);
	char *shapes = shapes_json(&o);
	dws_st_meta meta[] = {{"format", "dwsfs_patch"}, {"version", "1"}, {"from_step", v[0]}, {"to_step", v[1]},
			      {"sparse_tensors", v[2]}, {"dense_tensors", v[3]}, {"changed_elements", v[4]},
			      {"shapes", shapes}};
	int rc = dws_st_build_header(ts, n, meta, DWS_ARRAY_LEN(meta), out, len, err);
	free(shapes);
	free(ts);
	return rc;
}

/* Room for the header: the header of both entries of every slot in
 * slots[0..n) (NULL: all of L's), with the widest numbers (a first entry of
 * 10^18 bytes puts every later offset at 19 digits), plus slack for the
 * first entry's offset of 0. */
static int header_room(const dws_layout *L, const size_t *slots, size_t n, uint64_t *room, dws_error *err)
{
	struct entry *e = dws_xcalloc(2 * n + 1, sizeof(*e));
	for (size_t i = 0; i < n; i++) {
		const dws_slot *sl = &L->slots[slots ? slots[i] : i];
		struct entry *x = &e[2 * i], *v = &e[2 * i + 1];
		x->name = dws_xasprintf("%s.indices", sl->name);
		x->dtype = DWS_DT_I64;
		x->ndim = 1;
		x->shape[0] = sl->numel;
		v->name = dws_xasprintf("%s.values", sl->name);
		v->dtype = sl->dtype;
		v->ndim = x->full_ndim = sl->ndim <= 16 ? sl->ndim : 0;
		memcpy(v->shape, sl->shape, v->ndim * sizeof(uint64_t));
		memcpy(x->full_shape, sl->shape, v->ndim * sizeof(uint64_t));
	}
	if (n)
		e[0].nbytes = 1000000000000000000ull;
	const uint64_t widest[5] = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
	char *h = NULL;
	size_t len = 0;
	int rc = build_header(e, 2 * n, widest, &h, &len, err);
	for (size_t i = 0; i < 2 * n; i++)
		free(e[i].name);
	free(e);
	free(h);
	*room = (len + 64 + 7) & ~(uint64_t)7;
	return rc;
}

/* The real header, padded with spaces to fill the room, at the file's start. */
static int write_header(dws_patchfile *p, const struct out *o, uint64_t room, dws_error *err)
{
	const uint64_t nums[5] = {p->from, p->to, o->sparse, o->dense, o->changed};
	char *h = NULL;
	size_t len = 0;
	int rc = build_header(o->e, o->n, nums, &h, &len, err);
	if (!rc && len > room)
		rc = dws_fail(err, DWS_EIO, "patch %llu-%llu: header of %zu bytes over its room of %llu", (unsigned long long)p->from,
			      (unsigned long long)p->to, len, (unsigned long long)room);
	if (!rc) {
		h = dws_xrealloc(h, (size_t)room);
		memset(h + len, ' ', (size_t)room - len);
		for (int i = 0; i < 8; i++)
			h[i] = (char)((room - 8) >> (8 * i));
		struct out w = {.fd = p->fd, .buf = (unsigned char *)h, .blen = (size_t)room};
		rc = out_flush(&w, err);
	}
	free(h);
	return rc;
}

static int open_data(const char *tmpdir, int *fd, dws_error *err)
{
	if (!tmpdir || !*tmpdir)
		tmpdir = getenv("TMPDIR");
	if (!tmpdir || !*tmpdir)
		tmpdir = "/tmp";
	*fd = open(tmpdir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (*fd < 0)
		return dws_fail(err, DWS_EIO, "patch file: an unnamed file in %s: %s", tmpdir, strerror(errno));
	return DWS_OK;
}

/* The slots the chain's files name, each once (*n of them). */
static size_t *chain_slots(const dws_layout *L, const dws_lazy_chain *lc, size_t *n)
{
	bool *seen = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(bool));
	size_t *out = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(size_t)), k = 0;
	for (size_t f = 0; f < lc->nfiles; f++)
		for (size_t i = 0; i < lc->files[f].np; i++) {
			size_t sl = lc->files[f].ps[i].slot;
			if (sl < L->nslots && !seen[sl]) {
				seen[sl] = true;
				out[k++] = sl;
			}
		}
	free(seen);
	*n = k;
	return out;
}

/* The data of the patch into o, after room for its header (*room). */
static int make_data(struct out *o, dws_lazy_chain *lc, dws_step *from, dws_step *to, uint64_t *room,
		     dws_error *err)
{
	const dws_layout *L = dws_step_layout(to);
	size_t n = L->nslots, *slots = lc ? chain_slots(L, lc, &n) : NULL;
	int rc = header_room(L, slots, n, room, err);
	free(slots);
	if (rc)
		return rc;
	o->off = *room;
	o->buf = dws_xmalloc(WINDOW);
	rc = lc ? from_chain(o, lc, err) : from_whole(o, from, to, err);
	if (!rc)
		rc = out_flush(o, err);
	return rc;
}

/* from: built, or NULL when the patch is made from the chain alone (step
 * number fs). */
static int make(dws_builder *bl, uint64_t fs, dws_step *from, dws_step *to, const char *tmpdir, bool chain_only,
		dws_patchfile **out, dws_error *err)
{
	*out = NULL;
	uint64_t ts = dws_step_number(to);
	if (fs >= ts)
		return dws_fail(err, DWS_EINVAL, "patch from step %llu to step %llu: the first must come before the second",
				(unsigned long long)fs, (unsigned long long)ts);
	dws_lazy_chain *lc = NULL;
	int rc = DWS_OK;
	if (!from || dws_layout_same(dws_step_layout(from), dws_step_layout(to)))
		rc = dws_builder_span(bl, to, fs, &lc, err);
	if (!rc && !lc && chain_only)
		rc = dws_fail(err, DWS_EUNSUP, "patch %llu-%llu: not within one chain of deltas", (unsigned long long)fs,
			      (unsigned long long)ts);
	struct out o = {.fd = -1};
	if (!rc)
		rc = open_data(tmpdir, &o.fd, err);
	uint64_t room = 0;
	if (!rc)
		rc = make_data(&o, lc, from, to, &room, err);
	dws_lazy_chain_free(lc);
	dws_patchfile *p = dws_xcalloc(1, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->from = fs;
	p->to = ts;
	p->fd = o.fd;
	p->size = o.off;
	p->changed = o.changed;
	p->sparse = o.sparse;
	p->dense = o.dense;
	if (!rc)
		rc = write_header(p, &o, room, err);
	for (size_t i = 0; i < o.n; i++)
		free(o.e[i].name);
	free(o.e);
	free(o.buf);
	if (rc) {
		dws_patchfile_unref(p);
		return rc;
	}
	*out = p;
	return DWS_OK;
}

int dws_patchfile_make(dws_builder *bl, dws_step *from, dws_step *to, const char *tmpdir, bool chain_only,
		       dws_patchfile **out, dws_error *err)
{
	return make(bl, dws_step_number(from), from, to, tmpdir, chain_only, out, err);
}

int dws_patchfile_make_chain(dws_builder *bl, uint64_t from, dws_step *to, const char *tmpdir, dws_patchfile **out,
			     dws_error *err)
{
	return make(bl, from, NULL, to, tmpdir, true, out, err);
}

uint64_t dws_patchfile_size(const dws_patchfile *p) { return p->size; }
int dws_patchfile_fd(const dws_patchfile *p) { return p->fd; }
uint64_t dws_patchfile_changed(const dws_patchfile *p) { return p->changed; }

int64_t dws_patchfile_read(dws_patchfile *p, uint64_t off, void *buf, size_t len, dws_error *err)
{
	if (off >= p->size)
		return 0;
	if (len > p->size - off)
		len = (size_t)(p->size - off);
	unsigned char *dst = buf;
	for (size_t done = 0; done < len;) {
		ssize_t r = pread(p->fd, dst + done, len - done, (off_t)(off + done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return dws_fail(err, DWS_EIO, "patch %llu-%llu: read: %s", (unsigned long long)p->from,
					(unsigned long long)p->to, r < 0 ? strerror(errno) : "short");
		done += (size_t)r;
	}
	return (int64_t)len;
}

/* The unnamed file linked at tmp (same filesystem), or -1. */
static int link_at(dws_patchfile *p, const char *tmp)
{
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", p->fd);
	if (linkat(AT_FDCWD, proc, AT_FDCWD, tmp, AT_SYMLINK_FOLLOW) != 0)
		return -1;
	if (chmod(tmp, 0644) != 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

int dws_patchfile_write(dws_patchfile *p, const char *path, dws_error *err)
{
	char *tmp = dws_xasprintf("%s.tmp.%ld", path, (long)getpid());
	if (link_at(p, tmp) == 0) {
		int rc = rename(tmp, path) == 0 ? DWS_OK : dws_fail(err, DWS_EIO, "%s: %s", path, strerror(errno));
		if (rc)
			unlink(tmp);
		free(tmp);
		return rc;
	}
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		int rc = dws_fail(err, DWS_EIO, "%s: %s", tmp, strerror(errno));
		free(tmp);
		return rc;
	}
	int rc = DWS_OK;
	unsigned char *buf = dws_xmalloc(WINDOW);
	for (uint64_t off = 0, size = dws_patchfile_size(p); off < size && !rc;) {
		int64_t n = dws_patchfile_read(p, off, buf, WINDOW, err);
		if (n <= 0) {
			rc = n < 0 ? (int)n : dws_fail(err, DWS_EIO, "%s: short patch", path);
			break;
		}
		for (int64_t w = 0; w < n && !rc;) {
			ssize_t k = write(fd, buf + w, (size_t)(n - w));
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0)
				rc = dws_fail(err, DWS_EIO, "%s: write: %s", tmp, k < 0 ? strerror(errno) : "no progress");
			else
				w += k;
		}
		off += (uint64_t)n;
	}
	free(buf);
	if (close(fd) != 0 && !rc)
		rc = dws_fail(err, DWS_EIO, "%s: close: %s", tmp, strerror(errno));
	if (!rc && rename(tmp, path) != 0)
		rc = dws_fail(err, DWS_EIO, "%s: %s", path, strerror(errno));
	if (rc)
		unlink(tmp);
	free(tmp);
	return rc;
}

dws_patchfile *dws_patchfile_ref(dws_patchfile *p)
{
	if (p)
		atomic_fetch_add(&p->refs, 1);
	return p;
}

void dws_patchfile_unref(dws_patchfile *p)
{
	if (!p || atomic_fetch_sub(&p->refs, 1) != 1)
		return;
	if (p->fd >= 0)
		close(p->fd);
	free(p);
}

int dws_patch_write(dws_builder *bl, uint64_t from, uint64_t to, const char *path, uint64_t *changed,
		    dws_error *err)
{
	dws_step *f = NULL, *t = NULL;
	dws_patchfile *p = NULL;
	int rc = from < to ? dws_builder_build(bl, from, &f, err)
			   : dws_fail(err, DWS_EINVAL, "patch from step %llu to step %llu: the first must come before the second",
				      (unsigned long long)from, (unsigned long long)to);
	if (!rc)
		rc = dws_builder_build(bl, to, &t, err);
	if (!rc)
	{
		/* made beside its place, it is linked there: no copy */
		char *dir = dws_xstrdup(path), *slash = strrchr(dir, '/');
		if (slash)
			slash[slash == dir] = '\0';
		rc = dws_patchfile_make(bl, f, t, slash ? dir : ".", false, &p, err);
		free(dir);
	}
	if (!rc)
		rc = dws_patchfile_write(p, path, err);
	if (!rc && changed)
		*changed = dws_patchfile_changed(p);
	dws_patchfile_unref(p);
	dws_step_unref(f);
	dws_step_unref(t);
	return rc;
}
