/* s3://BUCKET[/PREFIX]: any S3-compatible store (AWS, R2, MinIO, the Hub's
 * S3 endpoint), path-style, SigV4-signed by libcurl. ListObjectsV2 answers
 * XML, parsed with expat; bytes come from ranged GetObject through the block
 * cache, keyed by ETag and size. Every range read is pinned to the listed
 * ETag (If-Match, and compared after for stores that ignore it) and size:
 * a rewritten object is an error, never mixed in. A listed key that cannot
 * be served (a control character, over 1023 bytes, not a safe path) is
 * skipped with one log line per bucket, never the whole listing. */
#include "bucket.h"
#include "cred.h"
#include "http.h"
#include "remote.h"
#include "s3_upload.h"

#include <ctype.h>
#include <expat.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_PAGES 100000
#define MAX_LIST_OBJECTS (10u * 1000 * 1000)

/* Shared by the bucket and its blobs; freed with the last reference. */
struct s3 {
	atomic_long refs;
	dws_http *http;
	char *endpoint, *bucket, *prefix;
	dws_ignored ignored;
};

struct s3_obj {
	struct s3 *s;
	char *url;
	dws_range_pin pin;   /* the listed ETag and size */
	char *what;
};

static char *object_url(struct s3 *s, const char *key)
{
	char *full = *s->prefix ? dws_xasprintf("%s/%s", s->prefix, key) : dws_xstrdup(key);
	char *esc = dws_http_escape_path(full);
	char *url = dws_xasprintf("%s/%s/%s", s->endpoint, s->bucket, esc);
	free(full);
	free(esc);
	return url;
}

/* ---- ListObjectsV2 ---- */

struct list_state {
	dws_bucket *b;
	const char *want;       /* full prefix with a trailing '/' ("" for all) */
	dws_objvec ov;
	char text[4096];
	size_t tl;
	bool cut;               /* this element's text did not fit in text */
	bool in_contents, truncated, too_long;
	char key[1024], etag[128], modified[64], size[32];
	bool key_too_long;
	char next[1024];
	int err;
};

static void XMLCALL on_start(void *ud, const XML_Char *name, const XML_Char **attrs)
{
	(void)attrs;
	struct list_state *st = ud;
	st->tl = 0;
	st->text[0] = 0;
	st->cut = false;
	if (!strcmp(name, "Contents")) {
		st->in_contents = true;
		st->key_too_long = false;
		st->key[0] = st->etag[0] = st->modified[0] = st->size[0] = 0;
	}
}

static void XMLCALL on_text(void *ud, const XML_Char *s, int len)
{
	struct list_state *st = ud;
	if (st->tl + (size_t)len >= sizeof(st->text)) {
		st->cut = true;
		len = (int)(sizeof(st->text) - 1 - st->tl);
	}
	memcpy(st->text + st->tl, s, (size_t)len);
	st->tl += (size_t)len;
	st->text[st->tl] = 0;
}

/* A Contents entry ended: one more object, or a key skipped (logged once). */
static void take_entry(struct list_state *st)
{
	struct s3 *s = st->b->priv;
	size_t wl = strlen(st->want), pl = strlen(s->prefix);
	const char *key = st->key + (pl ? pl + 1 : 0);
	uint64_t size;
	if (strncmp(st->key, st->want, wl) != 0 || (pl && (strncmp(st->key, s->prefix, pl) || st->key[pl] != '/')))
		return;
	if (st->key_too_long) {
		dws_ignored_log(&s->ignored, st->b->uri, st->key, "a key over 1023 bytes (its first 200 shown)");
		return;
	}
	for (const char *p = key; *p; p++)
		if ((unsigned char)*p < 0x20) {
			dws_ignored_log(&s->ignored, st->b->uri, st->key, "a control character in its key");
			return;
		}
	if (!dws_key_is_safe(key)) {
		dws_ignored_log(&s->ignored, st->b->uri, st->key, "not a safe path inside the bucket");
		return;
	}
	if (!dws_parse_u64(st->size, &size)) {
		st->err = DWS_EFORMAT;
		return;
	}
	dws_object *o = dws_objvec_push(&st->ov, MAX_LIST_OBJECTS);
	if (!o) {
		st->err = DWS_EFORMAT;
		return;
	}
	o->key = dws_xstrdup(key);
	o->size = size;
	o->mtime_ns = dws_parse_time_ns(st->modified);
	snprintf(o->ident, sizeof(o->ident), "etag:%.80s:%llu", st->etag, (unsigned long long)size);
}

static void XMLCALL on_end(void *ud, const XML_Char *name)
{
	struct list_state *st = ud;
#define TAKE(field)                                                     \
	do {                                                            \
		if (st->cut || st->tl >= sizeof(st->field))             \
			st->too_long = true; /* refused, never cut */    \
		else                                                    \
			memcpy(st->field, st->text, st->tl + 1);         \
	} while (0)
	if (st->in_contents) {
		if (!strcmp(name, "Key")) {
			/* a key we cannot hold is that entry's problem only */
			st->key_too_long = st->cut || st->tl >= sizeof(st->key);
			snprintf(st->key, sizeof(st->key), "%.*s", st->key_too_long ? 200 : (int)st->tl, st->text);
		} else if (!strcmp(name, "ETag")) {
			TAKE(etag);
		} else if (!strcmp(name, "LastModified")) {
			TAKE(modified);
		} else if (!strcmp(name, "Size")) {
			TAKE(size);
		}
	} else if (!strcmp(name, "IsTruncated")) {
		st->truncated = !strcmp(st->text, "true");
	} else if (!strcmp(name, "NextContinuationToken")) {
		TAKE(next);
	}
#undef TAKE
	if (!strcmp(name, "Contents")) {
		st->in_contents = false;
		take_entry(st);
	}
	st->tl = 0;
	st->text[0] = 0;
	st->cut = false;
}

/* XML 1.0 cannot carry most control characters, raw or as references
 * (&#1;), and expat refuses the whole answer for one: each becomes a tab
 * in place (a reference keeps its length), which refuses the one key that
 * holds it, alone. */
static void tame_controls(char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)p[i];
		if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') {
			p[i] = '\t';
			continue;
		}
		if (c != '&' || i + 3 >= n || p[i + 1] != '#')
			continue;
		bool hex = p[i + 2] == 'x';
		size_t first = i + 2 + hex, j = first;
		uint64_t v = 0;
		for (; j < n && j - first < 16 && (hex ? isxdigit((unsigned char)p[j]) : isdigit((unsigned char)p[j])); j++)
			v = v * (hex ? 16 : 10) + (uint64_t)(isdigit((unsigned char)p[j]) ? p[j] - '0' : (p[j] | 0x20) - 'a' + 10);
		if (j == first || j >= n || p[j] != ';' || v >= 0x20 || v == '\t' || v == '\n' || v == '\r')
			continue;
		memset(p + first, '0', j - first);
		p[j - 1] = '9';
	}
}

static int s3_list(dws_bucket *b, const char *prefix, dws_object **out, size_t *n,
		   dws_error *err)
{
	struct s3 *s = b->priv;
	char *full = *s->prefix ? dws_xasprintf("%s/%s", s->prefix, prefix) : dws_xstrdup(prefix);
	size_t fl = strlen(full);
	while (fl && full[fl - 1] == '/')
		full[--fl] = 0;
	char *want = fl ? dws_xasprintf("%s/", full) : dws_xstrdup("");
	free(full);
	struct list_state st = {.b = b, .want = want};
	int rc = DWS_OK;
	char *token = NULL;
	for (int page = 0; page < MAX_PAGES; page++) {
		/* the query sorted: libcurl 7.88 signs it as sent, S3 sorted, and
		 * a continuation-token last was a 403 from page two on */
		const char *kv[] = {"list-type", "2", "prefix", want, "continuation-token", token};
		char *q = dws_http_query(kv, token ? 3 : 2);
		char *url = dws_xasprintf("%s/%s?%s", s->endpoint, s->bucket, q);
		free(q);
		dws_http_req rq = {.url = url, .cls = DWS_HTTP_S3, .what = b->uri};
		dws_http_resp rs;
		rc = dws_http_do(s->http, &rq, &rs, err);
		free(url);
		if (rc) {
			dws_http_resp_free(&rs);
			break;
		}
		XML_Parser p = XML_ParserCreate(NULL);
		XML_SetUserData(p, &st);
		XML_SetElementHandler(p, on_start, on_end);
		XML_SetCharacterDataHandler(p, on_text);
		tame_controls(rs.body, rs.len);
		st.truncated = false;
		st.next[0] = 0;
		if (XML_Parse(p, rs.body, (int)rs.len, 1) == XML_STATUS_ERROR)
			rc = dws_fail(err, DWS_EFORMAT, "%s: ListObjectsV2 answer is not XML: %s at line %lu", b->uri,
				      XML_ErrorString(XML_GetErrorCode(p)), (unsigned long)XML_GetCurrentLineNumber(p));
		else if (st.err || st.too_long)
			rc = dws_fail(err, DWS_EFORMAT, "%s: ListObjectsV2 answer has a bad or oversized entry", b->uri);
		XML_ParserFree(p);
		dws_http_resp_free(&rs);
		if (rc || !st.truncated)
			break;
		if (!st.next[0]) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: truncated listing without a continuation token", b->uri);
			break;
		}
		free(token);
		token = dws_xstrdup(st.next);
	}
	free(token);
	free(want);
	if (rc) {
		dws_objects_free(st.ov.v, st.ov.n);
		return rc;
	}
	dws_objects_sort(st.ov.v, st.ov.n);
	*out = st.ov.v;
	*n = st.ov.n;
	return DWS_OK;
}

/* ---- bytes ---- */

static int s3_fetch(void *ctx, uint64_t off, size_t len, void *dst, dws_error *err)
{
	struct s3_obj *o = ctx;
	char im[170];
	dws_range_if_match(&o->pin, im, sizeof(im));
	dws_http_req rq = {.url = o->url, .cls = DWS_HTTP_S3, .range_off = off, .range_len = len, .dst = dst,
			   .if_match = im[0] ? im : NULL, .what = o->what};
	dws_http_resp rs;
	dws_error e2 = {0};
	int rc = dws_http_do(o->s->http, &rq, &rs, &e2);
	/* a rewritten object has another ETag or size: never mix it into a step */
	rc = dws_range_check(o->what, &o->pin, rc, &rs, NULL, &e2);
	dws_http_resp_free(&rs);
	if (rc && err && !err->code)
		*err = e2;
	return rc;
}

static void s3_unref(struct s3 *s)
{
	if (atomic_fetch_sub(&s->refs, 1) != 1)
		return;
	dws_http_free(s->http);
	free(s->endpoint);
	free(s->bucket);
	free(s->prefix);
	dws_ignored_free(&s->ignored);
	free(s);
}

static void s3_obj_free(void *ctx)
{
	struct s3_obj *o = ctx;
	s3_unref(o->s);
	free(o->url);
	free(o->what);
	free(o);
}

static int s3_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out,
			dws_error *err)
{
	(void)err;
	struct s3 *s = b->priv;
	struct s3_obj *o = dws_xcalloc(1, sizeof(*o));
	atomic_fetch_add(&s->refs, 1);
	o->s = s;
	o->url = object_url(s, obj->key);
	o->what = dws_xasprintf("%s/%s", b->uri, obj->key);
	/* ident is "etag:<etag>:<size>" */
	const char *e = strncmp(obj->ident, "etag:", 5) == 0 ? obj->ident + 5 : "";
	const char *colon = strrchr(e, ':');
	o->pin.size = obj->size;
	if (colon)
		snprintf(o->pin.etag, sizeof(o->pin.etag), "%.*s", (int)(colon - e), e);
	char *ident = dws_xasprintf("%s|%s", b->uri, obj->ident);
	*out = dws_remote_blob(b->cache, o->what, ident, obj->size, s3_fetch, o, s3_obj_free);
	free(ident);
	return DWS_OK;
}

static int s3_head(dws_bucket *b, const char *key, dws_object *out, dws_error *err)
{
	struct s3 *s = b->priv;
	char *url = object_url(s, key);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_S3, .method = "HEAD", .what = b->uri};
	dws_http_resp rs;
	int rc = dws_http_do(s->http, &rq, &rs, err);
	free(url);
	if (!rc) {
		memset(out, 0, sizeof(*out));
		out->key = dws_xstrdup(key);
		out->size = rs.content_length;
		out->mtime_ns = (int64_t)time(NULL) * 1000000000;
		snprintf(out->ident, sizeof(out->ident), "etag:%.80s:%llu", rs.etag, (unsigned long long)out->size);
	}
	dws_http_resp_free(&rs);
	return rc;
}

/* The object whole or not at all: PutObject, or a multipart upload past
 * DWSFS_S3_MULTIPART_THRESHOLD (s3_upload.c). */
static int s3_put(dws_bucket *b, const char *key, int fd, uint64_t len, void (*sent)(void *ctx, uint64_t bytes),
		  void *ctx, const volatile sig_atomic_t *stop, dws_error *err)
{
	struct s3 *s = b->priv;
	dws_s3_upload_conf c;
	int rc = dws_s3_upload_conf_env(&c, err);
	if (rc)
		return rc;
	char *url = object_url(s, key), *what = dws_xasprintf("%s/%s", b->uri, key);
	dws_s3_put p = {.http = s->http, .url = url, .what = what, .fd = fd, .len = len, .sent = sent, .ctx = ctx,
			.stop = stop};
	rc = dws_s3_upload(&p, &c, err);
	free(url);
	free(what);
	return rc;
}

static int s3_del(dws_bucket *b, const char *key, dws_error *err)
{
	struct s3 *s = b->priv;
	char *url = object_url(s, key), *what = dws_xasprintf("%s/%s", b->uri, key);
	dws_http_req rq = {.url = url, .method = "DELETE", .cls = DWS_HTTP_S3, .what = what};
	dws_http_resp rs;
	int rc = dws_http_do(s->http, &rq, &rs, err);
	dws_http_resp_free(&rs);
	free(url);
	free(what);
	return rc == DWS_ENOENT ? DWS_OK : rc;
}

static void s3_close(dws_bucket *b)
{
	struct s3 *s = b->priv;
	dws_http_cancel(s->http); /* fetches still running end now */
	dws_cache_release(b->cache);
	s3_unref(s);
	free(b->uri);
	free(b);
}

static const struct dws_bucket_ops s3_ops = {
	.list = s3_list, .open_blob = s3_open_blob, .close = s3_close, .head = s3_head, .put = s3_put, .del = s3_del,
};

static const char *env_first(const char *a, const char *b)
{
	const char *v = getenv(a);
	if (v && *v)
		return v;
	v = b ? getenv(b) : NULL;
	return v && *v ? v : NULL;
}

int dws_bucket_s3_open(const char *uri, const dws_bucket_opts *o, dws_bucket **out,
		       dws_error *err)
{
	const char *rest = uri + 5;
	char *dup = dws_xstrdup(rest);
	char *prefix = strchr(dup, '/');
	if (prefix)
		*prefix++ = 0;
	while (prefix && *prefix && prefix[strlen(prefix) - 1] == '/')
		prefix[strlen(prefix) - 1] = 0;
	bool bad = !*dup || strlen(dup) > 63 || (prefix && *prefix && !dws_key_is_safe(prefix));
	for (const char *p = dup; *p && !bad; p++)
		bad = !((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || (*p >= 'A' && *p <= 'Z') || *p == '_');
	if (bad) {
		free(dup);
		return dws_fail(err, DWS_EINVAL, "%s: expected s3://BUCKET[/PREFIX]", uri);
	}
	char pregion[64], pendpoint[512];
	dws_aws_profile_place(pregion, sizeof(pregion), pendpoint, sizeof(pendpoint));
	const char *region = o && o->s3_region ? o->s3_region : env_first("AWS_REGION", "AWS_DEFAULT_REGION");
	if (!region)
		region = pregion[0] ? pregion : "us-east-1";
	const char *ep = o && o->s3_endpoint ? o->s3_endpoint : env_first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL");
	if (!ep && pendpoint[0])
		ep = pendpoint;
	dws_cred *cred = NULL;
	dws_error ce = {0};
	if (dws_cred_aws_new(o ? o->s3_key : NULL, o ? o->s3_secret : NULL, &cred, &ce)) {
		free(dup);
		return dws_fail(err, ce.code, "%s: %s", uri, ce.msg);
	}
	struct s3 *s = dws_xcalloc(1, sizeof(*s));
	atomic_init(&s->refs, 1);
	dws_ignored_init(&s->ignored);
	s->endpoint = ep ? dws_xstrdup(ep) : dws_xasprintf("https://s3.%s.amazonaws.com", region);
	size_t el = strlen(s->endpoint);
	while (el && s->endpoint[el - 1] == '/')
		s->endpoint[--el] = 0;
	s->bucket = dws_xstrdup(dup);
	s->prefix = dws_xstrdup(prefix ? prefix : "");
	free(dup);
	char *sigv4 = dws_xasprintf("aws:amz:%s:s3", region);
	dws_http_opts ho = {.aws_sigv4 = sigv4, .cred = cred, .ca_file = o ? o->ca_file : NULL,
			    .stall_timeout_ms = o ? o->stall_timeout_ms : 0, .deadline_ms = o ? o->read_deadline_ms : 0};
	int rc = dws_http_new(&ho, &s->http, err);
	free(sigv4);
	return dws_bucket_remote_wrap(&s3_ops, s, uri, o, s->http, rc, out, err);
}
