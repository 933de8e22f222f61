/* dwsctl publish: the producer side. Compares two checkpoints and writes the
 * next step as a TRL-compatible sparse delta (v1, raw or gap_delta) or as a
 * dense BF16 anchor, plus metadata of our own that lets a reader detect
 * corruption (payload checksum), a missing step (parent step), a mixed run
 * (run id) and drift (state checksum of the whole model at this step). */
#include "digest.h"
#include "publish_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

typedef struct ck_tensor {
	char *name;
	dws_blob *blob;
	uint64_t off;
	dws_dtype dtype;
	uint64_t numel;
	uint32_t ndim;
	uint64_t shape[16];
} ck_tensor;

typedef struct ckpt {
	ck_tensor *t;
	size_t n;
	dws_strmap by_name;
} ckpt;

static void ckpt_free(ckpt *c)
{
	for (size_t i = 0; i < c->n; i++) {
		free(c->t[i].name);
		dws_blob_unref(c->t[i].blob);
	}
	free(c->t);
	dws_strmap_free(&c->by_name);
}

static int cmp_name(const void *a, const void *b)
{
	return strcmp(((const ck_tensor *)a)->name, ((const ck_tensor *)b)->name);
}

/* Garbage is named as such, not by what its first 8 bytes would mean as a
 * header length: a safetensors file starts with a length that fits the
 * file and the cap, then a JSON object. */
static int looks_like_safetensors(dws_blob *b, dws_error *err)
{
	unsigned char h[9];
	uint64_t size = dws_blob_size(b), hlen = 0;
	int rc = size >= sizeof(h) ? dws_blob_read(b, 0, h, sizeof(h), err) : DWS_OK;
	if (rc)
		return rc;
	for (int i = 7; i >= 0 && size >= sizeof(h); i--)
		hlen = hlen << 8 | h[i];
	if (size < sizeof(h) || h[8] != '{' || hlen < 2 || hlen > DWS_ST_MAX_HEADER || hlen > size - 8)
		return dws_fail(err, DWS_EFORMAT, "%s: not a safetensors file (%s)", dws_blob_name(b),
				size < sizeof(h) ? "shorter than a header" : h[8] != '{' ? "no JSON header after the 8-byte length"
											: "its header length does not fit the file");
	return DWS_OK;
}

static int ckpt_add_file(ckpt *c, dws_blob *b, dws_error *err)
{
	dws_st_file *st = NULL;
	int rc = looks_like_safetensors(b, err);
	if (!rc)
		rc = dws_st_read_blob(b, dws_blob_name(b), &st, err);
	if (rc)
		return rc;
	for (size_t i = 0; i < dws_st_count(st); i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		if (!dws_dtype_is_float(t->dtype))
			continue; /* buffers and integer tensors are not trained */
		c->t = dws_xrealloc(c->t, (c->n + 1) * sizeof(*c->t));
		ck_tensor *k = &c->t[c->n++];
		memset(k, 0, sizeof(*k));
		k->name = dws_xstrdup(t->name);
		k->blob = dws_blob_ref(b);
		k->off = dws_st_data_start(st) + t->begin;
		k->dtype = t->dtype;
		k->numel = t->numel;
		k->ndim = t->ndim;
		memcpy(k->shape, t->shape, t->ndim * sizeof(uint64_t));
	}
	dws_st_free(st);
	return DWS_OK;
}

/* A checkpoint: a model folder (every *.safetensors in it) or one file. */
static int ckpt_load(const char *path, ckpt *c, dws_error *err)
{
	memset(c, 0, sizeof(*c));
	dws_strmap_init(&c->by_name);
	struct stat st;
	if (stat(path, &st) != 0)
		return dws_fail(err, DWS_ENOENT, "%s: %s", path, strerror(errno));
	int rc = DWS_OK;
	if (S_ISREG(st.st_mode)) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return dws_fail(err, DWS_EIO, "%s: %s", path, strerror(errno));
		dws_blob *b = dws_blob_from_fd(path, fd, (uint64_t)st.st_size);
		rc = ckpt_add_file(c, b, err);
		dws_blob_unref(b);
	} else {
		dws_bucket *bk = NULL;
		dws_object *objs = NULL;
		size_t n = 0;
		rc = dws_bucket_open(path, &bk, err);
		if (!rc)
			rc = dws_bucket_list(bk, "", &objs, &n, err);
		for (size_t i = 0; !rc && i < n; i++) {
			size_t kl = strlen(objs[i].key);
			if (kl < 12 || strcmp(objs[i].key + kl - 12, ".safetensors") || strchr(objs[i].key, '/'))
				continue;
			dws_blob *b = NULL;
			rc = dws_bucket_open_blob(bk, &objs[i], &b, err);
			if (!rc)
				rc = ckpt_add_file(c, b, err);
			dws_blob_unref(b);
		}
		dws_objects_free(objs, n);
		dws_bucket_close(bk);
	}
	if (!rc && !c->n)
		rc = dws_fail(err, DWS_ENOENT, "%s: no floating-point tensors in any .safetensors file", path);
	if (rc) {
		ckpt_free(c);
		return rc;
	}
	qsort(c->t, c->n, sizeof(*c->t), cmp_name);
	for (size_t i = 0; i < c->n; i++) {
		size_t j;
		if (dws_strmap_get(&c->by_name, c->t[i].name, &j)) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' appears twice", path, c->t[i].name);
			ckpt_free(c);
			return rc;
		}
		dws_strmap_put(&c->by_name, c->t[i].name, i);
	}
	return DWS_OK;
}

/* Elements [e0, e0+n) of a tensor as BF16 (round to nearest even);
 * scratch holds n elements of 4 bytes. */
static int read_bf16(const ck_tensor *t, uint64_t e0, uint64_t n, uint16_t *out,
		     void *scratch, dws_error *err)
{
	size_t sz = dws_dtype_size(t->dtype);
	void *raw = t->dtype == DWS_DT_BF16 ? (void *)out : scratch;
	int rc = dws_blob_read(t->blob, t->off + e0 * sz, raw, n * sz, err);
	if (!rc)
		dws_to_bf16(t->dtype, raw, n, out);
	return rc;
}

enum { CH = 1 << 20 }; /* elements compared or copied at a time */

static void tick(const dws_progress *pr, const char *phase, uint64_t done, uint64_t total)
{
	if (pr && pr->fn)
		pr->fn(pr->ctx, phase, done, total);
}

/* Bytes of a checkpoint as BF16: what each pass over it reads. */
static uint64_t bf16_bytes(const ckpt *c)
{
	uint64_t n = 0;
	for (size_t i = 0; i < c->n; i++)
		n += c->t[i].numel * 2;
	return n;
}

struct digest_ctx {
	const ckpt *c;
	const dws_progress *pr;
	uint64_t done, total;
};

static int digest_bf16(void *ctx, size_t i, uint64_t e0, uint64_t n, uint16_t *out, void *scratch, dws_error *err)
{
	struct digest_ctx *d = ctx;
	int rc = read_bf16(&d->c->t[i], e0, n, out, scratch, err);
	d->done += n * 2;
	tick(d->pr, "checksum", d->done, d->total);
	return rc;
}

static int state_digest(const ckpt *c, const dws_progress *pr, uint64_t *out, dws_error *err)
{
	dws_digest_item *items = dws_xcalloc(c->n ? c->n : 1, sizeof(*items));
	for (size_t i = 0; i < c->n; i++)
		items[i] = (dws_digest_item){c->t[i].name, c->t[i].numel, i};
	struct digest_ctx d = {c, pr, 0, bf16_bytes(c)};
	int rc = dws_state_digest(items, c->n, digest_bf16, &d, out, err);
	free(items);
	return rc;
}

/* ---- output ---- */

typedef struct outbuf {
	char *p;
	size_t len, cap;
} outbuf;

static void ob_put(outbuf *o, const void *p, size_t n)
{
	if (o->len + n > o->cap) {
		o->cap = (o->len + n) * 2;
		o->p = dws_xrealloc(o->p, o->cap);
	}
	memcpy(o->p + o->len, p, n);
	o->len += n;
}

/* ---- metadata ---- */

typedef struct meta_list {
	dws_st_meta m[16];
	char *owned[16];
	size_t n;
} meta_list;

static void meta_add(meta_list *l, const char *k, char *v_owned)
{
	l->m[l->n] = (dws_st_meta){k, v_owned};
	l->owned[l->n++] = v_owned;
}

static void meta_free(meta_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->owned[i]);
}

static void common_meta(meta_list *l, const dws_publish_opts *o, bool sparse,
			uint64_t nparams, uint64_t changed, uint64_t total,
			const char *run_id, uint64_t state)
{
	meta_add(l, "format", dws_xstrdup("sparse_weight_patch"));
	meta_add(l, "version", dws_xstrdup("1"));
	meta_add(l, "sparse", dws_xstrdup(sparse ? "True" : "False"));
	meta_add(l, "model_version", dws_xasprintf("%llu", (unsigned long long)o->step));
	meta_add(l, "num_changed_params", dws_xasprintf("%llu", (unsigned long long)nparams));
	meta_add(l, "total_changed_elements", dws_xasprintf("%llu", (unsigned long long)changed));
	meta_add(l, "total_elements", dws_xasprintf("%llu", (unsigned long long)total));
	meta_add(l, "sparsity", dws_xasprintf("%.6f", total ? 1.0 - (double)changed / (double)total : 0.0));
	meta_add(l, "dwsfs.version", dws_xstrdup("1"));
	meta_add(l, "dwsfs.run_id", dws_xstrdup(run_id));
	if (o->parent_step >= 0)
		meta_add(l, "dwsfs.parent_step", dws_xasprintf("%lld", (long long)o->parent_step));
	meta_add(l, "dwsfs.state_xxh3", dws_xasprintf("%016llx", (unsigned long long)state));
}

/* ---- delta ---- */

typedef struct changes {
	uint32_t *idx;
	uint16_t *val;
	uint64_t n;
	bool wide_gap;
} changes;

static int diff_tensor(const ck_tensor *a, const ck_tensor *b, changes *ch,
		       dws_error *err)
{
	uint16_t *x = dws_xmalloc(CH * 2), *y = dws_xmalloc(CH * 2);
	void *scratch = dws_xmalloc(CH * 4);
	int rc = DWS_OK;
	uint64_t cap = 0;
	int64_t prev = -1;
	memset(ch, 0, sizeof(*ch));
	for (uint64_t e = 0; e < b->numel && !rc; e += CH) {
		uint64_t n = b->numel - e < CH ? b->numel - e : CH;
		rc = read_bf16(a, e, n, x, scratch, err);
		if (!rc)
			rc = read_bf16(b, e, n, y, scratch, err);
		for (uint64_t i = 0; !rc && i < n; i++) {
			if (x[i] == y[i])
				continue;
			if (ch->n == cap) {
				cap = cap ? cap * 2 : 1024;
				ch->idx = dws_xrealloc(ch->idx, cap * 4);
				ch->val = dws_xrealloc(ch->val, cap * 2);
			}
			uint64_t at = e + i;
			if ((int64_t)at - prev - 1 > 0xffff)
				ch->wide_gap = true;
			prev = (int64_t)at;
			ch->idx[ch->n] = (uint32_t)at;
			ch->val[ch->n++] = y[i];
		}
	}
	free(x);
	free(y);
	free(scratch);
	return rc;
}

static void shape_str(const ck_tensor *t, char *buf, size_t n)
{
	size_t l = (size_t)snprintf(buf, n, "[");
	for (uint32_t d = 0; d < t->ndim && l < n; d++)
		l += (size_t)snprintf(buf + l, n - l, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
	if (l < n)
		snprintf(buf + l, n - l, "]");
}

/* A delta says which elements of which tensors changed, nothing more: the
 * next checkpoint must hold the previous one's tensors, by name, dtype and
 * shape (a reshaped tensor was a delta of 0 elements, served in the old
 * shape). */
static int same_tensors(const dws_publish_opts *o, const ckpt *prev, const ckpt *next, dws_error *err)
{
	static const char fix[] = "a delta cannot change a tensor's name, dtype or shape: publish an anchor (--format anchor)";
	size_t j;
	for (size_t i = 0; i < prev->n; i++)
		if (!dws_strmap_get(&next->by_name, prev->t[i].name, &j))
			return dws_fail(err, DWS_EINVAL, "%s: tensor '%s' of the previous checkpoint is missing; %s", o->next,
					prev->t[i].name, fix);
	for (size_t i = 0; i < next->n; i++) {
		const ck_tensor *b = &next->t[i], *a;
		if (!dws_strmap_get(&prev->by_name, b->name, &j))
			return dws_fail(err, DWS_EINVAL, "%s: tensor '%s' is not in the previous checkpoint; %s", o->next, b->name, fix);
		a = &prev->t[j];
		if (a->dtype != b->dtype)
			return dws_fail(err, DWS_EINVAL, "%s: tensor '%s' has dtype %s, %s in the previous checkpoint; %s", o->next,
					b->name, dws_dtype_name(b->dtype), dws_dtype_name(a->dtype), fix);
		char sa[160], sb[160];
		shape_str(a, sa, sizeof(sa));
		shape_str(b, sb, sizeof(sb));
		if (strcmp(sa, sb))
			return dws_fail(err, DWS_EINVAL, "%s: tensor '%s' has shape %s, %s in the previous checkpoint; %s", o->next,
					b->name, sb, sa, fix);
	}
	return DWS_OK;
}

static int publish_delta(const dws_publish_opts *o, const ckpt *prev,
			 const ckpt *next, const char *run_id, uint64_t state,
			 dws_pubtarget *t, dws_pubout *of, uint64_t *changed_out, dws_error *err)
{
	uint64_t done = 0, all = bf16_bytes(next);
	int rc = DWS_OK;
	changes *chs = dws_xcalloc(next->n, sizeof(*chs));
	uint64_t total = 0, changed = 0, nparams = 0;
	rc = same_tensors(o, prev, next, err);
	for (size_t i = 0; i < next->n && !rc; i++) {
		const ck_tensor *b = &next->t[i];
		size_t j;
		total += b->numel;
		dws_strmap_get(&prev->by_name, b->name, &j);
		if (b->numel > (o->format == DWS_PUB_GAP_DELTA ? (uint64_t)UINT32_MAX + 1 : (uint64_t)INT32_MAX + 1)) {
			rc = dws_fail(err, DWS_EUNSUP, "%s: tensor '%s' is too large for %s indices", o->next, b->name,
				      o->format == DWS_PUB_GAP_DELTA ? "U32" : "I32");
			break;
		}
		rc = diff_tensor(&prev->t[j], b, &chs[i], err);
		done += b->numel * 2;
		tick(o->progress, "compare", done, all);
		changed += chs[i].n;
		nparams += chs[i].n > 0;
	}
	if (rc)
		goto out;

	/* data section: per changed param, index tensor then values */
	outbuf data = {0};
	dws_st_out_tensor *ts = dws_xcalloc(2 * nparams + 1, sizeof(*ts));
	char **names = dws_xcalloc(2 * nparams + 1, sizeof(char *));
	uint64_t *lens = dws_xcalloc(2 * nparams + 1, sizeof(uint64_t));
	size_t nt = 0;
	outbuf listed = {0};
	ob_put(&listed, "[", 1);
	const char *isuf = o->format == DWS_PUB_V1 ? ".indices" : ".idx";
	const char *vsuf = o->format == DWS_PUB_V1 ? ".values" : ".val";
	for (size_t i = 0; i < next->n; i++) {
		changes *c = &chs[i];
		if (!c->n)
			continue;
		const char *nm = next->t[i].name;
		if (listed.len > 1)
			ob_put(&listed, ",", 1);
		char *q = dws_xasprintf("\"%s\"", nm); /* names are JSON-safe: they came from a JSON header */
		ob_put(&listed, q, strlen(q));
		free(q);
		dws_dtype idt = DWS_DT_I32;
		size_t isz = 4;
		if (o->format == DWS_PUB_GAP_DELTA) {
			idt = c->wide_gap ? DWS_DT_U32 : DWS_DT_U16;
			isz = c->wide_gap ? 4 : 2;
			int64_t p = -1;
			for (uint64_t k = 0; k < c->n; k++) {
				uint32_t g = (uint32_t)((int64_t)c->idx[k] - p - 1);
				p = c->idx[k];
				if (isz == 2) {
					uint16_t h = (uint16_t)g;
					ob_put(&data, &h, 2);
				} else {
					ob_put(&data, &g, 4);
				}
			}
		} else {
			ob_put(&data, c->idx, c->n * 4);
		}
		lens[nt] = c->n;
		names[nt] = dws_xasprintf("%s%s", nm, isuf);
		ts[nt] = (dws_st_out_tensor){names[nt], idt, 1, &lens[nt], c->n * isz};
		nt++;
		ob_put(&data, c->val, c->n * 2);
		lens[nt] = c->n;
		names[nt] = dws_xasprintf("%s%s", nm, vsuf);
		ts[nt] = (dws_st_out_tensor){names[nt], DWS_DT_BF16, 1, &lens[nt], c->n * 2};
		nt++;
	}
	ob_put(&listed, "]", 2);
	meta_list ml = {0};
	common_meta(&ml, o, true, nparams, changed, total, run_id, state);
	if (o->format == DWS_PUB_V1)
		meta_add(&ml, "changed_params", dws_xstrdup(listed.p));
	else
		meta_add(&ml, "encoding", dws_xstrdup(o->format == DWS_PUB_RAW ? "raw" : "gap_delta"));
	meta_add(&ml, "dwsfs.payload_xxh3", dws_xasprintf("%016llx", (unsigned long long)dws_xxh3(data.p, data.len)));
	char *hdr = NULL;
	size_t hl = 0;
	rc = dws_st_build_header(ts, nt, ml.m, ml.n, &hdr, &hl, err);
	if (!rc)
		rc = dws_pubout_open(of, t, false, o->step, o->zstd, o->zstd_level, hl + data.len, err);
	if (!rc)
		rc = dws_pubout_write(of, hdr, hl, false, err);
	if (!rc)
		rc = dws_pubout_write(of, data.p, data.len, true, err);
	free(hdr);
	meta_free(&ml);
	for (size_t i = 0; i < nt; i++)
		free(names[i]);
	free(names);
	free(lens);
	free(ts);
	free(listed.p);
	free(data.p);
	*changed_out = changed;
out:
	for (size_t i = 0; i < next->n; i++) {
		free(chs[i].idx);
		free(chs[i].val);
	}
	free(chs);
	return rc;
}

/* ---- anchor ---- */

/* Stream every tensor as BF16 through fn (hashing or writing), saying so
 * as phase. */
static int stream_bf16(const ckpt *c, int (*fn)(void *ctx, const void *p, size_t n, dws_error *err),
		       void *ctx, const dws_progress *pr, const char *phase, dws_error *err)
{
	uint16_t *bf = dws_xmalloc(CH * 2);
	void *scratch = dws_xmalloc(CH * 4);
	int rc = DWS_OK;
	uint64_t done = 0, all = bf16_bytes(c);
	for (size_t i = 0; i < c->n && !rc; i++)
		for (uint64_t e = 0; e < c->t[i].numel && !rc; e += CH) {
			uint64_t n = c->t[i].numel - e < CH ? c->t[i].numel - e : CH;
			rc = read_bf16(&c->t[i], e, n, bf, scratch, err);
			if (!rc)
				rc = fn(ctx, bf, n * 2, err);
			done += n * 2;
			tick(pr, phase, done, all);
		}
	free(bf);
	free(scratch);
	return rc;
}

static int hash_sink(void *ctx, const void *p, size_t n, dws_error *err)
{
	(void)err;
	dws_xxh3_update(ctx, p, n);
	return DWS_OK;
}

static int file_sink(void *ctx, const void *p, size_t n, dws_error *err)
{
	return dws_pubout_write(ctx, p, n, false, err);
}

static int publish_anchor(const dws_publish_opts *o, const ckpt *next,
			  const char *run_id, uint64_t state, dws_pubtarget *t, dws_pubout *of,
			  uint64_t *changed_out, dws_error *err)
{
	XXH3_state_t *hs = XXH3_createState();
	XXH3_64bits_reset(hs);
	int rc = stream_bf16(next, hash_sink, hs, o->progress, "payload checksum", err);
	uint64_t payload = XXH3_64bits_digest(hs);
	XXH3_freeState(hs);
	if (rc)
		return rc;
	dws_st_out_tensor *ts = dws_xcalloc(next->n, sizeof(*ts));
	uint64_t total = 0;
	for (size_t i = 0; i < next->n; i++) {
		const ck_tensor *k = &next->t[i];
		ts[i] = (dws_st_out_tensor){k->name, DWS_DT_BF16, k->ndim, k->shape, k->numel * 2};
		total += k->numel;
	}
	meta_list ml = {0};
	common_meta(&ml, o, false, next->n, total, total, run_id, state);
	meta_add(&ml, "dwsfs.payload_xxh3", dws_xasprintf("%016llx", (unsigned long long)payload));
	char *hdr = NULL;
	size_t hl = 0;
	rc = dws_st_build_header(ts, next->n, ml.m, ml.n, &hdr, &hl, err);
	if (!rc)
		rc = dws_pubout_open(of, t, true, o->step, o->zstd, o->zstd_level, hl + total * 2, err);
	if (!rc)
		rc = dws_pubout_write(of, hdr, hl, false, err);
	if (!rc)
		rc = stream_bf16(next, file_sink, of, o->progress, "write", err);
	if (!rc)
		rc = dws_pubout_write(of, NULL, 0, true, err);
	free(hdr);
	free(ts);
	meta_free(&ml);
	*changed_out = total;
	return rc;
}

/* The run id and parent of the bucket's current run, for defaults. */
static void bucket_defaults(const char *dir, uint64_t step, char *run, size_t rl,
			    int64_t *parent)
{
	dws_bucket *b = NULL;
	dws_catalog *c = NULL;
	dws_error e = {0};
	*parent = -1;
	if (dws_bucket_open(dir, &b, &e) || dws_catalog_load(b, NULL, &c, &e)) {
		dws_bucket_close(b);
		return;
	}
	for (size_t i = 0; i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step >= step)
			break;
		*parent = (int64_t)f->step;
		if (f->run_id[0])
			snprintf(run, rl, "%s", f->run_id);
	}
	dws_catalog_free(c);
	dws_bucket_close(b);
}

void dws_publish_opts_init(dws_publish_opts *o)
{
	*o = (dws_publish_opts){.size = sizeof(*o), .parent_step = -1, .format = DWS_PUB_GAP_DELTA, .zstd_level = 3};
}

int dws_publish(const dws_publish_opts *in, char *written, size_t written_len,
		uint64_t *changed_out, dws_error *err)
{
	*changed_out = 0;
	if (dws_opts_size(in->size, sizeof(*in), "dws_publish_opts", err))
		return DWS_EINVAL;
	dws_publish_opts o = *in;
	ckpt prev = {0}, next = {0};
	dws_pubout of = {.fd = -1};
	dws_pubtarget t;
	char run[64] = "";
	int64_t parent = -1;
	if (!o.prev && o.format != DWS_PUB_ANCHOR)
		return dws_fail(err, DWS_EINVAL, "publish: a delta needs the previous checkpoint");
	if (!o.bucket)
		return dws_fail(err, DWS_EINVAL, "publish: no bucket to publish into");
	int rc = dws_pubtarget_open(o.bucket, o.step, o.force, &t, err);
	if (rc) {
		dws_pubtarget_close(&t);
		return rc;
	}
	bucket_defaults(o.bucket, o.step, run, sizeof(run), &parent);
	if (o.run_id)
		snprintf(run, sizeof(run), "%s", o.run_id);
	if (!run[0] || (o.format == DWS_PUB_ANCHOR && o.step <= 1 && !o.run_id)) {
		/* a first anchor starts a new run */
		unsigned char r[8];
		if (getrandom(r, sizeof(r), 0) != sizeof(r)) {
			dws_pubtarget_close(&t);
			return dws_fail(err, DWS_EIO, "publish: no random bytes for a run id");
		}
		snprintf(run, sizeof(run), "%02x%02x%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
		parent = -1;
	}
	if (o.parent_step < 0)
		o.parent_step = parent;
	rc = ckpt_load(o.next, &next, err);
	if (!rc && o.prev && o.format != DWS_PUB_ANCHOR)
		rc = ckpt_load(o.prev, &prev, err);
	uint64_t state = 0;
	if (!rc)
		rc = state_digest(&next, o.progress, &state, err);
	if (!rc)
		rc = o.format == DWS_PUB_ANCHOR ? publish_anchor(&o, &next, run, state, &t, &of, changed_out, err)
						 : publish_delta(&o, &prev, &next, run, state, &t, &of, changed_out, err);
	if (of.final && written)
		snprintf(written, written_len, "%s", of.final);
	int crc = of.key ? dws_pubout_close(&of, &t, rc == DWS_OK, o.progress, o.stop, err) : DWS_OK;
	dws_pubout_free(&of);
	dws_pubtarget_close(&t);
	ckpt_free(&next);
	if (prev.t || prev.by_name.cap)
		ckpt_free(&prev);
	return rc ? rc : crc;
}
