/* What every bucket shares: its calls through the backend's ops table, its
 * statistics, and the helpers backends list with. Which backend a URI names
 * is bucket_open.c's. */
#include "bucket.h"
#include "http.h"
#include "remote.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

int dws_bucket_probe(dws_bucket *b, char *token, size_t len, dws_error *err)
{
	if (!b->ops->probe)
		return DWS_EUNSUP;
	return b->ops->probe(b, token, len, err);
}

int dws_bucket_head(dws_bucket *b, const char *key, dws_object *out,
		    dws_error *err)
{
	if (!b->ops->head)
		return DWS_EUNSUP;
	return b->ops->head(b, key, out, err);
}

int dws_bucket_put(dws_bucket *b, const char *key, int fd, uint64_t len,
		   void (*sent)(void *ctx, uint64_t bytes), void *ctx,
		   const volatile sig_atomic_t *stop, dws_error *err)
{
	if (!b->ops->put)
		return dws_fail(err, DWS_EUNSUP, "%s: this kind of bucket cannot be written to", b->uri);
	return b->ops->put(b, key, fd, len, sent, ctx, stop, err);
}

int dws_bucket_delete(dws_bucket *b, const char *key, dws_error *err)
{
	if (!b->ops->del)
		return dws_fail(err, DWS_EUNSUP, "%s: this kind of bucket cannot be written to", b->uri);
	return b->ops->del(b, key, err);
}

bool dws_bucket_is_remote(const dws_bucket *b) { return b->http != NULL; }

void dws_bucket_stats_get(const dws_bucket *b, dws_bucket_stats *out)
{
	*out = (dws_bucket_stats){0};
	out->bytes_fetched = dws_fetch_count_get(b->fetched);
	if (b->http) {
		out->bytes_fetched = 0;
		for (int c = 0; c < DWS_HTTP_NCLASS; c++) {
			dws_http_counts(b->http, (dws_http_class)c, &out->requests[c], &out->bytes[c]);
			out->bytes_fetched += out->bytes[c];
		}
		dws_http_errors(b->http, out->retries, out->failures);
	}
	if (b->cache)
		dws_cache_stats(b->cache, &out->cache);
}

void dws_bucket_count_into(dws_bucket *b, const dws_bucket *into)
{
	if (!into->fetched)
		return;
	dws_fetch_count_unref(b->fetched);
	b->fetched = dws_fetch_count_ref(into->fetched);
}

void dws_bucket_close(dws_bucket *b)
{
	if (!b)
		return;
	dws_fetch_count_unref(b->fetched);
	b->ops->close(b);
}

const char *dws_bucket_uri(const dws_bucket *b) { return b->uri; }

int dws_bucket_list(dws_bucket *b, const char *prefix, dws_object **out,
		    size_t *n, dws_error *err)
{
	return b->ops->list(b, prefix ? prefix : "", out, n, err);
}

int dws_bucket_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out,
			 dws_error *err)
{
	if (!dws_key_is_safe(obj->key))
		return dws_fail(err, DWS_EFORMAT, "%s: object key '%s' is not a safe relative path", b->uri, obj->key);
	return b->ops->open_blob(b, obj, out, err);
}

static int cmp_key(const void *a, const void *b)
{
	return strcmp(((const dws_object *)a)->key, ((const dws_object *)b)->key);
}

void dws_objects_sort(dws_object *v, size_t n)
{
	if (n)
		qsort(v, n, sizeof(*v), cmp_key);
}

dws_object *dws_objvec_push(dws_objvec *ov, size_t max)
{
	if (ov->n >= max)
		return NULL;
	if (ov->n == ov->cap) {
		ov->cap = ov->cap ? ov->cap * 2 : 256;
		ov->v = dws_xrealloc(ov->v, ov->cap * sizeof(*ov->v));
	}
	dws_object *o = &ov->v[ov->n++];
	memset(o, 0, sizeof(*o));
	return o;
}

int64_t dws_parse_time_ns(const char *s)
{
	struct tm tm = {0};
	const char *p = s ? strptime(s, "%Y-%m-%dT%H:%M:%S", &tm) : NULL;
	if (!p)
		return 0;
	int64_t ns = 0;
	if (*p == '.') {
		int64_t scale = 100000000;
		for (p++; *p >= '0' && *p <= '9'; p++, scale /= 10)
			ns += (*p - '0') * scale;
	}
	return (int64_t)timegm(&tm) * 1000000000 + ns;
}

int dws_bucket_remote_wrap(const struct dws_bucket_ops *ops, void *priv, const char *uri,
			   const dws_bucket_opts *bo, struct dws_http *http, int rc,
			   dws_bucket **out, dws_error *err)
{
	dws_bucket *b = dws_xcalloc(1, sizeof(*b));
	b->ops = ops;
	b->priv = priv;
	b->uri = dws_xstrdup(uri);
	b->http = http;
	if (!rc)
		rc = dws_cache_acquire(bo, &b->cache, err);
	if (rc) {
		ops->close(b);
		return rc;
	}
	*out = b;
	return DWS_OK;
}
