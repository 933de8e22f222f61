/* Applying a SkyRL or miles version (see xorapply.h and the spec,
 * xor-delta-formats.md).
 *
 * Each tensor a version names is handled a window at a time: the previous
 * version's bytes of the window are read from the step (its source and its
 * patch runs), the payload's next bytes decompressed beside them (never past
 * the tensor's length), the new bytes made in place, hashed for the
 * producer's checksum, and, for a BF16 tensor, the elements whose bytes
 * differ kept as one sorted patch run: a 1% change costs 1% of the tensor
 * in memory, and reads, merges and catch-up patches treat it like a TRL
 * delta's run. A tensor of another dtype is kept whole in memory (patch runs
 * hold BF16 values only). Tensors go on two threads, one window each. */
#include "xorapply.h"
#include "tensorsum.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

enum { WINDOW = 128u << 10 }; /* bytes: a window and its XOR stay in L2 */

struct job {
	const dws_xrec *r;
	size_t slot;
};

struct xwork {
	const dws_xapply *a;
	const dws_layout *L;
	struct job *jobs;
	size_t njobs;
	dws_blob **blobs;     /* per object of the version (0, the index: NULL) */
	atomic_size_t next;
	atomic_bool stop;
	pthread_mutex_t lock;
	dws_error err;        /* the first failure */
	char what[640];       /* "URI/delta-00000005: version 5" */
};

/* One thread's buffers. */
struct worker {
	ZSTD_DCtx *dctx;
	unsigned char *old;   /* the window: old bytes, then new */
	unsigned char *x;     /* its XOR */
	unsigned char *frame; /* the tensor's compressed payload */
	size_t frame_cap;
	bool ended;           /* the frame's end was decoded */
};

/* The elements that changed, growing as windows find them. */
struct changes {
	uint32_t *idx;
	uint16_t *val;
	uint64_t n, cap;
};

static void changes_push(struct changes *c, uint64_t e, uint16_t v)
{
	if (c->n == c->cap) {
		c->cap = c->cap ? c->cap * 2 : 4096;
		c->idx = dws_xrealloc(c->idx, c->cap * sizeof(*c->idx));
		c->val = dws_xrealloc(c->val, c->cap * sizeof(*c->val));
	}
	c->idx[c->n] = (uint32_t)e;
	c->val[c->n++] = v;
}

/* ---- decompression, bounded by the tensor ---- */

/* Exactly n more bytes of the frame into dst. */
static int frame_fill(struct xwork *w, struct worker *k, const dws_xrec *r, ZSTD_inBuffer *in, void *dst, size_t n,
		      dws_error *err)
{
	ZSTD_outBuffer out = {dst, n, 0};
	while (out.pos < out.size) {
		size_t before_in = in->pos, before_out = out.pos;
		size_t z = ZSTD_decompressStream(k->dctx, &out, in);
		if (ZSTD_isError(z))
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': zstd: %s", w->what, r->name, ZSTD_getErrorName(z));
		k->ended = z == 0;
		if (out.pos < out.size && (z == 0 || (in->pos == before_in && out.pos == before_out)))
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': the payload %s before the tensor's %llu bytes",
					w->what, r->name, z == 0 ? "ends" : "is cut off", (unsigned long long)r->nbytes);
	}
	return DWS_OK;
}

/* The frame, all of it output, must end here and be the whole payload. */
static int frame_end(struct xwork *w, struct worker *k, const dws_xrec *r, ZSTD_inBuffer *in, const char *bound,
		     dws_error *err)
{
	while (!k->ended) {
		unsigned char one;
		ZSTD_outBuffer out = {&one, 1, 0};
		size_t before = in->pos;
		size_t z = ZSTD_decompressStream(k->dctx, &out, in);
		if (ZSTD_isError(z))
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': zstd: %s", w->what, r->name, ZSTD_getErrorName(z));
		if (out.pos)
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': the payload decompresses past %s", w->what, r->name, bound);
		k->ended = z == 0;
		if (!k->ended && in->pos == before)
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': the payload's zstd frame is cut off", w->what, r->name);
	}
	if (in->pos != in->size)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': %zu bytes after the payload's zstd frame", w->what, r->name,
				in->size - in->pos);
	return DWS_OK;
}

/* overwrite: u32 K, K u32 byte offsets, K bytes; as keys (offset << 32 |
 * position), sorted, so a window takes its entries in order and a later
 * entry for one byte wins. */
struct overwrite {
	uint64_t *keys;
	unsigned char *vals;
	uint64_t n, at;
	unsigned char *buf;
};

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static int overwrite_read(struct xwork *w, struct worker *k, const dws_xrec *r, uint64_t nbytes, ZSTD_inBuffer *in,
			  struct overwrite *ow, dws_error *err)
{
	uint32_t K;
	int rc = frame_fill(w, k, r, in, &K, 4, err);
	if (rc)
		return rc;
	if (K > nbytes)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': %u overwritten bytes, more than its %llu", w->what, r->name,
				K, (unsigned long long)nbytes);
	ow->n = K;
	ow->buf = dws_xmalloc((size_t)K * 5 + 1);
	rc = frame_fill(w, k, r, in, ow->buf, (size_t)K * 5, err);
	char bound[64];
	snprintf(bound, sizeof(bound), "its %u entries", K);
	if (!rc)
		rc = frame_end(w, k, r, in, bound, err);
	if (rc)
		return rc;
	ow->vals = ow->buf + (size_t)K * 4;
	ow->keys = dws_xmalloc(((size_t)K + 1) * sizeof(uint64_t));
	for (uint64_t i = 0; i < K; i++) {
		uint32_t off;
		memcpy(&off, ow->buf + 4 * i, 4);
		if (off >= nbytes)
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': overwrite offset %u is past its %llu bytes", w->what,
					r->name, off, (unsigned long long)nbytes);
		ow->keys[i] = (uint64_t)off << 32 | i;
	}
	qsort(ow->keys, (size_t)K, sizeof(uint64_t), cmp_u64);
	return DWS_OK;
}

/* ---- one window ---- */

/* old ^= x over n bytes; for a BF16 tensor, each element that changed
 * (from element e0 on) into c. */
static void xor_window(unsigned char *old, const unsigned char *x, size_t n, bool bf16, uint64_t e0, struct changes *c)
{
	if (!bf16) {
		for (size_t i = 0; i < n; i++)
			old[i] ^= x[i];
		return;
	}
	for (size_t b = 0; b < n; b += 64) {
		size_t m = n - b < 64 ? n - b : 64;
		uint64_t any = 0, q;
		for (size_t i = 0; i + 8 <= m; i += 8) {
			memcpy(&q, x + b + i, 8);
			any |= q;
		}
		for (size_t i = m & ~(size_t)7; i < m; i++)
			any |= x[b + i];
		if (!any)
			continue; /* most of a 1% change */
		for (size_t i = b; i < b + m; i += 2) {
			uint16_t xv, ov;
			memcpy(&xv, x + i, 2);
			if (!xv)
				continue;
			memcpy(&ov, old + i, 2);
			ov ^= xv;
			memcpy(old + i, &ov, 2);
			changes_push(c, e0 + i / 2, ov);
		}
	}
}

/* The overwrite entries inside bytes [b0, b0+n) onto old. */
static void overwrite_window(struct overwrite *ow, unsigned char *old, uint64_t b0, size_t n, bool bf16,
			     struct changes *c)
{
	while (ow->at < ow->n && (ow->keys[ow->at] >> 32) < b0 + n) {
		uint64_t off = ow->keys[ow->at] >> 32, el = off & ~(uint64_t)1;
		uint16_t before = 0, after;
		if (bf16)
			memcpy(&before, old + (el - b0), 2);
		/* every entry of this element (a BF16 element: both its bytes) */
		while (ow->at < ow->n && ((ow->keys[ow->at] >> 32) & (bf16 ? ~(uint64_t)1 : ~(uint64_t)0)) ==
						 (bf16 ? el : off)) {
			uint64_t o = ow->keys[ow->at] >> 32;
			old[o - b0] = ow->vals[ow->keys[ow->at] & 0xffffffffu];
			ow->at++;
		}
		if (!bf16)
			continue;
		memcpy(&after, old + (el - b0), 2);
		if (after != before)
			changes_push(c, el / 2, after);
	}
}

/* ---- one tensor ---- */

static int read_frame(struct xwork *w, struct worker *k, const dws_xrec *r, dws_error *err)
{
	if (r->len > SIZE_MAX - 1)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': payload of %llu bytes", w->what, r->name, (unsigned long long)r->len);
	if (r->len > k->frame_cap) {
		free(k->frame);
		k->frame_cap = (size_t)r->len;
		k->frame = dws_xmalloc(k->frame_cap);
	}
	int rc = dws_blob_read(w->blobs[r->obj], r->off, k->frame, (size_t)r->len, err);
	if (rc)
		return rc;
	unsigned long long cs = ZSTD_getFrameContentSize(k->frame, (size_t)r->len);
	if (r->enc == DWS_XENC_XOR && cs != ZSTD_CONTENTSIZE_UNKNOWN && cs != ZSTD_CONTENTSIZE_ERROR && cs != r->nbytes)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': the payload says it holds %llu bytes, the tensor has %llu",
				w->what, r->name, cs, (unsigned long long)r->nbytes);
	ZSTD_DCtx_reset(k->dctx, ZSTD_reset_session_only);
	k->ended = false;
	return DWS_OK;
}

/* The new tensor's checksum against the producer's. */
static int check_sum(struct xwork *w, const dws_xrec *r, dws_tsum *sum, const char *whose, dws_error *err)
{
	if (!sum)
		return DWS_OK;
	char got[65];
	dws_tsum_final(sum, got);
	if (strcmp(got, r->want))
		return dws_fail(err, DWS_EVERIFY, "%s: tensor '%s': checksum mismatch: %s of the result is %s, the %s says %s",
				w->what, r->name, dws_xsum_name(r->sum), got, whose, r->want);
	return DWS_OK;
}

/* The windows of one tensor: old bytes, the payload, new bytes. */
static int tensor_windows(struct xwork *w, struct worker *k, const struct job *j, ZSTD_inBuffer *in,
			  struct overwrite *ow, struct changes *c, unsigned char *whole, dws_tsum *sum, dws_error *err)
{
	const dws_slot *sl = &w->L->slots[j->slot];
	const dws_xrec *r = j->r;
	bool bf16 = whole == NULL;
	for (uint64_t b0 = 0; b0 < r->nbytes && !atomic_load(&w->stop); b0 += WINDOW) {
		size_t n = r->nbytes - b0 < WINDOW ? (size_t)(r->nbytes - b0) : WINDOW;
		int64_t got = dws_step_read(w->a->s, sl->file, sl->off + b0, k->old, n, err);
		if (got != (int64_t)n)
			return got < 0 ? (int)got : dws_fail(err, DWS_EIO, "%s: tensor '%s': short read of its old bytes", w->what, r->name);
		if (r->enc == DWS_XENC_XOR) {
			int rc = frame_fill(w, k, r, in, k->x, n, err);
			if (rc)
				return rc;
			xor_window(k->old, k->x, n, bf16, b0 / 2, c);
		} else {
			overwrite_window(ow, k->old, b0, n, bf16, c);
		}
		dws_tsum_update(sum, k->old, n);
		if (whole)
			memcpy(whole + b0, k->old, n);
	}
	return atomic_load(&w->stop) ? DWS_EIO : DWS_OK;
}

static int apply_one(struct xwork *w, struct worker *k, const struct job *j, dws_error *err)
{
	const dws_slot *sl = &w->L->slots[j->slot];
	const dws_xrec *r = j->r;
	bool bf16 = sl->dtype == DWS_DT_BF16 && sl->numel <= UINT32_MAX;
	int rc = read_frame(w, k, r, err);
	ZSTD_inBuffer in = {k->frame, (size_t)r->len, 0};
	struct overwrite ow = {0};
	if (!rc && r->enc == DWS_XENC_OVERWRITE)
		rc = overwrite_read(w, k, r, r->nbytes, &in, &ow, err);
	struct changes c = {0};
	unsigned char *whole = bf16 || rc ? NULL : dws_xmalloc(r->nbytes ? (size_t)r->nbytes : 1);
	dws_tsum *sum = w->a->verify ? dws_tsum_new(r->sum) : NULL;
	if (!rc)
		rc = tensor_windows(w, k, j, &in, &ow, &c, whole, sum, err);
	if (!rc && r->enc == DWS_XENC_XOR) {
		char bound[64];
		snprintf(bound, sizeof(bound), "the tensor's %llu bytes", (unsigned long long)r->nbytes);
		rc = frame_end(w, k, r, &in, bound, err);
	}
	if (!rc)
		rc = check_sum(w, r, sum, r->dtype == DWS_DT_INVALID ? "index" : "manifest", err);
	else
		dws_tsum_free(sum);
	free(ow.keys);
	free(ow.buf);
	if (!rc && whole) {
		char *name = dws_xasprintf("%s: %s", w->a->xv->folder, sl->name);
		dws_blob *b = dws_blob_from_memory(name, whole, (size_t)r->nbytes);
		free(name);
		whole = NULL;
		w->a->put(w->a->pctx, j->slot, NULL, b);
	} else if (!rc && c.n) {
		c.idx = dws_xrealloc(c.idx, c.n * sizeof(*c.idx));
		c.val = dws_xrealloc(c.val, c.n * sizeof(*c.val));
		w->a->put(w->a->pctx, j->slot, dws_patch_new_owned(c.idx, c.val, (uint32_t)c.n), NULL);
		c.idx = NULL;
		c.val = NULL;
	}
	free(whole);
	free(c.idx);
	free(c.val);
	return rc;
}

static void *worker_main(void *v)
{
	struct xwork *w = v;
	struct worker k = {ZSTD_createDCtx(), dws_xmalloc(WINDOW), dws_xmalloc(WINDOW), NULL, 0, false};
	if (!k.dctx)
		abort(); /* out of memory */
	for (size_t i; !atomic_load(&w->stop) && (i = atomic_fetch_add(&w->next, 1)) < w->njobs;) {
		dws_error e = {0};
		if (apply_one(w, &k, &w->jobs[i], &e) == DWS_OK)
			continue;
		pthread_mutex_lock(&w->lock);
		if (!w->err.code && !atomic_load(&w->stop))
			w->err = e;
		atomic_store(&w->stop, true);
		pthread_mutex_unlock(&w->lock);
	}
	ZSTD_freeDCtx(k.dctx);
	free(k.old);
	free(k.x);
	free(k.frame);
	return NULL;
}

/* ---- the version's records against the model ---- */

static int check_record(struct xwork *w, const dws_xrec *r, size_t *slot, uint8_t *seen, dws_error *err)
{
	uint64_t numel;
	if (r->sum == DWS_XSUM_BLAKE3 && w->a->verify)
		return dws_fail(err, DWS_EUNSUP, "%s: tensor '%s': checksum blake3: dwsfs cannot check it (no BLAKE3 library in Debian 12); take it unchecked with -o verify=none (dwsctl --verify none)",
				w->what, r->name);
	if (w->a->resolve(w->a->rctx, r->name, slot, &numel) != 0)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is not in the base model", w->what, r->name);
	const dws_slot *sl = &w->L->slots[*slot];
	if (seen[*slot])
		return dws_fail(err, DWS_EFORMAT, "%s: two records name tensor '%s'", w->what, sl->name);
	seen[*slot] = 1;
	uint64_t bytes = sl->numel * dws_dtype_size(sl->dtype); /* the layout's: checked when parsed */
	if (r->dtype != DWS_DT_INVALID && r->dtype != sl->dtype)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is %s, the base model's is %s", w->what, r->name,
				dws_dtype_name(r->dtype), dws_dtype_name(sl->dtype));
	if (r->dtype != DWS_DT_INVALID &&
	    (r->ndim != sl->ndim || memcmp(r->shape, sl->shape, sl->ndim * sizeof(uint64_t))))
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' has another shape than the base model's", w->what, r->name);
	if (r->nbytes && r->nbytes != bytes)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is %llu bytes, the base model's %llu", w->what, r->name,
				(unsigned long long)r->nbytes, (unsigned long long)bytes);
	return DWS_OK;
}

/* The work of version a->xv: its records resolved and checked, its
 * payload objects open. */
static int plan(struct xwork *w, const dws_xapply *a, dws_xrec *fixed, dws_error *err)
{
	w->a = a;
	w->L = dws_step_layout(a->s);
	snprintf(w->what, sizeof(w->what), "%s/%s: version %llu", dws_bucket_uri(a->bucket), a->xv->folder,
		 (unsigned long long)a->xv->version);
	w->jobs = dws_xcalloc(a->xv->nrecs ? a->xv->nrecs : 1, sizeof(*w->jobs));
	w->blobs = dws_xcalloc(a->xv->nobjs, sizeof(*w->blobs));
	uint8_t *seen = dws_xcalloc(w->L->nslots ? w->L->nslots : 1, 1);
	int rc = DWS_OK;
	for (size_t i = 0; i < a->xv->nrecs && !rc; i++) {
		fixed[i] = a->xv->recs[i];
		rc = check_record(w, &fixed[i], &w->jobs[i].slot, seen, err);
		const dws_slot *sl = rc ? NULL : &w->L->slots[w->jobs[i].slot];
		if (sl) /* miles says no length: the base's */
			fixed[i].nbytes = sl->numel * dws_dtype_size(sl->dtype);
		w->jobs[i].r = &fixed[i];
		w->njobs = i + 1;
	}
	for (size_t i = 1; i < a->xv->nobjs && !rc; i++)
		rc = dws_bucket_open_blob(a->bucket, &a->xv->objs[i], &w->blobs[i], err);
	if (!rc && a->xv->full)
		for (size_t i = 0; i < w->L->nslots && !rc; i++)
			if (!seen[i])
				rc = dws_fail(err, DWS_EFORMAT, "%s: a full version lacks tensor '%s' of the base model", w->what,
					      w->L->slots[i].name);
	free(seen);
	return rc;
}

static void unplan(struct xwork *w)
{
	for (size_t i = 0; w->blobs && i < w->a->xv->nobjs; i++)
		dws_blob_unref(w->blobs[i]);
	free(w->blobs);
	free(w->jobs);
}

int dws_xver_apply(const dws_xapply *a, dws_error *err)
{
	struct xwork w = {0};
	dws_xrec *fixed = dws_xcalloc(a->xv->nrecs ? a->xv->nrecs : 1, sizeof(*fixed));
	int rc = plan(&w, a, fixed, err);
	if (!rc) {
		atomic_init(&w.next, 0);
		atomic_init(&w.stop, false);
		pthread_mutex_init(&w.lock, NULL);
		pthread_t t;
		bool two = w.njobs > 1 && pthread_create(&t, NULL, worker_main, &w) == 0;
		worker_main(&w);
		if (two)
			pthread_join(t, NULL);
		pthread_mutex_destroy(&w.lock);
		if (w.err.code)
			rc = dws_fail(err, w.err.code, "%s", w.err.msg);
	}
	unplan(&w);
	free(fixed);
	return rc;
}

/* A full version's tensor bytes against its checksum. */
static int check_plain(struct xwork *w, const dws_xrec *r, dws_error *err)
{
	dws_tsum *sum = dws_tsum_new(r->sum);
	if (!sum)
		return DWS_OK;
	unsigned char *buf = dws_xmalloc(WINDOW);
	int rc = DWS_OK;
	for (uint64_t b0 = 0; b0 < r->nbytes && !rc; b0 += WINDOW) {
		size_t n = r->nbytes - b0 < WINDOW ? (size_t)(r->nbytes - b0) : WINDOW;
		rc = dws_blob_read(w->blobs[r->obj], r->off + b0, buf, n, err);
		dws_tsum_update(sum, buf, n);
	}
	free(buf);
	if (rc) {
		dws_tsum_free(sum);
		return rc;
	}
	return check_sum(w, r, sum, "index", err);
}

int dws_xver_apply_full(const dws_xapply *a, dws_error *err)
{
	struct xwork w = {0};
	dws_xrec *fixed = dws_xcalloc(a->xv->nrecs ? a->xv->nrecs : 1, sizeof(*fixed));
	int rc = plan(&w, a, fixed, err);
	for (size_t i = 0; i < w.njobs && !rc; i++) {
		const dws_xrec *r = w.jobs[i].r;
		if (r->len != r->nbytes) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is %llu bytes in its shard, the base model's %llu", w.what,
				      r->name, (unsigned long long)r->len, (unsigned long long)r->nbytes);
			break;
		}
		if (a->verify)
			rc = check_plain(&w, r, err);
		dws_src src = {w.blobs[r->obj], r->off, r->dtype};
		if (!rc)
			dws_step_set_source(a->s, w.jobs[i].slot, &src, true);
	}
	unplan(&w);
	free(fixed);
	return rc;
}
