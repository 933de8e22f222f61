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

static int delta_walk(const dws_st_file *st, const unsigned char *data,
		      uint64_t data_len, dws_variant v, const char *what,
		      dws_resolve_fn resolve, void *ctx, uint32_t *pool, bool scan,
		      dws_delta_param **out, size_t *nout, dws_error *err);

int dws_delta_decode_pool(const dws_st_file *st, const unsigned char *data,
			  uint64_t data_len, dws_variant v, const char *what,
			  dws_resolve_fn resolve, void *ctx, uint32_t *pool,
			  dws_delta_param **out, size_t *nout, dws_error *err)
{
	return delta_walk(st, data, data_len, v, what, resolve, ctx, pool, false, out, nout, err);
}

int dws_delta_scan(const dws_st_file *st, const unsigned char *data,
		   uint64_t data_len, dws_variant v, const char *what,
		   dws_resolve_fn resolve, void *ctx, dws_delta_param **out,
		   size_t *nout, dws_error *err)
{
	return delta_walk(st, data, data_len, v, what, resolve, ctx, NULL, true, out, nout, err);
}

/* Every check of the format except the index values themselves; unless
 * scanning, the indices are decoded (and checked) too. */
static int delta_walk(const dws_st_file *st, const unsigned char *data,
		      uint64_t data_len, dws_variant v, const char *what,
		      dws_resolve_fn resolve, void *ctx, uint32_t *pool, bool scan,
		      dws_delta_param **out, size_t *nout, dws_error *err)
{
	uint64_t pool_used = 0;
	(void)data_len; /* the parser already bounded every tensor by it */
	size_t nt = dws_st_count(st);
	dws_delta_param *ps = dws_xcalloc(nt, sizeof(*ps));
	size_t np = 0;
	int rc = DWS_OK;
	const char *isuf, *vsuf;
	json_t *listed = NULL;
	dws_strmap listed_set;
	dws_strmap_init(&listed_set);

	switch (v) {
	case DWS_VAR_V1:
		isuf = ".indices";
		vsuf = ".values";
		break;
	case DWS_VAR_RAW:
	case DWS_VAR_GAP_DELTA:
		isuf = ".idx";
		vsuf = ".val";
		break;
	case DWS_VAR_NVCOMP:
		rc = dws_fail(err, DWS_EUNSUP, "%s: encoding nvcomp_cascaded is a GPU-only compressed stream; dwsfs cannot decode it (publish with encoding raw or gap_delta)", what);
		goto out;
	default:
		rc = dws_fail(err, DWS_EINVAL, "%s: not a sparse file", what);
		goto out;
	}

	if (v == DWS_VAR_V1) {
		const char *cp = dws_st_meta_get(st, "changed_params");
		json_error_t je;
		listed = cp ? json_loads(cp, JSON_REJECT_DUPLICATES, &je) : NULL;
		if (!json_is_array(listed)) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: metadata changed_params is not a JSON list of names", what);
			goto out;
		}
		size_t i;
		json_t *e;
		json_array_foreach(listed, i, e) {
			if (!json_is_string(e)) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: metadata changed_params holds a non-string", what);
				goto out;
			}
			const char *name = json_string_value(e);
			size_t sl = strlen(name);
			if (!find_stem(st, name, sl, isuf) || !find_stem(st, name, sl, vsuf)) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: changed param '%s' is missing its %s or %s tensor", what, name, isuf, vsuf);
				goto out;
			}
			dws_strmap_put(&listed_set, name, i);
		}
	}

	/* every tensor must be one half of a pair */
	for (size_t i = 0; i < nt; i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		size_t stem;
		bool is_val = ends_with(t->name, vsuf, &stem);
		if (!is_val && !ends_with(t->name, isuf, &stem)) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: unknown tensor '%s' (neither %s nor %s)", what, t->name, isuf, vsuf);
			goto out;
		}
		const dws_st_tensor *other = find_stem(st, t->name, stem, is_val ? isuf : vsuf);
		if (!other) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is missing its %s partner", what, t->name, is_val ? isuf : vsuf);
			goto out;
		}
		if (!is_val)
			continue;
		const dws_st_tensor *ti = other;
		if (listed) {
			char *pn = dws_xasprintf("%.*s", (int)stem, t->name);
			size_t k;
			bool found = dws_strmap_get(&listed_set, pn, &k);
			free(pn);
			if (!found) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is not listed in changed_params", what, t->name);
				goto out;
			}
		}
		rc = check_1d(t, DWS_DT_BF16, what, err);
		if (rc)
			goto out;
		bool gaps = v == DWS_VAR_GAP_DELTA;
		if (gaps) {
			if (ti->dtype != DWS_DT_U16 && ti->dtype != DWS_DT_U32) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: gap_delta index '%s' has dtype %s, expected U16 or U32", what, ti->name,
					      dws_dtype_name(ti->dtype));
				goto out;
			}
			rc = check_1d(ti, ti->dtype, what, err);
		} else {
			rc = check_1d(ti, DWS_DT_I32, what, err);
		}
		if (rc)
			goto out;
		if (ti->numel != t->numel) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: count mismatch for '%.*s': %llu indices but %llu values", what, (int)stem, t->name,
				      (unsigned long long)ti->numel, (unsigned long long)t->numel);
			goto out;
		}
		dws_delta_param *p = &ps[np];
		char *pname = dws_xasprintf("%.*s", (int)stem, t->name);
		uint64_t numel = 0;
		int r = resolve(ctx, pname, &p->slot, &numel);
		free(pname);
		if (r != 0) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: unknown tensor '%.*s': the model has no such parameter (trainer names that differ by a prefix need --map-prefix)",
				      what, (int)stem, t->name);
			goto out;
		}
		if (numel > (uint64_t)UINT32_MAX) {
			rc = dws_fail(err, DWS_EUNSUP, "%s: tensor '%.*s' has %llu elements; patches support fewer than 2^32", what, (int)stem,
				      t->name, (unsigned long long)numel);
			goto out;
		}
		p->name = t->name;
		p->name_len = (int)stem;
		p->count = t->numel;
		p->val = data + t->begin;
		p->idx_raw = data + ti->begin;
		p->idx_kind = !gaps ? DWS_IDX_I32 : ti->dtype == DWS_DT_U16 ? DWS_IDX_GAP16 : DWS_IDX_GAP32;
		np++;
		if (scan)
			continue;
		rc = decode_idx(p, numel, pool ? pool + pool_used : NULL, what, err);
		pool_used += p->count;
		if (rc)
			goto out;
	}

	uint64_t total = 0;
	for (size_t i = 0; i < np; i++)
		total += ps[i].count;
	if (listed && json_array_size(listed) != np) {
		rc = dws_fail(err, DWS_EFORMAT, "%s: count mismatch: changed_params lists %zu params but the file holds %zu", what,
			      json_array_size(listed), np);
		goto out;
	}
	rc = expect_count(st, "num_changed_params", np, what, err);
	if (!rc)
		rc = expect_count(st, "total_changed_elements", total, what, err);
out:
	dws_strmap_free(&listed_set);
	json_decref(listed);
	if (rc) {
		dws_delta_free(ps, np);
		return rc;
	}
	*out = ps;
	*nout = np;
	return DWS_OK;
}
