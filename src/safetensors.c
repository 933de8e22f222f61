/* A strict safetensors header parser and writer.
 *
 * Everything in a header is hostile: the length is capped, the JSON is parsed
 * by jansson with duplicate keys rejected, every tensor's dtype, shape and
 * byte size must agree, offsets must lie inside the file and not overlap, and
 * all arithmetic is overflow-checked. */
#include "internal.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

struct dws_st_file {
	dws_st_tensor *t;
	size_t n;
	dws_st_meta *meta;
	size_t nmeta;
	uint64_t data_start;
	uint64_t data_end; /* the end of the last tensor, in the data section */
	void *raw;      /* the first data_start bytes of the file */
	char *strings;  /* arena for names, metadata and shapes */
	dws_strmap index;
};

#define DWS_ST_MAX_DIMS 16

void dws_st_free(dws_st_file *f)
{
	if (!f)
		return;
	dws_strmap_free(&f->index);
	free(f->t);
	free(f->meta);
	free(f->raw);
	free(f->strings);
	free(f);
}

size_t dws_st_count(const dws_st_file *f) { return f->n; }
const dws_st_tensor *dws_st_at(const dws_st_file *f, size_t i) { return &f->t[i]; }
size_t dws_st_meta_count(const dws_st_file *f) { return f->nmeta; }
const dws_st_meta *dws_st_meta_at(const dws_st_file *f, size_t i) { return &f->meta[i]; }
uint64_t dws_st_data_start(const dws_st_file *f) { return f->data_start; }
uint64_t dws_st_data_end(const dws_st_file *f) { return f->data_end; }
const void *dws_st_raw(const dws_st_file *f) { return f->raw; }

const dws_st_tensor *dws_st_find(const dws_st_file *f, const char *name)
{
	size_t i;
	return dws_strmap_get(&f->index, name, &i) ? &f->t[i] : NULL;
}

const char *dws_st_meta_get(const dws_st_file *f, const char *key)
{
	for (size_t i = 0; i < f->nmeta; i++)
		if (strcmp(f->meta[i].key, key) == 0)
			return f->meta[i].value;
	return NULL;
}

static int cmp_begin(const void *a, const void *b)
{
	const dws_st_tensor *x = *(const dws_st_tensor *const *)a;
	const dws_st_tensor *y = *(const dws_st_tensor *const *)b;
	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return x->end < y->end ? -1 : x->end > y->end;
}

static uint64_t le64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

/* Arena: every string and shape of the header goes in one block sized from
 * the header length, which bounds it. */
typedef struct arena {
	char *base;
	size_t used, cap;
} arena;

static void *arena_take(arena *a, size_t n, size_t align)
{
	size_t at = (a->used + align - 1) & ~(align - 1);
	if (at > a->cap || n > a->cap - at)
		return NULL;
	a->used = at + n;
	return a->base + at;
}

static const char *arena_str(arena *a, const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = arena_take(a, n, 1);
	if (p)
		memcpy(p, s, n);
	return p;
}

static int parse_tensor(dws_st_file *f, arena *ar, const char *what,
			const char *name, json_t *v, uint64_t data_len,
			dws_error *err)
{
	dws_st_tensor *t = &f->t[f->n];
	if (!json_is_object(v))
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: tensor '%s' is not an object", what, name);
	json_t *jd = json_object_get(v, "dtype");
	json_t *js = json_object_get(v, "shape");
	json_t *jo = json_object_get(v, "data_offsets");
	if (json_object_size(v) != 3 || !json_is_string(jd) || !json_is_array(js) ||
	    !json_is_array(jo) || json_array_size(jo) != 2)
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: tensor '%s' needs exactly dtype, shape and data_offsets [begin, end]", what, name);
	t->dtype = dws_dtype_parse(json_string_value(jd));
	if (t->dtype == DWS_DT_INVALID)
		return dws_fail(err, DWS_EFORMAT, "%s: unknown dtype '%.32s' of tensor '%s'", what, json_string_value(jd), name);
	size_t nd = json_array_size(js);
	if (nd > DWS_ST_MAX_DIMS)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' shape has %zu dimensions (at most %d)", what, name, nd, DWS_ST_MAX_DIMS);
	uint64_t *shape = arena_take(ar, (nd ? nd : 1) * sizeof(uint64_t), 8);
	if (!shape)
		return dws_fail(err, DWS_EFORMAT, "%s: header too dense", what);
	uint64_t numel = 1;
	for (size_t i = 0; i < nd; i++) {
		json_t *d = json_array_get(js, i);
		if (!json_is_integer(d) || json_integer_value(d) < 0)
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' has a bad shape (dimension %zu is not a non-negative integer)", what, name, i);
		shape[i] = (uint64_t)json_integer_value(d);
		if (!dws_mul_ok(numel, shape[i], &numel))
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' shape overflows", what, name);
	}
	json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
	if (!json_is_integer(jb) || !json_is_integer(je) ||
	    json_integer_value(jb) < 0 || json_integer_value(je) < 0)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' has bad data_offsets", what, name);
	t->begin = (uint64_t)json_integer_value(jb);
	t->end = (uint64_t)json_integer_value(je);
	if (t->end < t->begin)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' data_offsets end before they begin", what, name);
	if (t->end > data_len)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' data_offsets [%llu, %llu] lie outside the data (%llu bytes; file truncated?)", what, name,
				(unsigned long long)t->begin, (unsigned long long)t->end, (unsigned long long)data_len);
	uint64_t nbytes;
	if (!dws_mul_ok(numel, dws_dtype_size(t->dtype), &nbytes) || nbytes != t->end - t->begin)
		return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' size mismatch: %s shape needs %llu elements but data_offsets span %llu bytes", what, name,
				dws_dtype_name(t->dtype), (unsigned long long)numel, (unsigned long long)(t->end - t->begin));
	t->name = arena_str(ar, name);
	if (!t->name)
		return dws_fail(err, DWS_EFORMAT, "%s: header too dense", what);
	t->ndim = (uint32_t)nd;
	t->shape = shape;
	t->numel = numel;
	f->n++;
	return DWS_OK;
}

/* __metadata__: an object of strings, copied into the arena. */
static int parse_meta(dws_st_file *f, arena *ar, const char *what, json_t *v, dws_error *err)
{
	if (!json_is_object(v))
		return dws_fail(err, DWS_EFORMAT, "%s: __metadata__ is not an object", what);
	f->meta = dws_xcalloc(json_object_size(v) ? json_object_size(v) : 1, sizeof(*f->meta));
	const char *mk;
	json_t *mv;
	json_object_foreach(v, mk, mv) {
		if (!json_is_string(mv))
			return dws_fail(err, DWS_EFORMAT, "%s: __metadata__ value of '%.64s' is not a string", what, mk);
		dws_st_meta *m = &f->meta[f->nmeta];
		m->key = arena_str(ar, mk);
		m->value = arena_str(ar, json_string_value(mv));
		if (!m->key || !m->value)
			return dws_fail(err, DWS_EFORMAT, "%s: header too dense", what);
		f->nmeta++;
	}
	return DWS_OK;
}

/* No two tensors may share a byte. */
static int check_overlaps(const dws_st_file *f, const char *what, dws_error *err)
{
	const dws_st_tensor **by = dws_xcalloc(f->n ? f->n : 1, sizeof(*by));
	for (size_t i = 0; i < f->n; i++)
		by[i] = &f->t[i];
	qsort(by, f->n, sizeof(*by), cmp_begin);
	uint64_t prev_end = 0;
	const char *prev = NULL;
	int rc = DWS_OK;
	for (size_t i = 0; i < f->n && !rc; i++) {
		if (by[i]->begin == by[i]->end)
			continue;
		if (prev && by[i]->begin < prev_end)
			rc = dws_fail(err, DWS_EFORMAT, "%s: data of tensors '%s' and '%s' overlap", what, prev, by[i]->name);
		prev_end = by[i]->end;
		prev = by[i]->name;
	}
	free(by);
	return rc;
}

int dws_st_parse(const void *prefix, size_t prefix_len, uint64_t file_size,
		 const char *what, dws_st_file **out, uint64_t *need,
		 dws_error *err)
{
	const unsigned char *p = prefix;
	*out = NULL;
	if (file_size < 8 || prefix_len < 8)
		return dws_fail(err, DWS_EFORMAT, "%s: truncated: %llu bytes, shorter than the 8-byte header length", what,
				(unsigned long long)(file_size < prefix_len ? file_size : prefix_len));
	uint64_t hlen = le64(p);
	if (hlen > DWS_ST_MAX_HEADER)
		return dws_fail(err, DWS_EFORMAT, "%s: header length %llu is larger than the %u byte cap", what,
				(unsigned long long)hlen, DWS_ST_MAX_HEADER);
	if (hlen > file_size - 8)
		return dws_fail(err, DWS_EFORMAT, "%s: header length %llu runs past the end of the file (%llu bytes; truncated?)", what,
				(unsigned long long)hlen, (unsigned long long)file_size);
	if (hlen < 2)
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: header length %llu is too short", what, (unsigned long long)hlen);
	if (prefix_len < 8 + hlen) {
		if (need) {
			*need = 8 + hlen;
			return 1;
		}
		return dws_fail(err, DWS_EFORMAT, "%s: truncated header", what);
	}
	const char *h = (const char *)p + 8;
	if (h[0] != '{')
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: it does not start with '{'", what);
	json_error_t je;
	json_t *root = json_loadb(h, hlen, JSON_REJECT_DUPLICATES, &je);
	if (!root)
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: %s at byte %d", what, je.text, je.position);
	if (!json_is_object(root)) {
		json_decref(root);
		return dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: not an object", what);
	}
	int rc = DWS_OK;
	dws_st_file *f = dws_xcalloc(1, sizeof(*f));
	dws_strmap_init(&f->index);
	size_t nkeys = json_object_size(root);
	f->t = dws_xcalloc(nkeys, sizeof(*f->t));
	arena ar = {.cap = hlen * 2 + 64};
	ar.base = f->strings = dws_xmalloc(ar.cap);
	uint64_t data_len = file_size - 8 - hlen;
	f->data_start = 8 + hlen;

	const char *key;
	json_t *v;
	json_object_foreach(root, key, v) {
		if (strlen(key) == 0) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: invalid JSON header: empty tensor name", what);
			goto out;
		}
		if (strcmp(key, "__metadata__") == 0) {
			rc = parse_meta(f, &ar, what, v, err);
			if (rc)
				goto out;
			continue;
		}
		rc = parse_tensor(f, &ar, what, key, v, data_len, err);
		if (rc)
			goto out;
	}

	rc = check_overlaps(f, what, err);
	if (rc)
		goto out;
	for (size_t i = 0; i < f->n; i++)
		if (f->t[i].end > f->data_end)
			f->data_end = f->t[i].end;
	/* bytes past the last tensor are nothing a reader may be asked to hold
	 * (a .zst of a small file and gigabytes of zeros) */
	if (file_size != DWS_ST_SIZE_UNKNOWN && f->data_end != data_len) {
		rc = dws_fail(err, DWS_EFORMAT, "%s: trailing data: %llu bytes after the end of the last tensor (a safetensors file ends there)", what,
			      (unsigned long long)(data_len - f->data_end));
		goto out;
	}
	for (size_t i = 0; i < f->n; i++)
		dws_strmap_put(&f->index, f->t[i].name, i);
	f->raw = dws_xmalloc(f->data_start);
	memcpy(f->raw, p, f->data_start);
out:
	json_decref(root);
	if (rc) {
		dws_st_free(f);
		return rc;
	}
	*out = f;
	return DWS_OK;
}

int dws_st_read_blob(dws_blob *b, const char *what, dws_st_file **out,
		     dws_error *err)
{
	return dws_st_read_blob_hint(b, what, NULL, out, err);
}

int dws_st_read_blob_hint(dws_blob *b, const char *what, const dws_read_hint *h,
			  dws_st_file **out, dws_error *err)
{
	uint64_t size = dws_blob_size(b);
	unsigned char first[4096];
	size_t n = size < sizeof(first) ? (size_t)size : sizeof(first);
	uint64_t need = 0;
	int rc = dws_blob_read_hint(b, 0, first, n, h, err);
	if (rc)
		return rc;
	rc = dws_st_parse(first, n, size, what, out, &need, err);
	if (rc != 1)
		return rc;
	void *buf = dws_xmalloc((size_t)need);
	rc = dws_blob_read_hint(b, 0, buf, (size_t)need, h, err);
	if (!rc)
		rc = dws_st_parse(buf, (size_t)need, size, what, out, NULL, err);
	free(buf);
	return rc;
}

/* ---- writer ---- */

int dws_st_build_header(const dws_st_out_tensor *t, size_t n,
			const dws_st_meta *meta, size_t nmeta, char **out,
			size_t *out_len, dws_error *err)
{
	json_t *root = json_object();
	uint64_t off = 0;
	if (nmeta) {
		json_t *m = json_object();
		for (size_t i = 0; i < nmeta; i++)
			json_object_set_new(m, meta[i].key, json_string(meta[i].value));
		json_object_set_new(root, "__metadata__", m);
	}
	for (size_t i = 0; i < n; i++) {
		json_t *shape = json_array();
		for (uint32_t d = 0; d < t[i].ndim; d++)
			json_array_append_new(shape, json_integer((json_int_t)t[i].shape[d]));
		uint64_t end;
		if (!dws_add_ok(off, t[i].nbytes, &end) || end > INT64_MAX) {
			json_decref(root);
			return dws_fail(err, DWS_EINVAL, "safetensors writer: tensor '%s' overflows the file", t[i].name);
		}
		json_t *o = json_pack("{s:s, s:o, s:[I,I]}", "dtype", dws_dtype_name(t[i].dtype),
				      "shape", shape, "data_offsets", (json_int_t)off, (json_int_t)end);
		json_object_set_new(root, t[i].name, o);
		off = end;
	}
	char *s = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(root);
	if (!s)
		return dws_fail(err, DWS_ENOMEM, "safetensors writer: cannot encode the header");
	size_t sl = strlen(s), padded = (sl + 7) & ~(size_t)7;
	char *buf = dws_xmalloc(8 + padded);
	for (int i = 0; i < 8; i++)
		buf[i] = (char)((uint64_t)padded >> (8 * i));
	memcpy(buf + 8, s, sl);
	memset(buf + 8 + sl, ' ', padded - sl);
	free(s);
	*out = buf;
	*out_len = 8 + padded;
	return DWS_OK;
}
