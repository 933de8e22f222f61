/* What the XOR formats' readers share (see format.h): version numbers,
 * versions, payload headers checked against their listed sizes, manifests
 * read whole, checksum names and torch dtypes. */
#include "format.h"

#include <stdlib.h>
#include <string.h>

bool dws_parse_version(const char *s, size_t len, size_t width, uint64_t *out)
{
	if (len < width || len > 19 || (len > width && s[0] == '0'))
		return false;
	uint64_t v = 0;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	if (v > INT64_MAX)
		return false;
	*out = v;
	return true;
}

bool dws_key_version(const char *key, const char *pre, const char *suf, size_t width, uint64_t *version)
{
	size_t n = strlen(key), pl = strlen(pre), sl = strlen(suf);
	if (n <= pl + sl || strncmp(key, pre, pl) || strcmp(key + n - sl, suf))
		return false;
	return dws_parse_version(key + pl, n - pl - sl, width, version);
}

/* ---- versions ---- */

dws_xver *dws_xver_new(uint64_t version, const char *folder, const dws_object *index, size_t nrecs)
{
	dws_xver *v = dws_xcalloc(1, sizeof(*v));
	atomic_init(&v->refs, 1);
	v->version = version;
	v->folder = dws_xstrdup(folder);
	v->recs = dws_xcalloc(nrecs ? nrecs : 1, sizeof(*v->recs));
	v->objs = dws_xcalloc(1, sizeof(*v->objs));
	v->objs[0] = *index;
	v->objs[0].key = dws_xstrdup(index->key);
	v->nobjs = 1;
	return v;
}

size_t dws_xver_add_obj(dws_xver *v, const dws_object *o)
{
	for (size_t i = 1; i < v->nobjs; i++)
		if (!strcmp(v->objs[i].key, o->key))
			return i;
	v->objs = dws_xrealloc(v->objs, (v->nobjs + 1) * sizeof(*v->objs));
	v->objs[v->nobjs] = *o;
	v->objs[v->nobjs].key = dws_xstrdup(o->key);
	return v->nobjs++;
}

dws_xver *dws_xver_ref(dws_xver *v)
{
	if (v)
		atomic_fetch_add(&v->refs, 1);
	return v;
}

void dws_xver_unref(dws_xver *v)
{
	if (!v || atomic_fetch_sub(&v->refs, 1) != 1)
		return;
	for (size_t i = 0; i < v->nrecs; i++) {
		free(v->recs[i].name);
		free(v->recs[i].shape);
	}
	dws_objects_free(v->objs, v->nobjs);
	free(v->recs);
	free(v->folder);
	free(v);
}

/* ---- reading a listing ---- */

const dws_object *dws_xload_find(const dws_object *objs, size_t n, const char *key)
{
	size_t lo = 0, hi = n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(objs[mid].key, key);
		if (!c)
			return &objs[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

int dws_xload_object(const dws_xload *ld, const char *key, dws_object *out, dws_error *err)
{
	const dws_object *o = dws_xload_find(ld->objs, ld->nobjs, key);
	if (o) {
		*out = *o;
		out->key = dws_xstrdup(o->key);
		return DWS_OK;
	}
	if (!ld->head_missing)
		return DWS_ENOENT;
	return dws_bucket_head(ld->bucket, key, out, err);
}

dws_xstate dws_xload_header(dws_bucket *b, const dws_object *o, dws_st_file **st, dws_error *err)
{
	*st = NULL;
	dws_blob *blob = NULL;
	void *buf = NULL;
	dws_xstate state = DWS_XV_BAD;
	int rc = dws_bucket_open_blob(b, o, &blob, err);
	if (rc) {
		state = dws_code_transient(rc) ? DWS_XV_INCOMPLETE : DWS_XV_BAD;
		goto out;
	}
	const char *what = dws_blob_name(blob);
	uint64_t size = dws_blob_size(blob), hlen;
	unsigned char len8[8];
	/* shorter than its header: still being written */
	state = DWS_XV_INCOMPLETE;
	if (size < 8 || dws_blob_read(blob, 0, len8, 8, err))
		goto out;
	memcpy(&hlen, len8, 8);
	if (hlen > DWS_ST_MAX_HEADER) {
		state = DWS_XV_BAD;
		dws_fail(err, DWS_EFORMAT, "%s: header length %llu is over the %u byte cap", what, (unsigned long long)hlen,
			 DWS_ST_MAX_HEADER);
		goto out;
	}
	if (size < 8 + hlen)
		goto out;
	buf = dws_xmalloc((size_t)(8 + hlen));
	const dws_read_hint direct = {DWS_READ_DIRECT, UINT64_MAX};
	if (dws_blob_read_hint(blob, 0, buf, (size_t)(8 + hlen), &direct, err))
		goto out;
	state = DWS_XV_BAD;
	if (dws_st_parse(buf, (size_t)(8 + hlen), DWS_ST_SIZE_UNKNOWN, what, st, NULL, err))
		goto out;
	uint64_t want = dws_st_data_start(*st) + dws_st_data_end(*st);
	if (size < want) {
		state = DWS_XV_INCOMPLETE;
	} else if (size > want) {
		dws_fail(err, DWS_EFORMAT, "%s: %llu bytes past the end of its last tensor", what,
			 (unsigned long long)(size - want));
	} else {
		state = DWS_XV_OK;
	}
out:
	if (state != DWS_XV_OK) {
		dws_st_free(*st);
		*st = NULL;
	}
	free(buf);
	dws_blob_unref(blob);
	return state;
}

static int json_text(dws_bucket *b, const dws_object *o, size_t cap, char **text, dws_error *err)
{
	*text = NULL;
	dws_blob *blob = NULL;
	int rc = dws_bucket_open_blob(b, o, &blob, err);
	if (rc)
		return rc;
	void *data = NULL;
	size_t len = 0;
	if (dws_blob_size(blob) > cap)
		rc = dws_fail(err, DWS_EFORMAT, "%s: %llu bytes, more than the %zu a manifest may take", dws_blob_name(blob),
			      (unsigned long long)dws_blob_size(blob), cap);
	else
		rc = dws_blob_slurp(blob, cap, &data, &len, err);
	dws_blob_unref(blob);
	if (rc)
		return rc;
	char *t = dws_xmalloc(len + 1);
	memcpy(t, data, len);
	t[len] = 0;
	free(data);
	if (strlen(t) != len) {
		free(t);
		return dws_fail(err, DWS_EFORMAT, "%s/%s: holds a NUL byte: not JSON", dws_bucket_uri(b), o->key);
	}
	*text = t;
	return DWS_OK;
}

json_t *dws_xload_json(dws_bucket *b, const dws_object *o, size_t cap, const char *what, dws_xfound *out,
		       dws_error *err)
{
	char *text = NULL;
	int rc = json_text(b, o, cap, &text, err);
	out->state = rc && dws_code_transient(rc) ? DWS_XV_INCOMPLETE : DWS_XV_BAD;
	json_t *j = NULL;
	if (!rc) {
		json_error_t je;
		j = json_loads(text, JSON_REJECT_DUPLICATES, &je);
		if (!j)
			dws_fail(err, DWS_EFORMAT, "%s: not JSON: %s (line %d)", what, je.text, je.line);
	}
	free(text);
	return j;
}

void dws_xfound_finish(dws_xfound *out, dws_xver *v, const dws_error *err)
{
	if (out->state == DWS_XV_OK) {
		out->v = v;
		return;
	}
	out->code = dws_code_of(err, DWS_EFORMAT);
	snprintf(out->error, sizeof(out->error), "%s", err->msg);
	dws_xver_unref(v);
}

/* ---- checksums and dtypes ---- */

static const struct {
	const char *name;
	dws_xsum sum;
	size_t hex;
} sums[] = {
	{"xxh3-128", DWS_XSUM_XXH3_128, 32},
	{"sha256", DWS_XSUM_SHA256, 64},
	{"adler32", DWS_XSUM_ADLER32, 8},
	{"blake3", DWS_XSUM_BLAKE3, 64},
};

const char *dws_xsum_name(dws_xsum s)
{
	for (size_t i = 0; i < DWS_ARRAY_LEN(sums); i++)
		if (sums[i].sum == s)
			return sums[i].name;
	return "none";
}

int dws_xsum_parse(const char *s, const char *want, dws_xsum *out, const char *what, dws_error *err)
{
	for (size_t i = 0; s && i < DWS_ARRAY_LEN(sums); i++) {
		if (strcmp(s, sums[i].name))
			continue;
		size_t n = want ? strlen(want) : 0;
		bool hex = n == sums[i].hex;
		for (size_t k = 0; hex && k < n; k++)
			hex = (want[k] >= '0' && want[k] <= '9') || (want[k] >= 'a' && want[k] <= 'f');
		if (!hex)
			return dws_fail(err, DWS_EFORMAT, "%s: checksum '%.70s' is not %zu lowercase hex digits (%s)", what,
					want ? want : "", sums[i].hex, s);
		*out = sums[i].sum;
		return DWS_OK;
	}
	return dws_fail(err, DWS_EUNSUP, "%s: unknown checksum algorithm '%.32s' (dwsfs knows xxh3-128, sha256, adler32, blake3)",
			what, s ? s : "");
}

dws_dtype dws_dtype_from_torch(const char *s)
{
	static const struct {
		const char *name;
		dws_dtype dt;
	} t[] = {
		{"bfloat16", DWS_DT_BF16}, {"float16", DWS_DT_F16}, {"float32", DWS_DT_F32}, {"float64", DWS_DT_F64},
		{"half", DWS_DT_F16}, {"float", DWS_DT_F32}, {"double", DWS_DT_F64},
		{"int8", DWS_DT_I8}, {"uint8", DWS_DT_U8}, {"int16", DWS_DT_I16}, {"uint16", DWS_DT_U16},
		{"int32", DWS_DT_I32}, {"uint32", DWS_DT_U32}, {"int64", DWS_DT_I64}, {"uint64", DWS_DT_U64},
		{"bool", DWS_DT_BOOL}, {"float8_e4m3fn", DWS_DT_F8_E4M3}, {"float8_e5m2", DWS_DT_F8_E5M2},
	};
	for (size_t i = 0; s && i < DWS_ARRAY_LEN(t); i++)
		if (!strcmp(s, t[i].name))
			return t[i].dt;
	return DWS_DT_INVALID;
}
