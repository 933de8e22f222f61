/* miles' disk-delta folders (spec: xor-delta-formats.md): weight_v%06d/
 * with model.safetensors.index.json (weight_map, metadata) and shards. A
 * delta version's shards hold U8 entries, each a zstd frame (encoding xor
 * or overwrite), their __metadata__ the resulting tensors' checksums; a
 * version whose metadata has no delta_encoding is a full checkpoint. Read
 * here into a dws_xver, every field and shard header checked. */
#include "format.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

enum { INDEX_CAP = 64u << 20, MAX_SHARDS = 65536 };

static const char pre[] = "weight_v", suf[] = "/model.safetensors.index.json";

static bool miles_is_index(const char *key, uint64_t *version)
{
	return dws_key_version(key, pre, suf, 6, version);
}

static char *miles_index_key(uint64_t version)
{
	return dws_xasprintf("%s%06llu%s", pre, (unsigned long long)version, suf);
}

struct mi_read {
	const dws_xload *ld;
	dws_xver *v;
	dws_xfound *out;
	char what[600];
	dws_st_file **st;     /* per object (index 1..) */
	size_t nst;
	dws_xenc enc;
	const char *sumfmt;   /* checksum_format, NULL: none */
};

/* metadata[key] as a version string ("000003") equal to want. */
static int meta_version(struct mi_read *r, json_t *meta, const char *key, uint64_t want, dws_error *err)
{
	json_t *s = json_object_get(meta, key);
	uint64_t got;
	if (!json_is_string(s) || !dws_parse_version(json_string_value(s), strlen(json_string_value(s)), 6, &got) ||
	    got != want)
		return dws_fail(err, DWS_EFORMAT, "%s: metadata %s is '%.32s', not '%06llu'", r->what, key,
				json_is_string(s) ? json_string_value(s) : "(missing)", (unsigned long long)want);
	return DWS_OK;
}

/* The metadata: versions, encoding, compression, checksum format. */
static int read_meta(struct mi_read *r, json_t *idx, dws_error *err)
{
	json_t *meta = json_object_get(idx, "metadata");
	if (!json_is_object(meta))
		return dws_fail(err, DWS_EFORMAT, "%s: 'metadata' is missing or not an object", r->what);
	int rc = meta_version(r, meta, "version", r->v->version, err);
	if (rc)
		return rc;
	json_t *enc = json_object_get(meta, "delta_encoding"), *cf = json_object_get(meta, "checksum_format");
	if (cf && !json_is_string(cf))
		return dws_fail(err, DWS_EFORMAT, "%s: metadata checksum_format is not a string", r->what);
	r->sumfmt = cf ? json_string_value(cf) : NULL;
	if (!enc || json_is_null(enc)) {
		r->v->full = true;
		r->enc = DWS_XENC_PLAIN;
		return DWS_OK;
	}
	const char *e = json_is_string(enc) ? json_string_value(enc) : "";
	if (!strcmp(e, "xor"))
		r->enc = DWS_XENC_XOR;
	else if (!strcmp(e, "overwrite"))
		r->enc = DWS_XENC_OVERWRITE;
	else
		return dws_fail(err, DWS_EUNSUP, "%s: unknown delta_encoding '%.32s' (dwsfs reads xor and overwrite)", r->what, e);
	if (r->v->version == 0)
		return dws_fail(err, DWS_EFORMAT, "%s: version 0 is the base: it cannot be a delta", r->what);
	rc = meta_version(r, meta, "base_version", r->v->version - 1, err);
	if (rc)
		return rc;
	const char *comp = json_is_string(json_object_get(meta, "compression_format"))
				   ? json_string_value(json_object_get(meta, "compression_format")) : "";
	if (strcmp(comp, "zstd"))
		return dws_fail(err, DWS_EUNSUP, "%s: compression_format '%.32s': dwsfs reads zstd", r->what, comp);
	if (!r->sumfmt)
		return dws_fail(err, DWS_EFORMAT, "%s: metadata has no checksum_format", r->what);
	return DWS_OK;
}

/* The shard a weight_map entry names: there, its header read (once). */
static int shard_of(struct mi_read *r, const char *file, size_t *obj, dws_error *err)
{
	if (!file || !*file || strchr(file, '/') || !strcmp(file, ".") || !strcmp(file, "..") || strlen(file) > 255)
		return dws_fail(err, DWS_EFORMAT, "%s: shard '%.64s' is not a plain file name", r->what, file ? file : "(not a string)");
	char *key = dws_xasprintf("%s/%s", r->v->folder, file);
	for (size_t k = 1; k < r->v->nobjs; k++)
		if (!strcmp(r->v->objs[k].key, key)) {
			free(key);
			*obj = k;
			return DWS_OK;
		}
	if (r->v->nobjs > MAX_SHARDS) {
		free(key);
		return dws_fail(err, DWS_EFORMAT, "%s: more than %d shards", r->what, MAX_SHARDS);
	}
	dws_object o = {0};
	int rc = dws_xload_object(r->ld, key, &o, err);
	free(key);
	if (rc == DWS_ENOENT || (rc && dws_code_transient(rc))) {
		r->out->state = DWS_XV_INCOMPLETE;
		free(o.key);
		return DWS_ENOENT;
	}
	if (rc)
		return rc;
	*obj = dws_xver_add_obj(r->v, &o);
	free(o.key);
	r->st = dws_xrealloc(r->st, (r->v->nobjs) * sizeof(*r->st));
	r->st[*obj] = NULL;
	r->nst = r->v->nobjs;
	dws_xstate s = dws_xload_header(r->ld->bucket, &r->v->objs[*obj], &r->st[*obj], err);
	if (s != DWS_XV_OK) {
		r->out->state = s;
		return s == DWS_XV_BAD ? dws_code_of(err, DWS_EFORMAT) : DWS_ENOENT;
	}
	r->v->payload_bytes += r->v->objs[*obj].size;
	return DWS_OK;
}

/* weight_map entry (name -> file) into record x. */
static int read_entry(struct mi_read *r, const char *name, json_t *file, dws_xrec *x, dws_error *err)
{
	x->name = dws_xstrdup(name);
	if (!*name || strlen(name) > 1024)
		return dws_fail(err, DWS_EFORMAT, "%s: weight_map holds an empty or overlong name", r->what);
	int rc = shard_of(r, json_is_string(file) ? json_string_value(file) : NULL, &x->obj, err);
	if (rc)
		return rc;
	const dws_st_file *st = r->st[x->obj];
	const dws_st_tensor *t = dws_st_find(st, name);
	const char *shard = r->v->objs[x->obj].key;
	if (!t)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is not in %s", r->what, name, shard);
	x->enc = r->enc;
	x->off = dws_st_data_start(st) + t->begin;
	x->len = t->end - t->begin;
	if (r->enc == DWS_XENC_PLAIN) {
		x->dtype = t->dtype;
		x->ndim = t->ndim;
		x->shape = dws_xcalloc(t->ndim ? t->ndim : 1, sizeof(uint64_t));
		memcpy(x->shape, t->shape, t->ndim * sizeof(uint64_t));
		x->nbytes = x->len;
	} else if (t->dtype != DWS_DT_U8 || t->ndim != 1) {
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' in %s is %s with %u dimensions, not U8[n]", r->what, name,
				shard, dws_dtype_name(t->dtype), t->ndim);
	}
	const char *want = dws_st_meta_get(st, name);
	if (!r->sumfmt || (r->enc == DWS_XENC_PLAIN && !want))
		return DWS_OK; /* a full checkpoint may carry none */
	char tw[700];
	snprintf(tw, sizeof(tw), "%s: tensor '%s'", r->what, name);
	rc = dws_xsum_parse(r->sumfmt, want, &x->sum, tw, err);
	if (!rc)
		snprintf(x->want, sizeof(x->want), "%s", want);
	return rc;
}

static int read_index(struct mi_read *r, json_t *idx, dws_error *err)
{
	if (!json_is_object(idx))
		return dws_fail(err, DWS_EFORMAT, "%s: not a JSON object", r->what);
	int rc = read_meta(r, idx, err);
	if (rc)
		return rc;
	json_t *wm = json_object_get(idx, "weight_map"), *file;
	if (!json_is_object(wm))
		return dws_fail(err, DWS_EFORMAT, "%s: 'weight_map' is missing or not an object", r->what);
	size_t n = json_object_size(wm), i = 0;
	r->v->recs = dws_xrealloc(r->v->recs, (n ? n : 1) * sizeof(*r->v->recs));
	memset(r->v->recs, 0, (n ? n : 1) * sizeof(*r->v->recs));
	const char *name;
	json_object_foreach(wm, name, file) {
		r->v->nrecs = i + 1;
		rc = read_entry(r, name, file, &r->v->recs[i++], err);
		if (rc)
			return rc;
	}
	if (r->v->full && n == 0)
		return dws_fail(err, DWS_EFORMAT, "%s: a full version with an empty weight_map", r->what);
	return DWS_OK;
}

static void miles_read(const dws_xload *ld, const dws_object *index, uint64_t version, dws_xfound *out)
{
	char folder[32];
	snprintf(folder, sizeof(folder), "%s%06llu", pre, (unsigned long long)version);
	struct mi_read r = {.ld = ld, .out = out};
	r.v = dws_xver_new(version, folder, index, 0);
	snprintf(r.what, sizeof(r.what), "%s/%s: version %llu", dws_bucket_uri(ld->bucket), index->key,
		 (unsigned long long)version);
	dws_error err = {0};
	json_t *idx = dws_xload_json(ld->bucket, index, INDEX_CAP, r.what, out, &err);
	if (idx && read_index(&r, idx, &err) == DWS_OK)
		out->state = DWS_XV_OK;
	for (size_t k = 1; k < r.nst; k++)
		dws_st_free(r.st[k]);
	free(r.st);
	json_decref(idx);
	dws_xfound_finish(out, r.v, &err);
}

const struct dws_format_ops dws_fmt_miles = {
	.id = DWS_FORMAT_MILES,
	.name = "miles",
	.is_index = miles_is_index,
	.index_key = miles_index_key,
	.read = miles_read,
};
