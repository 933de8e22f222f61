/* Decoders for the sparse variants of the format spec. Every index is checked
 * (strictly ascending, inside the tensor) before anything is merged. */
#include "delta.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dwsfs reads little-endian safetensors data in place"
#endif

void dws_delta_free(dws_delta_param *p, size_t n)
{
	if (!p)
		return;
	for (size_t i = 0; i < n; i++)
		if (!p[i].pooled)
			free(p[i].idx);
	free(p);
}

static bool ends_with(const char *s, const char *suf, size_t *stem)
{
	size_t n = strlen(s), m = strlen(suf);
	if (n <= m || strcmp(s + n - m, suf) != 0)
		return false;
	*stem = n - m;
	return true;
}

static const dws_st_tensor *find_stem(const dws_st_file *st, const char *stem,
				      size_t stem_len, const char *suf)
{
	char *name = dws_xasprintf("%.*s%s", (int)stem_len, stem, suf);
	const dws_st_tensor *t = dws_st_find(st, name);
	free(name);
	return t;
}

static int check_1d(const dws_st_tensor *t, dws_dtype want, const char *what,
		    dws_error *err)
{
	if (t->dtype != want)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' has dtype %s, expected %s", what, t->name,
				dws_dtype_name(t->dtype), dws_dtype_name(want));
	if (t->ndim != 1)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' has a bad shape: %u dimensions, expected 1", what, t->name, t->ndim);
	return DWS_OK;
}

int dws_idx_order_fail(const dws_delta_param *p, uint64_t k, uint64_t last, const char *what, dws_error *err)
{
	int32_t v;
	memcpy(&v, p->idx_raw + 4 * k, 4);
	return dws_fail(err, DWS_EFORMAT, "%s: indices of '%.*s' are not ascending (%lld after %lld at position %llu)", what,
			p->name_len, p->name, (long long)v, (long long)(int64_t)last, (unsigned long long)k);
}

int dws_idx_range_fail(const dws_delta_param *p, uint64_t ix, uint64_t numel, const char *what, dws_error *err)
{
	return dws_fail(err, DWS_EFORMAT, "%s: index %llu of '%.*s' is out of range (the tensor has %llu elements)", what,
			(unsigned long long)ix, p->name_len, p->name, (unsigned long long)numel);
}

/* Entries [0, n) of an index tensor of a constant kind into idx: true, or
 * false at the first that does not ascend (*at: its position). */
static inline bool decode_kind(int kind, const unsigned char *raw, uint64_t n, uint32_t *idx, uint64_t *last,
			       uint64_t *at)
{
	uint64_t l = UINT64_MAX, ix;
	for (uint64_t k = 0; k < n; k++) {
		if (!dws_idx_entry(kind, raw, k, l, &ix)) {
			*at = k;
			*last = l;
			return false;
		}
		idx[k] = (uint32_t)ix;
		l = ix;
	}
	*last = l;
	return true;
}

/* Fill p->idx from its index tensor, every entry checked: ascending, and
 * (the last one) inside the tensor. */
static int decode_idx(dws_delta_param *p, uint64_t numel, uint32_t *pool, const char *what, dws_error *err)
{
	uint64_t n = p->count, last, at;
	p->pooled = pool != NULL;
	p->idx = pool ? pool : dws_big_alloc((n ? n : 1) * sizeof(uint32_t));
	bool ok = p->idx_kind == DWS_IDX_GAP16   ? decode_kind(DWS_IDX_GAP16, p->idx_raw, n, p->idx, &last, &at)
		  : p->idx_kind == DWS_IDX_GAP32 ? decode_kind(DWS_IDX_GAP32, p->idx_raw, n, p->idx, &last, &at)
						 : decode_kind(DWS_IDX_I32, p->idx_raw, n, p->idx, &last, &at);
	if (!ok)
		return dws_idx_order_fail(p, at, last, what, err);
	/* indices fit 64 bits (n < 2^32 gaps of < 2^32 each): the last one
	 * inside the tensor puts them all there */
	if (n && last >= numel)
		return dws_idx_range_fail(p, last, numel, what, err);
	return DWS_OK;
}

static int expect_count(const dws_st_file *st, const char *key, uint64_t got,
			const char *what, dws_error *err)
{
	const char *s = dws_st_meta_get(st, key);
	uint64_t want;
	if (!s)
		return DWS_OK;
	if (!dws_parse_u64(s, &want))
		return dws_fail(err, DWS_EFORMAT, "%s: metadata %s '%.32s' is not a number", what, key, s);
	if (want != got)
		return dws_fail(err, DWS_EFORMAT, "%s: count mismatch: metadata %s is %llu but the file holds %llu", what, key,
				(unsigned long long)want, (unsigned long long)got);
	return DWS_OK;
}

uint64_t dws_delta_value_count(const dws_st_file *st, dws_variant v)
{
	const char *vsuf = v == DWS_VAR_V1 ? ".values" : ".val";
	size_t vl = strlen(vsuf);
	uint64_t total = 0;
	for (size_t i = 0; i < dws_st_count(st); i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		size_t nl = strlen(t->name);
		if (nl > vl && strcmp(t->name + nl - vl, vsuf) == 0)
			total += t->numel;
	}
	return total;
}

int dws_delta_decode(const dws_st_file *st, const unsigned char *data,
		     uint64_t data_len, dws_variant v, const char *what,
		     dws_resolve_fn resolve, void *ctx, dws_delta_param **out,
		     size_t *nout, dws_error *err)
{
	return dws_delta_decode_pool(st, data, data_len, v, what, resolve, ctx, NULL, out, nout, err);
}

/* A walk over a sparse file's tensors: what it checks against, and how far. */
struct walk {
	const dws_st_file *st;
	const unsigned char *data;
	dws_variant v;
	const char *what;
	dws_resolve_fn resolve;
	void *ctx;
	uint32_t *pool;     /* where decoded indices go (NULL: their own arrays) */
	uint64_t pool_used;
	bool scan;          /* every check but the index values: nothing decoded */
	const char *isuf, *vsuf;
	json_t *listed;     /* v1: changed_params */
	dws_strmap listed_set;
};

static int delta_walk(struct walk *w, dws_delta_param **out, size_t *nout, dws_error *err);

int dws_delta_decode_pool(const dws_st_file *st, const unsigned char *data,
			  uint64_t data_len, dws_variant v, const char *what,
			  dws_resolve_fn resolve, void *ctx, uint32_t *pool,
			  dws_delta_param **out, size_t *nout, dws_error *err)
{
	(void)data_len; /* the parser already bounded every tensor by it */
	struct walk w = {.st = st, .data = data, .v = v, .what = what, .resolve = resolve, .ctx = ctx, .pool = pool};
	return delta_walk(&w, out, nout, err);
}

int dws_delta_scan(const dws_st_file *st, const unsigned char *data,
		   uint64_t data_len, dws_variant v, const char *what,
		   dws_resolve_fn resolve, void *ctx, dws_delta_param **out,
		   size_t *nout, dws_error *err)
{
	(void)data_len;
	struct walk w = {.st = st, .data = data, .v = v, .what = what, .resolve = resolve, .ctx = ctx, .scan = true};
	return delta_walk(&w, out, nout, err);
}

/* The tensor name suffixes of w's variant. */
static int walk_suffixes(struct walk *w, dws_error *err)
{
	switch (w->v) {
	case DWS_VAR_V1:
		w->isuf = ".indices";
		w->vsuf = ".values";
		return DWS_OK;
	case DWS_VAR_RAW:
	case DWS_VAR_GAP_DELTA:
		w->isuf = ".idx";
		w->vsuf = ".val";
		return DWS_OK;
	case DWS_VAR_NVCOMP:
		return dws_fail(err, DWS_EUNSUP, "%s: encoding nvcomp_cascaded is a GPU-only compressed stream; dwsfs cannot decode it (publish with encoding raw or gap_delta)", w->what);
	default:
		return dws_fail(err, DWS_EINVAL, "%s: not a sparse file", w->what);
	}
}

/* v1: metadata changed_params, a list of names each with both tensors. */
static int walk_listed(struct walk *w, dws_error *err)
{
	const char *cp = dws_st_meta_get(w->st, "changed_params");
	json_error_t je;
	w->listed = cp ? json_loads(cp, JSON_REJECT_DUPLICATES, &je) : NULL;
	if (!json_is_array(w->listed))
		return dws_fail(err, DWS_EFORMAT, "%s: metadata changed_params is not a JSON list of names", w->what);
	size_t i;
	json_t *e;
	json_array_foreach(w->listed, i, e) {
		if (!json_is_string(e))
			return dws_fail(err, DWS_EFORMAT, "%s: metadata changed_params holds a non-string", w->what);
		const char *name = json_string_value(e);
		size_t sl = strlen(name);
		if (!find_stem(w->st, name, sl, w->isuf) || !find_stem(w->st, name, sl, w->vsuf))
			return dws_fail(err, DWS_EFORMAT, "%s: changed param '%s' is missing its %s or %s tensor", w->what, name,
					w->isuf, w->vsuf);
		dws_strmap_put(&w->listed_set, name, i);
	}
	return DWS_OK;
}

/* The dtypes and counts of a values tensor t and its index tensor ti. */
static int walk_check_pair(struct walk *w, const dws_st_tensor *t, const dws_st_tensor *ti, size_t stem,
			   dws_error *err)
{
	if (w->listed) {
		char *pn = dws_xasprintf("%.*s", (int)stem, t->name);
		size_t k;
		bool found = dws_strmap_get(&w->listed_set, pn, &k);
		free(pn);
		if (!found)
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is not listed in changed_params", w->what, t->name);
	}
	int rc = check_1d(t, DWS_DT_BF16, w->what, err);
	if (rc)
		return rc;
	if (w->v == DWS_VAR_GAP_DELTA) {
		if (ti->dtype != DWS_DT_U16 && ti->dtype != DWS_DT_U32)
			return dws_fail(err, DWS_EFORMAT, "%s: gap_delta index '%s' has dtype %s, expected U16 or U32", w->what,
					ti->name, dws_dtype_name(ti->dtype));
		rc = check_1d(ti, ti->dtype, w->what, err);
	} else {
		rc = check_1d(ti, DWS_DT_I32, w->what, err);
	}
	if (rc)
		return rc;
	if (ti->numel != t->numel)
		return dws_fail(err, DWS_EFORMAT, "%s: count mismatch for '%.*s': %llu indices but %llu values", w->what,
				(int)stem, t->name, (unsigned long long)ti->numel, (unsigned long long)t->numel);
	return DWS_OK;
}

/* The param of values tensor t (index tensor ti) into *p: resolved to the
 * model's tensor, its indices decoded unless scanning. */
static int walk_param(struct walk *w, const dws_st_tensor *t, const dws_st_tensor *ti, size_t stem,
		      dws_delta_param *p, dws_error *err)
{
	char *pname = dws_xasprintf("%.*s", (int)stem, t->name);
	uint64_t numel = 0;
	int r = w->resolve(w->ctx, pname, &p->slot, &numel);
	free(pname);
	if (r != 0)
		return dws_fail(err, DWS_EFORMAT, "%s: unknown tensor '%.*s': the model has no such parameter (trainer names that differ by a prefix need --map-prefix)",
				w->what, (int)stem, t->name);
	if (numel > (uint64_t)UINT32_MAX)
		return dws_fail(err, DWS_EUNSUP, "%s: tensor '%.*s' has %llu elements; patches support fewer than 2^32", w->what,
				(int)stem, t->name, (unsigned long long)numel);
	bool gaps = w->v == DWS_VAR_GAP_DELTA;
	p->name = t->name;
	p->name_len = (int)stem;
	p->count = t->numel;
	p->val = w->data + t->begin;
	p->idx_raw = w->data + ti->begin;
	p->idx_kind = !gaps ? DWS_IDX_I32 : ti->dtype == DWS_DT_U16 ? DWS_IDX_GAP16 : DWS_IDX_GAP32;
	if (w->scan)
		return DWS_OK;
	int rc = decode_idx(p, numel, w->pool ? w->pool + w->pool_used : NULL, w->what, err);
	w->pool_used += p->count;
	return rc;
}

/* Tensor i: one half of a pair; for the values half, its param into
 * ps[*np] (*np grows). */
static int walk_tensor(struct walk *w, size_t i, dws_delta_param *ps, size_t *np, dws_error *err)
{
	const dws_st_tensor *t = dws_st_at(w->st, i);
	size_t stem;
	bool is_val = ends_with(t->name, w->vsuf, &stem);
	if (!is_val && !ends_with(t->name, w->isuf, &stem))
		return dws_fail(err, DWS_EFORMAT, "%s: unknown tensor '%s' (neither %s nor %s)", w->what, t->name, w->isuf,
				w->vsuf);
	const dws_st_tensor *other = find_stem(w->st, t->name, stem, is_val ? w->isuf : w->vsuf);
	if (!other)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is missing its %s partner", w->what, t->name,
				is_val ? w->isuf : w->vsuf);
	if (!is_val)
		return DWS_OK;
	int rc = walk_check_pair(w, t, other, stem, err);
	if (!rc)
		rc = walk_param(w, t, other, stem, &ps[*np], err);
	if (ps[*np].name) /* filled in, even if its decoding failed: freed with the rest */
		(*np)++;
	return rc;
}

/* The counts the metadata declares, against what the file holds. */
static int walk_counts(struct walk *w, const dws_delta_param *ps, size_t np, dws_error *err)
{
	uint64_t total = 0;
	for (size_t i = 0; i < np; i++)
		total += ps[i].count;
	if (w->listed && json_array_size(w->listed) != np)
		return dws_fail(err, DWS_EFORMAT, "%s: count mismatch: changed_params lists %zu params but the file holds %zu",
				w->what, json_array_size(w->listed), np);
	int rc = expect_count(w->st, "num_changed_params", np, w->what, err);
	if (!rc)
		rc = expect_count(w->st, "total_changed_elements", total, w->what, err);
	return rc;
}

/* Every check of the format except the index values themselves; unless
 * scanning, the indices are decoded (and checked) too. */
static int delta_walk(struct walk *w, dws_delta_param **out, size_t *nout, dws_error *err)
{
	size_t nt = dws_st_count(w->st), np = 0;
	dws_delta_param *ps = dws_xcalloc(nt ? nt : 1, sizeof(*ps));
	dws_strmap_init(&w->listed_set);
	int rc = walk_suffixes(w, err);
	if (!rc && w->v == DWS_VAR_V1)
		rc = walk_listed(w, err);
	for (size_t i = 0; i < nt && !rc; i++)
		rc = walk_tensor(w, i, ps, &np, err);
	if (!rc)
		rc = walk_counts(w, ps, np, err);
	dws_strmap_free(&w->listed_set);
	json_decref(w->listed);
	if (rc) {
		dws_delta_free(ps, np);
		return rc;
	}
	*out = ps;
	*nout = np;
	return DWS_OK;
}
