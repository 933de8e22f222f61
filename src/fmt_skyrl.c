/* SkyRL's checkpoint-delta sync folders (spec: xor-delta-formats.md):
 * delta-%08d/manifest.json, written last, names the payload files (plain
 * safetensors files of U8 entries, each a zstd frame) and one record per
 * changed tensor. A version is read here into a dws_xver: every field is
 * checked, every payload's header read against its listed size. */
#include "format.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

enum { MANIFEST_CAP = 64u << 20, MAX_PAYLOADS = 65536 };

static const char pre[] = "delta-", suf[] = "/manifest.json";

static bool skyrl_is_index(const char *key, uint64_t *version)
{
	return dws_key_version(key, pre, suf, 8, version);
}

static char *skyrl_index_key(uint64_t version)
{
	return dws_xasprintf("%s%08llu%s", pre, (unsigned long long)version, suf);
}

/* An integer field >= 0 of a JSON object. */
static int get_count(json_t *o, const char *key, uint64_t *out, const char *what, dws_error *err)
{
	json_t *v = json_object_get(o, key);
	if (!json_is_integer(v) || json_integer_value(v) < 0)
		return dws_fail(err, DWS_EFORMAT, "%s: '%s' is missing or not a count", what, key);
	*out = (uint64_t)json_integer_value(v);
	return DWS_OK;
}

static const char *get_str(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* A payload file name: one plain component (the producer's are
 * delta-rank00000-file000000.safetensors). */
static bool name_ok(const char *s)
{
	return s && *s && strlen(s) < 256 && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

struct sk_read {
	const dws_xload *ld;
	dws_xver *v;
	dws_xfound *out;
	char what[600];
	dws_st_file **st;   /* per payload object (index 1..) */
	json_t *files;      /* payload_files */
};

/* The payload files the manifest lists: each there, its header read. */
static int read_payloads(struct sk_read *r, dws_error *err)
{
	size_t i;
	json_t *f;
	if (!json_is_array(r->files) || json_array_size(r->files) > MAX_PAYLOADS)
		return dws_fail(err, DWS_EFORMAT, "%s: 'payload_files' is missing or not a list of names", r->what);
	r->st = dws_xcalloc(json_array_size(r->files) + 1, sizeof(*r->st));
	json_array_foreach(r->files, i, f) {
		const char *name = json_is_string(f) ? json_string_value(f) : NULL;
		if (!name_ok(name))
			return dws_fail(err, DWS_EFORMAT, "%s: payload file '%.64s' is not a plain file name", r->what,
					name ? name : "(not a string)");
		char *key = dws_xasprintf("%s/%s", r->v->folder, name);
		dws_object o = {0};
		int rc = dws_xload_object(r->ld, key, &o, err);
		free(key);
		if (rc == DWS_ENOENT || (rc && dws_code_transient(rc))) {
			r->out->state = DWS_XV_INCOMPLETE;
			free(o.key);
			return rc;
		}
		if (rc)
			return rc;
		size_t k = dws_xver_add_obj(r->v, &o);
		free(o.key);
		if (k != r->v->nobjs - 1)
			return dws_fail(err, DWS_EFORMAT, "%s: payload file '%s' is listed twice", r->what, name);
		dws_xstate s = dws_xload_header(r->ld->bucket, &r->v->objs[k], &r->st[k], err);
		if (s != DWS_XV_OK) {
			r->out->state = s;
			return s == DWS_XV_BAD ? dws_code_of(err, DWS_EFORMAT) : DWS_ENOENT;
		}
		r->v->payload_bytes += r->v->objs[k].size;
	}
	return DWS_OK;
}

/* The dtype and shape of a record, against its byte length. */
static int rec_shape(struct sk_read *r, json_t *t, dws_xrec *x, dws_error *err)
{
	const char *dt = get_str(t, "dtype");
	x->dtype = dws_dtype_from_torch(dt);
	if (x->dtype == DWS_DT_INVALID)
		return dws_fail(err, DWS_EUNSUP, "%s: tensor '%s': unknown dtype '%.32s'", r->what, x->name, dt ? dt : "");
	json_t *shape = json_object_get(t, "shape"), *d;
	if (!json_is_array(shape) || json_array_size(shape) > 16)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': 'shape' is not a list of at most 16 sizes", r->what, x->name);
	x->ndim = (uint32_t)json_array_size(shape);
	x->shape = dws_xcalloc(x->ndim ? x->ndim : 1, sizeof(uint64_t));
	uint64_t numel = 1, bytes;
	size_t i;
	json_array_foreach(shape, i, d) {
		if (!json_is_integer(d) || json_integer_value(d) < 0 || !dws_mul_ok(numel, (uint64_t)json_integer_value(d), &numel))
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': shape holds a bad size", r->what, x->name);
		x->shape[i] = (uint64_t)json_integer_value(d);
	}
	if (!dws_mul_ok(numel, dws_dtype_size(x->dtype), &bytes) || bytes != x->nbytes)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': uncompressed_num_bytes %llu is not its shape's %s bytes",
				r->what, x->name, (unsigned long long)x->nbytes, dws_dtype_name(x->dtype));
	return DWS_OK;
}

/* Record i of 'tensors' into v->recs[i]. */
static int read_record(struct sk_read *r, size_t i, json_t *t, dws_strmap *names, dws_error *err)
{
	dws_xrec *x = &r->v->recs[i];
	r->v->nrecs = i + 1;
	const char *name = get_str(t, "name");
	if (!json_is_object(t) || !name || !*name || strlen(name) > 1024)
		return dws_fail(err, DWS_EFORMAT, "%s: tensors[%zu] has no name", r->what, i);
	x->name = dws_xstrdup(name);
	size_t dup;
	if (dws_strmap_get(names, x->name, &dup))
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is listed twice", r->what, x->name);
	dws_strmap_put(names, x->name, i);
	int rc = get_count(t, "uncompressed_num_bytes", &x->nbytes, r->what, err);
	if (!rc)
		rc = get_count(t, "compressed_num_bytes", &x->len, r->what, err);
	if (!rc)
		rc = rec_shape(r, t, x, err);
	if (rc)
		return rc;
	const char *file = get_str(t, "payload_file"), *key = get_str(t, "payload_key");
	if (!key || strcmp(key, x->name))
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': payload_key '%.64s' is not its name", r->what, x->name,
				key ? key : "");
	x->obj = 0;
	for (size_t k = 1; file && k < r->v->nobjs && !x->obj; k++)
		if (!strcmp(r->v->objs[k].key + strlen(r->v->folder) + 1, file))
			x->obj = k;
	if (!x->obj)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': payload_file '%.64s' is not in payload_files", r->what,
				x->name, file ? file : "");
	const dws_st_tensor *e = dws_st_find(r->st[x->obj], key);
	if (!e || e->dtype != DWS_DT_U8 || e->ndim != 1 || e->numel != x->len)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s': %s holds no U8[%llu] entry of that name", r->what, x->name,
				file, (unsigned long long)x->len);
	x->off = dws_st_data_start(r->st[x->obj]) + e->begin;
	x->enc = DWS_XENC_XOR;
	/* a record of the first producers carries 'sha256' alone */
	const char *alg = get_str(t, "checksum_algorithm"), *want = get_str(t, "checksum");
	if (!want && get_str(t, "sha256")) {
		want = get_str(t, "sha256");
		alg = alg ? alg : "sha256";
	}
	char tw[700];
	snprintf(tw, sizeof(tw), "%s: tensor '%s'", r->what, x->name);
	rc = dws_xsum_parse(alg ? alg : "xxh3-128", want, &x->sum, tw, err);
	if (!rc)
		snprintf(x->want, sizeof(x->want), "%s", want);
	return rc;
}

/* The manifest's own fields, then its records. */
static int read_manifest(struct sk_read *r, json_t *m, dws_error *err)
{
	uint64_t version, base, tu, tc, su = 0, sc = 0;
	if (!json_is_object(m))
		return dws_fail(err, DWS_EFORMAT, "%s: not a JSON object", r->what);
	int rc = get_count(m, "version", &version, r->what, err);
	if (!rc)
		rc = get_count(m, "base_version", &base, r->what, err);
	if (rc)
		return rc;
	if (version != r->v->version || base + 1 != version)
		return dws_fail(err, DWS_EFORMAT, "%s: version %llu, base_version %llu: in %s they must be %llu and %llu",
				r->what, (unsigned long long)version, (unsigned long long)base, r->v->folder,
				(unsigned long long)r->v->version, (unsigned long long)r->v->version - 1);
	rc = get_count(m, "total_uncompressed_num_bytes", &tu, r->what, err);
	if (!rc)
		rc = get_count(m, "total_compressed_num_bytes", &tc, r->what, err);
	if (rc)
		return rc;
	r->files = json_object_get(m, "payload_files");
	rc = read_payloads(r, err);
	if (rc)
		return rc;
	json_t *tensors = json_object_get(m, "tensors"), *t;
	if (!json_is_array(tensors))
		return dws_fail(err, DWS_EFORMAT, "%s: 'tensors' is missing or not a list", r->what);
	size_t n = json_array_size(tensors), i;
	r->v->recs = dws_xrealloc(r->v->recs, (n ? n : 1) * sizeof(*r->v->recs));
	memset(r->v->recs, 0, (n ? n : 1) * sizeof(*r->v->recs));
	dws_strmap names;
	dws_strmap_init(&names);
	json_array_foreach(tensors, i, t) {
		rc = read_record(r, i, t, &names, err);
		if (rc)
			break;
		su += r->v->recs[i].nbytes; /* each bounded by a file, or by 2^64 / 16 dims: no wrap in practice */
		sc += r->v->recs[i].len;
	}
	dws_strmap_free(&names);
	if (!rc && (su != tu || sc != tc))
		rc = dws_fail(err, DWS_EFORMAT, "%s: totals %llu/%llu bytes do not add up to its tensors' %llu/%llu", r->what,
			      (unsigned long long)tu, (unsigned long long)tc, (unsigned long long)su, (unsigned long long)sc);
	return rc;
}

static void skyrl_read(const dws_xload *ld, const dws_object *index, uint64_t version, dws_xfound *out)
{
	char folder[32];
	snprintf(folder, sizeof(folder), "%s%08llu", pre, (unsigned long long)version);
	struct sk_read r = {.ld = ld, .out = out};
	r.v = dws_xver_new(version, folder, index, 0);
	snprintf(r.what, sizeof(r.what), "%s/%s: version %llu", dws_bucket_uri(ld->bucket), index->key,
		 (unsigned long long)version);
	dws_error err = {0};
	json_t *m = dws_xload_json(ld->bucket, index, MANIFEST_CAP, r.what, out, &err);
	if (m && read_manifest(&r, m, &err) == DWS_OK)
		out->state = DWS_XV_OK;
	for (size_t k = 1; r.st && k < r.v->nobjs; k++)
		dws_st_free(r.st[k]);
	free(r.st);
	json_decref(m);
	dws_xfound_finish(out, r.v, &err);
}

const struct dws_format_ops dws_fmt_skyrl = {
	.id = DWS_FORMAT_SKYRL,
	.name = "skyrl",
	.is_index = skyrl_is_index,
	.index_key = skyrl_index_key,
	.read = skyrl_read,
};
