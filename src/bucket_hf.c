/* Hugging Face Hub backends: Storage Buckets (hf://buckets/NS/NAME[/PREFIX])
 * and model repositories (hf://NS/REPO[@REVISION]) for base models.
 *
 * Listing uses the tree API (one API call a page); bytes come from resolve
 * with a Range, whose redirect to the CDN is remembered per object so a read
 * costs one CDN request and no resolver call (a resolver that answers with
 * the bytes itself is read from directly).
 *
 * A rewritten object is never mixed in, whether or not its CDN URL names its
 * content: the resolver's X-Xet-Hash and size must be the listing's, and so
 * must every range answer's (Content-Range's total, X-Xet-Hash, an ETag that
 * is the hash); the first answer's ETag is pinned for the object's listed
 * identity and sent as If-Match after (a 412, or another ETag, is a change). */
#include "bucket.h"
#include "cred.h"
#include "http.h"
#include "remote.h"

#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CDN_URL_TTL_MS (10 * 60 * 1000)

/* The Hub's answer headers read here, kept by the http object for us
 * (dws_http_opts' capture, in this order): the content hash of a Xet
 * object, and the size and hash of an LFS file a redirect points to. */
enum { XET_HASH, LINKED_SIZE, LINKED_ETAG };
static const char *const hub_headers[] = {"X-Xet-Hash", "X-Linked-Size", "X-Linked-Etag"};
#define HUB_ERROR_HEADER "X-Error-Code" /* "EntryNotFound" and the like */
#define MAX_PAGES 100000
#define MAX_LIST_OBJECTS (10u * 1000 * 1000)

/* Resolved CDN URLs per object, shared by every blob of the bucket: an
 * object costs one resolver call per CDN_URL_TTL_MS whoever reads it. */
#define CDN_CACHE 256
struct cdn_entry {
	char *key;      /* object key + identity */
	char *url;      /* NULL: resolve again */
	int64_t until;
	char etag[160]; /* the pinned ETag of this content, "" none yet */
};

/* Shared by the bucket and every blob it opened (a prefetch may still fetch
 * for a blob after the bucket closed): freed with the last reference. */
struct hf {
	atomic_long refs;
	pthread_mutex_t cdn_lock;
	struct cdn_entry cdn[CDN_CACHE];
	unsigned cdn_next;
	dws_http *http;
	char *endpoint;
	char *ns, *name;     /* bucket, or model repo */
	char *prefix;        /* inside the bucket, "" for none */
	char *revision;      /* model repo only */
	bool model;
	atomic_bool etag_is_hash; /* an answer's ETag was its listed hash */
	dws_ignored ignored;
};

struct hf_obj {
	struct hf *hf;
	char *key;           /* relative to the bucket prefix */
	char *hash;          /* listed content hash (X-Xet-Hash), "" unknown */
	uint64_t size;       /* listed size */
	char *what;
	char *cdn_key;       /* key of the shared CDN URL cache */
};

static struct cdn_entry *cdn_find_locked(struct hf *h, const char *key)
{
	for (unsigned i = 0; i < CDN_CACHE; i++)
		if (h->cdn[i].key && !strcmp(h->cdn[i].key, key))
			return &h->cdn[i];
	return NULL;
}

static struct cdn_entry *cdn_add_locked(struct hf *h, const char *key)
{
	struct cdn_entry *e = &h->cdn[h->cdn_next];
	h->cdn_next = (h->cdn_next + 1) % CDN_CACHE;
	free(e->key);
	free(e->url);
	*e = (struct cdn_entry){.key = dws_xstrdup(key)};
	return e;
}

/* The URL of key while it is fresh (else NULL); its pinned ETag into pin
 * either way ("" none). */
static char *cdn_get(struct hf *h, const char *key, char *pin, size_t pn)
{
	char *url = NULL;
	pthread_mutex_lock(&h->cdn_lock);
	struct cdn_entry *e = cdn_find_locked(h, key);
	if (e && e->url && dws_now_ms() < e->until)
		url = dws_xstrdup(e->url);
	snprintf(pin, pn, "%s", e ? e->etag : "");
	pthread_mutex_unlock(&h->cdn_lock);
	return url;
}

/* url NULL: forget the URL (an expired or stale redirect), not the pin */
static void cdn_put(struct hf *h, const char *key, const char *url)
{
	pthread_mutex_lock(&h->cdn_lock);
	struct cdn_entry *e = cdn_find_locked(h, key);
	if (!e && url)
		e = cdn_add_locked(h, key);
	if (e) {
		free(e->url);
		e->url = url ? dws_xstrdup(url) : NULL;
		e->until = dws_now_ms() + CDN_URL_TTL_MS;
	}
	pthread_mutex_unlock(&h->cdn_lock);
}

/* Pin etag for key unless another is pinned: true if etag is the pin (the
 * one pinned copied into pinned either way). Two answers of one content
 * racing to be first agree; of two contents, the second loses. */
static bool cdn_pin(struct hf *h, const char *key, const char *etag, char *pinned, size_t pn)
{
	pthread_mutex_lock(&h->cdn_lock);
	struct cdn_entry *e = cdn_find_locked(h, key);
	if (!e)
		e = cdn_add_locked(h, key);
	if (!e->etag[0])
		snprintf(e->etag, sizeof(e->etag), "%s", etag);
	bool ok = !strcmp(e->etag, etag);
	snprintf(pinned, pn, "%s", e->etag);
	pthread_mutex_unlock(&h->cdn_lock);
	return ok;
}

/* ---- URLs ---- */

static char *join_prefix(const char *a, const char *b)
{
	if (!*a)
		return dws_xstrdup(b);
	if (!*b)
		return dws_xstrdup(a);
	return dws_xasprintf("%s/%s", a, b);
}

static char *resolve_url(struct hf *h, const char *key)
{
	char *full = join_prefix(h->prefix, key);
	char *esc = dws_http_escape_path(full);
	char *url = h->model ? dws_xasprintf("%s/%s/%s/resolve/%s/%s", h->endpoint, h->ns, h->name, h->revision, esc)
			     : dws_xasprintf("%s/buckets/%s/%s/resolve/%s", h->endpoint, h->ns, h->name, esc);
	free(full);
	free(esc);
	return url;
}

static bool is_hex64(const char *s)
{
	if (!s || strlen(s) != 64)
		return false;
	for (; *s; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
			return false;
	return true;
}

/* X-Linked-Size of an answer, if it has one that parses. */
static bool linked_size(const dws_http_resp *rs, uint64_t *size)
{
	return dws_parse_u64(rs->captured[LINKED_SIZE], size);
}

/* ---- listing ---- */

static int parse_page(dws_bucket *b, const char *body, const char *want, dws_objvec *ov,
		      dws_error *err)
{
	struct hf *h = b->priv;
	json_error_t je;
	json_t *arr = json_loads(body, JSON_REJECT_DUPLICATES, &je);
	if (!json_is_array(arr)) {
		json_decref(arr);
		return dws_fail(err, DWS_EFORMAT, "%s: the listing is not a JSON array (%s)", b->uri, je.text);
	}
	size_t i, wl = strlen(want), pl = strlen(h->prefix);
	json_t *e;
	int rc = DWS_OK;
	json_array_foreach(arr, i, e) {
		const char *type = json_string_value(json_object_get(e, "type"));
		const char *path = json_string_value(json_object_get(e, "path"));
		json_t *size = json_object_get(e, "size");
		if (!type || !path) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: listing entry %zu has no type or path", b->uri, i);
			break;
		}
		if (strcmp(type, "file") != 0)
			continue;
		/* the prefix quirk: "a/x" also lists "a/x#1/..."; keep "a/x/..." only */
		if (wl && (strncmp(path, want, wl) != 0 || path[wl] != '/'))
			continue;
		const char *key = path + (pl ? pl + 1 : 0);
		if ((pl && (strncmp(path, h->prefix, pl) != 0 || path[pl] != '/')) || !dws_key_is_safe(key)) {
			dws_ignored_log(&h->ignored, b->uri, path, "not a safe path inside the bucket");
			continue;
		}
		if (!json_is_integer(size) || json_integer_value(size) < 0) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: listing entry '%s' has no valid size", b->uri, path);
			break;
		}
		dws_object *o = dws_objvec_push(ov, MAX_LIST_OBJECTS);
		if (!o) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: more than %u objects", b->uri, MAX_LIST_OBJECTS);
			break;
		}
		o->key = dws_xstrdup(key);
		o->size = (uint64_t)json_integer_value(size);
		const char *up = json_string_value(json_object_get(e, "uploadedAt"));
		const char *mt = json_string_value(json_object_get(e, "mtime"));
		o->mtime_ns = dws_parse_time_ns(up ? up : mt);
		const char *xet = json_string_value(json_object_get(e, "xetHash"));
		if (!xet)
			xet = json_string_value(json_object_get(json_object_get(e, "lfs"), "oid"));
		if (is_hex64(xet))
			snprintf(o->ident, sizeof(o->ident), "xet:%s", xet);
		else
			snprintf(o->ident, sizeof(o->ident), "sz:%llu:%lld", (unsigned long long)o->size, (long long)o->mtime_ns);
	}
	json_decref(arr);
	return rc;
}

/* After a RepoNotFound: what it is, and for hf://NS/NAME (a model
 * repository) that a Storage Bucket is hf://buckets/NS/NAME. */
static void not_found_hint(const struct hf *h, dws_error *err)
{
	size_t l = strlen(err->msg);
	if (h->model)
		snprintf(err->msg + l, sizeof(err->msg) - l,
			 " (no such model repository, or a private one; a Storage Bucket is hf://buckets/%s/%s)", h->ns, h->name);
	else
		snprintf(err->msg + l, sizeof(err->msg) - l, " (no such bucket, or a private one)");
}

static int hf_list(dws_bucket *b, const char *prefix, dws_object **out, size_t *n,
		   dws_error *err)
{
	struct hf *h = b->priv;
	dws_objvec ov = {0};
	char *want = join_prefix(h->prefix, prefix);
	size_t wl = strlen(want);
	while (wl && want[wl - 1] == '/')
		want[--wl] = 0;
	char *esc = dws_http_escape_path(want);
	char *url = h->model ? dws_xasprintf("%s/api/models/%s/%s/tree/%s%s%s?recursive=true", h->endpoint, h->ns, h->name,
					     h->revision, *esc ? "/" : "", esc)
			     : dws_xasprintf("%s/api/buckets/%s/%s/tree/%s?recursive=true&limit=1000", h->endpoint, h->ns, h->name, esc);
	free(esc);
	int rc = DWS_OK;
	for (int page = 0; url && page < MAX_PAGES; page++) {
		dws_http_req rq = {.url = url, .cls = DWS_HTTP_API, .what = b->uri};
		dws_http_resp rs;
		rc = dws_http_do(h->http, &rq, &rs, err);
		if (rc == DWS_ENOENT && !strcmp(rs.error_code, "EntryNotFound")) {
			rc = DWS_OK; /* an absent prefix lists nothing */
			dws_http_resp_free(&rs);
			break;
		}
		if (rc && err && !strcmp(rs.error_code, "RepoNotFound"))
			not_found_hint(h, err);
		if (!rc)
			rc = parse_page(b, rs.body, want, &ov, err);
		free(url);
		url = !rc && rs.link_next[0] ? dws_xstrdup(rs.link_next) : NULL;
		dws_http_resp_free(&rs);
		if (rc)
			break;
	}
	free(url);
	free(want);
	if (rc) {
		dws_objects_free(ov.v, ov.n);
		return rc;
	}
	dws_objects_sort(ov.v, ov.n);
	*out = ov.v;
	*n = ov.n;
	return DWS_OK;
}

/* ---- bytes ---- */

/* Check rs (rc from dws_http_do), an answer with bytes of the object,
 * against its listing and the pin ("" none yet); pin its ETag if it is the
 * first. */
static int checked(struct hf_obj *o, const char *pin, int rc, const dws_http_resp *rs, dws_error *err)
{
	struct hf *h = o->hf;
	dws_range_pin p = {.size = o->size, .etag_is_hash = atomic_load(&h->etag_is_hash)};
	snprintf(p.hash, sizeof(p.hash), "%s", o->hash);
	snprintf(p.etag, sizeof(p.etag), "%s", pin);
	rc = dws_range_check(o->what, &p, rc, rs, rs->captured[XET_HASH], err);
	if (rc || !rs->etag[0])
		return rc;
	char pinned[160];
	if (!cdn_pin(h, o->cdn_key, rs->etag, pinned, sizeof(pinned)))
		return dws_fail(err, DWS_ENOENT, "%s: the object changed while it was read (ETag %s, earlier %s)", o->what, rs->etag,
				pinned);
	if (dws_etag_names(rs->etag, o->hash))
		atomic_store(&h->etag_is_hash, true); /* this server's ETags name contents */
	return DWS_OK;
}

/* Resolve the object and remember where its bytes are: the redirect's
 * target, or the resolve URL itself when the resolver has the bytes. */
static int resolve(struct hf_obj *o, const char *pin, char **out, dws_error *err)
{
	struct hf *h = o->hf;
	char *url = resolve_url(h, o->key);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_RESOLVE, .no_follow = true, .method = "HEAD", .what = o->what};
	dws_http_resp rs;
	int rc = dws_http_do(h->http, &rq, &rs, err);
	if (!rc && rs.location) {
		/* a redirect's X-Xet-Hash and X-Linked-Size are the object's */
		const char *xet = rs.captured[XET_HASH];
		uint64_t size;
		if (xet[0] && o->hash[0] && strcmp(xet, o->hash) != 0)
			rc = dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (xet hash %.16s..., listed %.16s...)",
				      o->what, xet, o->hash);
		else if (linked_size(&rs, &size) && size != o->size)
			rc = dws_fail(err, DWS_ENOENT, "%s: the object changed since it was listed (%llu bytes, listed %llu)", o->what,
				      (unsigned long long)size, (unsigned long long)o->size);
		else
			*out = dws_xstrdup(rs.location);
	} else if (!rc) {
		rc = checked(o, pin, rc, &rs, err); /* the bytes are here: as a range answer */
		if (!rc)
			*out = dws_xstrdup(url);
	}
	dws_http_resp_free(&rs);
	free(url);
	if (!rc)
		cdn_put(h, o->cdn_key, *out);
	return rc;
}

static int hf_fetch(void *ctx, uint64_t off, size_t len, void *dst, dws_error *err)
{
	struct hf_obj *o = ctx;
	struct hf *h = o->hf;
	for (int tries = 0; tries < 2; tries++) {
		char pin[160], im[170];
		char *cdn = cdn_get(h, o->cdn_key, pin, sizeof(pin));
		if (!cdn) {
			int rc = resolve(o, pin, &cdn, err);
			if (rc)
				return rc;
			free(cdn_get(h, o->cdn_key, pin, sizeof(pin))); /* the answer may have pinned */
		}
		dws_range_pin ip = {0};
		snprintf(ip.etag, sizeof(ip.etag), "%s", pin);
		dws_range_if_match(&ip, im, sizeof(im));
		dws_http_req rq = {.url = cdn, .cls = DWS_HTTP_CDN, .range_off = off, .range_len = len, .dst = dst,
				   .if_match = im[0] ? im : NULL, .what = o->what};
		dws_http_resp rs;
		dws_error e2 = {0};
		int rc = dws_http_do(h->http, &rq, &rs, &e2);
		bool gone = rc == DWS_ENOENT && (rs.status == 404 || rs.status == 410);
		rc = checked(o, pin, rc, &rs, &e2);
		dws_http_resp_free(&rs);
		free(cdn);
		if (!rc)
			return DWS_OK;
		if (gone && tries == 0) {
			/* an expired or stale redirect: resolve again once */
			cdn_put(h, o->cdn_key, NULL);
			continue;
		}
		if (err && !err->code)
			*err = e2;
		return rc;
	}
	return dws_fail(err, DWS_EIO, "%s: unreachable", o->what);
}

static void hf_unref(struct hf *h);

static void hf_obj_free(void *ctx)
{
	struct hf_obj *o = ctx;
	hf_unref(o->hf);
	free(o->key);
	free(o->hash);
	free(o->what);
	free(o->cdn_key);
	free(o);
}

static int hf_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out,
			dws_error *err)
{
	(void)err;
	struct hf *h = b->priv;
	struct hf_obj *o = dws_xcalloc(1, sizeof(*o));
	atomic_fetch_add(&h->refs, 1);
	o->hf = h;
	o->key = dws_xstrdup(obj->key);
	o->hash = dws_xstrdup(strncmp(obj->ident, "xet:", 4) == 0 ? obj->ident + 4 : "");
	o->size = obj->size;
	o->what = dws_xasprintf("%s/%s", b->uri, obj->key);
	o->cdn_key = dws_xasprintf("%s\n%s", obj->key, obj->ident);
	char *ident = dws_xasprintf("%s|%s", b->uri, obj->ident);
	*out = dws_remote_blob(b->cache, o->what, ident, obj->size, hf_fetch, o, hf_obj_free);
	free(ident);
	return DWS_OK;
}

static int hf_probe(dws_bucket *b, char *token, size_t tl, dws_error *err)
{
	struct hf *h = b->priv;
	if (h->model) {
		snprintf(token, tl, "model");
		return DWS_OK;
	}
	char *url = dws_xasprintf("%s/api/buckets/%s/%s", h->endpoint, h->ns, h->name);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_API, .what = b->uri};
	dws_http_resp rs;
	int rc = dws_http_do(h->http, &rq, &rs, err);
	free(url);
	if (!rc) {
		json_t *j = json_loads(rs.body, 0, NULL);
		const char *up = json_string_value(json_object_get(j, "updatedAt"));
		json_t *tf = json_object_get(j, "totalFiles");
		if (!up)
			rc = dws_fail(err, DWS_EFORMAT, "%s: bucket info without updatedAt", b->uri);
		else
			snprintf(token, tl, "%s|%lld", up, (long long)json_integer_value(tf));
		json_decref(j);
	}
	dws_http_resp_free(&rs);
	return rc;
}

static int hf_head(dws_bucket *b, const char *key, dws_object *out, dws_error *err)
{
	struct hf *h = b->priv;
	char *url = resolve_url(h, key);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_RESOLVE, .no_follow = true, .method = "HEAD", .what = b->uri};
	dws_http_resp rs;
	int rc = dws_http_do(h->http, &rq, &rs, err);
	free(url);
	if (!rc) {
		memset(out, 0, sizeof(*out));
		out->key = dws_xstrdup(key);
		if (!linked_size(&rs, &out->size))
			out->size = rs.content_length;
		out->mtime_ns = (int64_t)time(NULL) * 1000000000; /* just appeared: newest */
		const char *xet = rs.captured[XET_HASH], *linked_etag = rs.captured[LINKED_ETAG];
		if (is_hex64(xet))
			snprintf(out->ident, sizeof(out->ident), "xet:%.64s", xet); /* is_hex64: 64 digits */
		else
			snprintf(out->ident, sizeof(out->ident), "etag:%.80s:%llu", linked_etag[0] ? linked_etag : rs.etag,
				 (unsigned long long)out->size);
		if (rs.location) {
			/* the redirect is where its bytes are: no second resolve to
			 * fetch the object this HEAD found */
			char *ck = dws_xasprintf("%s\n%s", key, out->ident);
			cdn_put(h, ck, rs.location);
			free(ck);
		}
	}
	dws_http_resp_free(&rs);
	return rc;
}

static void hf_unref(struct hf *h)
{
	if (atomic_fetch_sub(&h->refs, 1) != 1)
		return;
	dws_http_free(h->http);
	for (unsigned i = 0; i < CDN_CACHE; i++) {
		free(h->cdn[i].key);
		free(h->cdn[i].url);
	}
	pthread_mutex_destroy(&h->cdn_lock);
	dws_ignored_free(&h->ignored);
	free(h->endpoint);
	free(h->ns);
	free(h->name);
	free(h->prefix);
	free(h->revision);
	free(h);
}

static void hf_close(dws_bucket *b)
{
	struct hf *h = b->priv;
	dws_http_cancel(h->http); /* fetches still running end now */
	dws_cache_release(b->cache);
	hf_unref(h);
	free(b->uri);
	free(b);
}

static const struct dws_bucket_ops hf_ops = {
	.list = hf_list, .open_blob = hf_open_blob, .close = hf_close, .probe = hf_probe, .head = hf_head,
};

static bool name_ok(const char *s)
{
	if (!*s || !strcmp(s, ".") || !strcmp(s, ".."))
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || strchr("-_.", *s)))
			return false;
	return true;
}

int dws_bucket_hf_open(const char *uri, const dws_bucket_opts *bo, dws_bucket **out,
		       dws_error *err)
{
	const char *rest = uri + 5; /* after hf:// */
	bool model = strncmp(rest, "buckets/", 8) != 0;
	if (!model)
		rest += 8;
	char *dup = dws_xstrdup(rest);
	char *ns = dup, *slash = strchr(ns, '/');
	if (!slash) {
		free(dup);
		return dws_fail(err, DWS_EINVAL, "%s: expected hf://buckets/NAMESPACE/NAME[/PREFIX] or hf://NAMESPACE/REPO[@REVISION]", uri);
	}
	*slash = 0;
	char *name = slash + 1, *prefix = strchr(name, '/');
	if (prefix)
		*prefix++ = 0;
	char *rev = NULL;
	if (model && (rev = strchr(name, '@')))
		*rev++ = 0;
	if (model && prefix && *prefix) {
		free(dup);
		return dws_fail(err, DWS_EINVAL, "%s: a model repository takes no path; use hf://NAMESPACE/REPO[@REVISION]", uri);
	}
	while (prefix && *prefix && prefix[strlen(prefix) - 1] == '/')
		prefix[strlen(prefix) - 1] = 0;
	if (!name_ok(ns) || !name_ok(name) || (prefix && *prefix && !dws_key_is_safe(prefix)) || (rev && !*rev)) {
		free(dup);
		return dws_fail(err, DWS_EINVAL, "%s: bad namespace, name, prefix or revision", uri);
	}
	const char *ep = getenv("HF_ENDPOINT");
	if (!ep || !*ep)
		ep = "https://huggingface.co";
	struct hf *h = dws_xcalloc(1, sizeof(*h));
	atomic_init(&h->refs, 1);
	pthread_mutex_init(&h->cdn_lock, NULL);
	dws_ignored_init(&h->ignored);
	h->endpoint = dws_xstrdup(ep);
	size_t el = strlen(h->endpoint);
	while (el && h->endpoint[el - 1] == '/')
		h->endpoint[--el] = 0;
	h->ns = dws_xstrdup(ns);
	h->name = dws_xstrdup(name);
	h->prefix = dws_xstrdup(prefix ? prefix : "");
	h->revision = model ? dws_xstrdup(rev ? rev : "main") : NULL;
	h->model = model;
	free(dup);
	dws_cred *cred = NULL;
	int rc = dws_cred_hf_new(bo ? bo->token_file : NULL, &cred, err);
	if (rc) {
		h->http = NULL;
		return dws_bucket_remote_wrap(&hf_ops, h, uri, bo, NULL, rc, out, err);
	}
	dws_http_opts ho = {.cred = cred, .endpoint = h->endpoint, .ca_file = bo ? bo->ca_file : NULL,
			    .stall_timeout_ms = bo ? bo->stall_timeout_ms : 0,
			    .deadline_ms = bo ? bo->read_deadline_ms : 0,
			    .capture = {hub_headers[XET_HASH], hub_headers[LINKED_SIZE], hub_headers[LINKED_ETAG]},
			    .error_header = HUB_ERROR_HEADER};
	rc = dws_http_new(&ho, &h->http, err);
	return dws_bucket_remote_wrap(&hf_ops, h, uri, bo, h->http, rc, out, err);
}
