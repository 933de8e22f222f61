/* What the remote backends (hf://, s3://) share beyond HTTP: range answers
 * pinned to the object the listing named, and listed keys they ignore
 * logged once per bucket. See bucket.h. */
#include "bucket.h"
#include "http.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define IGNORED_MAX 10000

/* ---- range answers pinned to the listed object ---- */

/* The opaque part of an ETag: W/ and the quotes taken off. */
static const char *etag_opaque(const char *etag, size_t *len)
{
	if (!strncmp(etag, "W/", 2))
		etag += 2;
	size_t n = strlen(etag);
	if (n >= 2 && etag[0] == '"' && etag[n - 1] == '"') {
		etag++;
		n -= 2;
	}
	*len = n;
	return etag;
}

static bool same_etag(const char *a, const char *b)
{
	size_t al, bl;
	const char *ao = etag_opaque(a, &al), *bo = etag_opaque(b, &bl);
	return al == bl && !memcmp(ao, bo, al);
}

/* An ETag that is a hex hash as long as `hash`: the same kind of name. */
static bool etag_is_hash_like(const char *etag, const char *hash)
{
	size_t n;
	const char *o = etag_opaque(etag, &n);
	if (!n || n != strlen(hash))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!strchr("0123456789abcdefABCDEF", o[i]))
			return false;
	return true;
}

bool dws_etag_names(const char *etag, const char *hash)
{
	size_t n;
	const char *o = etag_opaque(etag, &n);
	return *hash && n == strlen(hash) && !strncasecmp(o, hash, n);
}

void dws_range_if_match(const dws_range_pin *p, char *buf, size_t n)
{
	size_t len;
	const char *o = etag_opaque(p->etag, &len);
	buf[0] = 0;
	/* a weak ETag never matches If-Match (strong comparison): not sent */
	if (!len || !strncmp(p->etag, "W/", 2))
		return;
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)o[i] <= 0x20 || o[i] == '"' || o[i] == 0x7f)
			return; /* not an entity tag: nothing to send */
	if (len + 3 <= n)
		snprintf(buf, n, "\"%.*s\"", (int)len, o);
}

int dws_range_check(const char *what, const dws_range_pin *p, int rc,
		    const dws_http_resp *rs, const char *hash, dws_error *err)
{
	if (rc && rs->status == 412) {
		if (err)
			err->code = 0; /* this says more than dws_http_do's "HTTP 412" */
		return dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (the server no longer has ETag %s)",
				what, p->etag);
	}
	if (rc)
		return rc;
	/* a whole-object 200 says its size in Content-Length */
	bool sized = rs->has_range_total || (rs->status == 200 && rs->has_content_length);
	uint64_t size = rs->has_range_total ? rs->range_total : rs->content_length;
	if (sized && size != p->size)
		return dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (%llu bytes, listed %llu)", what,
				(unsigned long long)size, (unsigned long long)p->size);
	if (hash && hash[0] && p->hash[0] && strcasecmp(hash, p->hash) != 0)
		return dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (content hash %.16s..., listed %.16s...)",
				what, hash, p->hash);
	if (!rs->etag[0])
		return DWS_OK;
	if (p->etag[0] && !same_etag(rs->etag, p->etag))
		return dws_fail(err, DWS_ENOENT, "%s: the object changed while it was read (ETag %s, earlier %s)", what, rs->etag,
				p->etag);
	/* where this server's ETags have named contents, another hash names
	 * another content (an ETag of another kind, say an MD5, says nothing) */
	if (!p->etag[0] && p->etag_is_hash && p->hash[0] && etag_is_hash_like(rs->etag, p->hash) &&
	    !dws_etag_names(rs->etag, p->hash))
		return dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (ETag %s, listed hash %.16s...)", what,
				rs->etag, p->hash);
	return DWS_OK;
}

/* ---- ignored keys ---- */

void dws_ignored_init(dws_ignored *ig)
{
	memset(ig, 0, sizeof(*ig));
	pthread_mutex_init(&ig->lock, NULL);
	dws_strmap_init(&ig->seen);
}

void dws_ignored_free(dws_ignored *ig)
{
	for (size_t i = 0; i < ig->n; i++)
		free(ig->keys[i]);
	free(ig->keys);
	dws_strmap_free(&ig->seen);
	pthread_mutex_destroy(&ig->lock);
}

void dws_ignored_log(dws_ignored *ig, const char *uri, const char *key, const char *why)
{
	pthread_mutex_lock(&ig->lock);
	size_t v;
	bool seen = dws_strmap_get(&ig->seen, key, &v);
	bool first = !seen && ig->n < IGNORED_MAX, last = !seen && ig->n == IGNORED_MAX;
	if (first || last) {
		ig->keys = dws_xrealloc(ig->keys, (ig->n + 1) * sizeof(*ig->keys));
		ig->keys[ig->n] = dws_xstrdup(key);
		dws_strmap_put(&ig->seen, ig->keys[ig->n], ig->n);
		ig->n++;
	}
	pthread_mutex_unlock(&ig->lock);
	if (first)
		dws_log("%s: ignoring listed object '%s': %s", uri, key, why);
	else if (last)
		dws_log("%s: more than %d listed objects ignored; the others are not logged", uri, IGNORED_MAX);
}
