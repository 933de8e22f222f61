/* HTTP requests over libcurl with the failure handling a mount needs: every
 * transfer has a stall timeout and a deadline, transient failures are retried
 * with capped exponential backoff and jitter (429 waits as the server says),
 * redirects are followed by hand so the token never reaches another host, and
 * nothing that could hold a secret (token, signed query) reaches a message. */
#include "http.h"
#include "cred.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define POOL_MAX 32
#define DEFAULT_MAX_BODY (64u << 20)
#define MAX_HOPS 5
#define ERR_KEEP 4096 /* bytes of an error answer's body kept */

struct dws_http {
	dws_http_opts o;
	char *token, *endpoint, *ca_file, *sigv4, *userpwd;
	dws_cred *cred;
	char *capture[DWS_HTTP_CAPTURE], *error_header;
	char *ep_host;
	long ep_port;
	char *user_agent;
	pthread_mutex_t lock;
	CURL *pool[POOL_MAX];
	int npool;
	atomic_ullong reqs[DWS_HTTP_NCLASS], bytes[DWS_HTTP_NCLASS];
	atomic_ullong retries[DWS_HTTP_NERR], failures[DWS_HTTP_NERR];
	atomic_bool cancelled;
};

void dws_http_cancel(dws_http *h)
{
	if (h)
		atomic_store(&h->cancelled, true);
}

/* Shut down, or the request's caller says stop. */
static bool halted(const dws_http *h, const dws_http_req *rq)
{
	return atomic_load(&((dws_http *)h)->cancelled) || (rq->stop && *rq->stop);
}

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static void global_init(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }
void dws_http_global_init(void) { pthread_once(&global_once, global_init); }

int64_t dws_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* scheme://host:port of a URL; false if it does not parse. */
static bool url_host(const char *url, char **host, long *port)
{
	CURLU *u = curl_url();
	char *h = NULL, *p = NULL;
	bool ok = curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		  curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK &&
		  curl_url_get(u, CURLUPART_PORT, &p, CURLU_DEFAULT_PORT) == CURLUE_OK;
	if (ok) {
		*host = dws_xstrdup(h);
		*port = strtol(p, NULL, 10);
	}
	curl_free(h);
	curl_free(p);
	curl_url_cleanup(u);
	return ok;
}

/* The URL without its query: signed URLs carry secrets there. */
static char *url_for_log(const char *url)
{
	size_t n = strcspn(url, "?#");
	return dws_xasprintf("%.*s", (int)n, url);
}

static char *dup_or_null(const char *s) { return s ? dws_xstrdup(s) : NULL; }

int dws_http_new(const dws_http_opts *o, dws_http **out, dws_error *err)
{
	pthread_once(&global_once, global_init);
	dws_http *h = dws_xcalloc(1, sizeof(*h));
	h->o = *o;
	h->cred = o->cred;
	if (!h->o.connect_timeout_ms)
		h->o.connect_timeout_ms = 10000;
	if (!h->o.stall_timeout_ms)
		h->o.stall_timeout_ms = 10000;
	if (!h->o.max_attempts)
		h->o.max_attempts = 8;
	if (!h->o.backoff_base_ms)
		h->o.backoff_base_ms = 200;
	if (!h->o.backoff_cap_ms)
		h->o.backoff_cap_ms = 10000;
	if (!h->o.deadline_ms)
		h->o.deadline_ms = 60000;
	h->token = dup_or_null(o->token);
	h->endpoint = dup_or_null(o->endpoint);
	h->ca_file = dup_or_null(o->ca_file);
	h->sigv4 = dup_or_null(o->aws_sigv4);
	h->userpwd = dup_or_null(o->aws_userpwd);
	for (int i = 0; i < DWS_HTTP_CAPTURE && o->capture[i]; i++)
		h->capture[i] = dws_xstrdup(o->capture[i]);
	h->error_header = dup_or_null(o->error_header);
	h->user_agent = dws_xasprintf("dwsfs/%s", DWSFS_VERSION);
	if (h->endpoint && !url_host(h->endpoint, &h->ep_host, &h->ep_port)) {
		dws_http_free(h);
		return dws_fail(err, DWS_EINVAL, "endpoint '%s' is not a URL", o->endpoint);
	}
	pthread_mutex_init(&h->lock, NULL);
	*out = h;
	return DWS_OK;
}

void dws_http_free(dws_http *h)
{
	if (!h)
		return;
	for (int i = 0; i < h->npool; i++)
		curl_easy_cleanup(h->pool[i]);
	dws_cred_free(h->cred);
	if (h->token) {
		explicit_bzero(h->token, strlen(h->token));
		free(h->token);
	}
	free(h->endpoint);
	free(h->ca_file);
	free(h->sigv4);
	if (h->userpwd) {
		explicit_bzero(h->userpwd, strlen(h->userpwd));
		free(h->userpwd);
	}
	for (int i = 0; i < DWS_HTTP_CAPTURE; i++)
		free(h->capture[i]);
	free(h->error_header);
	free(h->ep_host);
	free(h->user_agent);
	pthread_mutex_destroy(&h->lock);
	free(h);
}

void dws_http_counts(const dws_http *h, dws_http_class c, uint64_t *requests,
		     uint64_t *bytes)
{
	*requests = atomic_load(&((dws_http *)h)->reqs[c]);
	*bytes = atomic_load(&((dws_http *)h)->bytes[c]);
}

void dws_http_errors(const dws_http *h, uint64_t retries[DWS_HTTP_NERR], uint64_t failures[DWS_HTTP_NERR])
{
	for (int k = 0; k < DWS_HTTP_NERR; k++) {
		retries[k] = atomic_load(&((dws_http *)h)->retries[k]);
		failures[k] = atomic_load(&((dws_http *)h)->failures[k]);
	}
}

/* Easy handles are pooled: each keeps its connections alive. */
static CURL *handle_get(dws_http *h)
{
	CURL *c = NULL;
	pthread_mutex_lock(&h->lock);
	if (h->npool)
		c = h->pool[--h->npool];
	pthread_mutex_unlock(&h->lock);
	if (c)
		curl_easy_reset(c);
	else
		c = curl_easy_init();
	return c;
}

static void handle_put(dws_http *h, CURL *c)
{
	pthread_mutex_lock(&h->lock);
	if (h->npool < POOL_MAX) {
		h->pool[h->npool++] = c;
		c = NULL;
	}
	pthread_mutex_unlock(&h->lock);
	if (c)
		curl_easy_cleanup(c);
}

void dws_http_resp_free(dws_http_resp *rs)
{
	free(rs->body);
	free(rs->location);
	free(rs->final_url);
	memset(rs, 0, sizeof(*rs));
}

/* ---- one attempt ---- */

struct xfer {
	const dws_http *h;
	const dws_http_req *rq;
	dws_http_resp *rs;
	CURL *c;
	char *buf;
	size_t len, cap, max;
	bool overflow;
	double retry_after;
	/* the body of an answer that is not a 2xx, never in rq->dst or buf: its
	 * first ERR_KEEP bytes are kept for the caller, the rest read and
	 * dropped (the connection stays usable) up to max, then the transfer
	 * ends (ecut) with the status as it was */
	char ebuf[ERR_KEEP + 1];
	size_t elen;
	uint64_t etotal;
	bool ecut;
	uint64_t up_off;    /* a PUT's body: bytes handed to libcurl so far */
};

static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	(void)dt, (void)dn, (void)ut, (void)un;
	const struct xfer *x = ud;
	return halted(x->h, x->rq) ? 1 : 0;
}

/* A PUT's body, from the request's file or its string. */
static size_t on_upload(char *p, size_t sz, size_t n, void *ud)
{
	struct xfer *x = ud;
	const dws_http_upload *u = x->rq->upload;
	uint64_t len = u ? u->len : strlen(x->rq->body), left = len - x->up_off;
	size_t k = sz * n < left ? sz * n : (size_t)left;
	if (!k)
		return 0;
	if (!u) {
		memcpy(p, x->rq->body + x->up_off, k);
	} else {
		ssize_t r = pread(u->fd, p, k, (off_t)(u->off + x->up_off));
		if (r <= 0)
			return CURL_READFUNC_ABORT; /* the file shrank or failed */
		k = (size_t)r;
		if (u->sent)
			u->sent(u->ctx, x->up_off + k);
	}
	x->up_off += k;
	return k;
}

static size_t on_error_body(struct xfer *x, const char *p, size_t k)
{
	x->etotal += k;
	if (x->etotal > x->max) {
		x->ecut = true;
		return 0;
	}
	size_t keep = ERR_KEEP - x->elen < k ? ERR_KEEP - x->elen : k;
	memcpy(x->ebuf + x->elen, p, keep);
	x->elen += keep;
	return k;
}

static size_t on_body(char *p, size_t sz, size_t n, void *ud)
{
	struct xfer *x = ud;
	size_t k = sz * n;
	/* data only from a 2xx: an error answer (or a redirect's) body is no
	 * bytes of the object, whatever its length */
	long status = 0;
	curl_easy_getinfo(x->c, CURLINFO_RESPONSE_CODE, &status);
	if (status < 200 || status > 299)
		return on_error_body(x, p, k);
	if (x->rq->dst && x->rq->range_len) {
		if (x->len + k > x->rq->range_len) {
			x->overflow = true;
			return 0;
		}
		memcpy((char *)x->rq->dst + x->len, p, k);
		x->len += k;
		return k;
	}
	if (x->len + k > x->max) {
		x->overflow = true;
		return 0;
	}
	if (x->len + k + 1 > x->cap) {
		x->cap = (x->len + k + 1) * 2;
		if (x->cap > x->max + 1)
			x->cap = x->max + 1;
		x->buf = dws_xrealloc(x->buf, x->cap);
	}
	memcpy(x->buf + x->len, p, k);
	x->len += k;
	return k;
}

static void copy_value(char *dst, size_t n, const char *v, size_t vl)
{
	while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
		vl--;
	while (vl && *v == ' ') {
		v++;
		vl--;
	}
	if (vl >= n)
		vl = n - 1;
	memcpy(dst, v, vl);
	dst[vl] = 0;
}

static size_t on_header(char *p, size_t sz, size_t n, void *ud)
{
	struct xfer *x = ud;
	size_t k = sz * n;
	const char *colon = memchr(p, ':', k);
	if (!colon)
		return k;
	size_t nl = (size_t)(colon - p);
	const char *v = colon + 1;
	size_t vl = k - nl - 1;
	char tmp[2048];
#define IS(name) (nl == sizeof(name) - 1 && strncasecmp(p, name, nl) == 0)
#define IS_NAMED(name) (nl == strlen(name) && strncasecmp(p, name, nl) == 0)
	if (IS("link")) {
		copy_value(tmp, sizeof(tmp), v, vl);
		/* <url>; rel="next" (possibly among several links) */
		for (char *s = tmp; (s = strchr(s, '<'));) {
			char *e = strchr(s, '>');
			if (!e)
				break;
			if (strstr(e, "rel=\"next\"") && (!strchr(e, ',') || strstr(e, "rel=\"next\"") < strchr(e, ','))) {
				snprintf(x->rs->link_next, sizeof(x->rs->link_next), "%.*s", (int)(e - s - 1), s + 1);
				break;
			}
			s = e;
		}
	} else if (IS("etag")) {
		copy_value(x->rs->etag, sizeof(x->rs->etag), v, vl);
	} else if (x->h->error_header && IS_NAMED(x->h->error_header)) {
		copy_value(x->rs->error_code, sizeof(x->rs->error_code), v, vl);
	} else if (IS("content-length")) {
		copy_value(tmp, sizeof(tmp), v, vl);
		x->rs->has_content_length = dws_parse_u64(tmp, &x->rs->content_length);
	} else if (IS("content-range")) {
		/* "bytes A-B/TOTAL" ("bytes * /TOTAL" on a 416, TOTAL "*" unknown) */
		copy_value(tmp, sizeof(tmp), v, vl);
		char *slash = strrchr(tmp, '/');
		x->rs->has_range_total = slash && strncasecmp(tmp, "bytes ", 6) == 0 && dws_parse_u64(slash + 1, &x->rs->range_total);
	} else if (IS("retry-after")) {
		copy_value(tmp, sizeof(tmp), v, vl);
		char *end;
		double s = strtod(tmp, &end);
		if (end != tmp && s >= 0)
			x->retry_after = s;
	} else if (IS("ratelimit")) {
		/* "api";r=0;t=42: t is the seconds until the window resets */
		copy_value(tmp, sizeof(tmp), v, vl);
		char *t = strstr(tmp, ";t=");
		if (t && x->retry_after <= 0)
			x->retry_after = strtod(t + 3, NULL);
	} else {
		for (int i = 0; i < DWS_HTTP_CAPTURE && x->h->capture[i]; i++)
			if (IS_NAMED(x->h->capture[i]))
				copy_value(x->rs->captured[i], sizeof(x->rs->captured[i]), v, vl);
	}
#undef IS_NAMED
#undef IS
	return k;
}

/* An attempt's answer starts with no status and no headers. */
static void headers_reset(dws_http_resp *rs)
{
	rs->status = 0;
	rs->link_next[0] = rs->etag[0] = rs->error_code[0] = 0;
	for (int i = 0; i < DWS_HTTP_CAPTURE; i++)
		rs->captured[i][0] = 0;
	rs->content_length = rs->range_total = 0;
	rs->has_content_length = rs->has_range_total = false;
}

static bool same_host(dws_http *h, const char *url)
{
	char *host = NULL;
	long port = 0;
	bool same = h->ep_host && url_host(url, &host, &port) && strcasecmp(host, h->ep_host) == 0 && port == h->ep_port;
	free(host);
	return same;
}

/* One request without retries. Returns a CURLcode; fills status. */
/* The request's own header lines, its credentials and the body of a PUT. */
static struct curl_slist *auth_and_body(dws_http *h, CURL *c, const dws_http_req *rq, const char *url,
					const dws_secret *sec, struct xfer *x, struct curl_slist *hdr, char **auth)
{
	for (int i = 0; i < DWS_HTTP_HEADERS && rq->headers[i]; i++)
		if (!strpbrk(rq->headers[i], "\r\n"))
			hdr = curl_slist_append(hdr, rq->headers[i]);
	if (rq->method && !strcmp(rq->method, "PUT")) {
		curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(c, CURLOPT_READFUNCTION, on_upload);
		curl_easy_setopt(c, CURLOPT_READDATA, x);
		uint64_t len = rq->upload ? rq->upload->len : rq->body ? strlen(rq->body) : 0;
		/* no "Expect:" to skip 100-continue: libcurl would sign a header it
		 * does not send, and S3 refuses such a signature */
		curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, (curl_off_t)len);
	}
	/* the token goes to the endpoint's host only, never to a redirect target */
	const char *token = sec->token ? sec->token : h->token;
	if (token && same_host(h, url)) {
		*auth = dws_xasprintf("Authorization: Bearer %s", token);
		hdr = curl_slist_append(hdr, *auth);
	}
	if (h->sigv4) {
		curl_easy_setopt(c, CURLOPT_AWS_SIGV4, h->sigv4);
		if (sec->key && sec->secret) {
			curl_easy_setopt(c, CURLOPT_USERNAME, sec->key);
			curl_easy_setopt(c, CURLOPT_PASSWORD, sec->secret);
		} else {
			curl_easy_setopt(c, CURLOPT_USERPWD, h->userpwd);
		}
		/* temporary keys: the session token goes in a header libcurl signs */
		if (sec->session && !*auth) {
			*auth = dws_xasprintf("x-amz-security-token: %s", sec->session);
			hdr = curl_slist_append(hdr, *auth);
		}
		hdr = curl_slist_append(hdr, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
	}
	return hdr;
}

static CURLcode attempt(dws_http *h, const dws_http_req *rq, const char *url, const dws_secret *sec,
			int64_t deadline, struct xfer *x, char **redirect)
{
	CURL *c = handle_get(h);
	struct curl_slist *hdr = NULL;
	char line[512];
	const char *method = rq->method ? rq->method : "GET";
	x->c = c;
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(c, CURLOPT_USERAGENT, h->user_agent);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)h->o.connect_timeout_ms);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
	long stall_s = (long)((h->o.stall_timeout_ms + 999) / 1000);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, stall_s > 0 ? stall_s : 1L);
	int64_t left = deadline - dws_now_ms();
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)(left > 1 ? left : 1));
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
	if (h->ca_file)
		curl_easy_setopt(c, CURLOPT_CAINFO, h->ca_file);
	/* big bodies in fewer, larger recv() calls and callbacks; no larger:
	 * libcurl allocates this buffer for every transfer and frees it at its
	 * end, and at 256 KiB glibc gave it fresh pages each time (an mmap, 64
	 * page faults and an munmap per 8 MiB block; 128 KiB comes from the
	 * heap and is reused): 13% less daemon CPU on a cold read */
	curl_easy_setopt(c, CURLOPT_BUFFERSIZE, 128L * 1024);
	curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(c, CURLOPT_XFERINFODATA, x);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(c, CURLOPT_HEADERDATA, x);
	curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, NULL);
	if (!strcmp(method, "HEAD")) {
		curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
	} else if (!strcmp(method, "DELETE")) {
		curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "DELETE");
	} else if (!strcmp(method, "POST")) {
		curl_easy_setopt(c, CURLOPT_POST, 1L);
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, rq->body ? rq->body : "");
		curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)(rq->body ? strlen(rq->body) : 0));
		snprintf(line, sizeof(line), "Content-Type: %s", rq->content_type ? rq->content_type : "application/json");
		hdr = curl_slist_append(hdr, line);
	}
	if (rq->range_len) {
		snprintf(line, sizeof(line), "%llu-%llu", (unsigned long long)rq->range_off,
			 (unsigned long long)(rq->range_off + rq->range_len - 1));
		curl_easy_setopt(c, CURLOPT_RANGE, line);
	}
	if (rq->if_match && strlen(rq->if_match) < sizeof(line) - 16 && !strpbrk(rq->if_match, "\r\n")) {
		snprintf(line, sizeof(line), "If-Match: %s", rq->if_match);
		hdr = curl_slist_append(hdr, line);
	}
	char *auth = NULL;
	hdr = auth_and_body(h, c, rq, url, sec, x, hdr, &auth);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
	CURLcode rc = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &x->rs->status);
	if (rc == CURLE_OK && x->rs->status >= 300 && x->rs->status < 400) {
		char *loc = NULL;
		curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &loc);
		if (loc)
			*redirect = dws_xstrdup(loc);
	}
	for (struct curl_slist *l = hdr; l; l = l->next)
		explicit_bzero(l->data, strlen(l->data)); /* copies of a secret among them */
	curl_slist_free_all(hdr);
	if (auth) {
		explicit_bzero(auth, strlen(auth));
		free(auth);
	}
	atomic_fetch_add(&h->reqs[rq->cls], 1);
	atomic_fetch_add(&h->bytes[rq->cls], x->len);
	if (rc == CURLE_OK)
		handle_put(h, c);
	else
		curl_easy_cleanup(c); /* a failed connection is not reused */
	return rc;
}

static bool retryable_curl(CURLcode rc)
{
	switch (rc) {
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_RECV_ERROR:
	case CURLE_SEND_ERROR:
	case CURLE_OPERATION_TIMEDOUT:
	case CURLE_PARTIAL_FILE:
	case CURLE_GOT_NOTHING:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
	case CURLE_SSL_CONNECT_ERROR:
		return true;
	default:
		return false;
	}
}

static bool retryable_status(long s)
{
	return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

static unsigned jitter(unsigned ms)
{
	unsigned r = 0;
	if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != sizeof(r))
		r = (unsigned)dws_now_ms();
	return ms / 2 + (ms ? r % (ms / 2 + 1) : 0);
}

/* The one error line of a request that failed. */
static void fail_line(const dws_http_req *rq, const char *why, int rc, dws_error *err)
{
	char *logurl = url_for_log(rq->url);
	const char *what = rq->what ? rq->what : "request", *method = rq->method ? rq->method : "GET";
	if (rq->range_len)
		dws_fail(err, rc, "%s: %s %s bytes %llu-%llu: %s", what, method, logurl, (unsigned long long)rq->range_off,
			 (unsigned long long)(rq->range_off + rq->range_len - 1), why);
	else
		dws_fail(err, rc, "%s: %s %s: %s", what, method, logurl, why);
	free(logurl);
}

/* What an attempt came to. */
enum outcome { O_DONE, O_RETRY, O_REDIRECT };

/* A 2xx answer: kept in rs (O_DONE), or a short range read to try again. */
static enum outcome judge_ok(const dws_http_req *rq, dws_http_resp *rs, struct xfer *x, const char *url, char *why,
			     size_t wl, int *rc)
{
	long status = rs->status;
	if (rq->range_len && rq->dst) {
		if (status == 200 && rq->range_off != 0) {
			snprintf(why, wl, "the server ignored the Range header");
			*rc = DWS_EIO;
			free(x->buf);
			return O_DONE;
		}
		if (x->len != rq->range_len) {
			snprintf(why, wl, "truncated answer: %zu of %llu bytes", x->len, (unsigned long long)rq->range_len);
			return O_RETRY;
		}
	}
	bool direct = rq->dst && rq->range_len;
	rs->body = x->buf ? x->buf : dws_xcalloc(1, 1);
	rs->len = direct ? 0 : x->len;
	rs->body[rs->len] = 0;
	rs->final_url = dws_xstrdup(url);
	rs->status = status;
	*rc = DWS_OK;
	return O_DONE;
}

/* An error status: the error body kept in rs (O_DONE), or one to try again
 * (*wait_ms from Retry-After). */
static enum outcome judge_error(dws_http_resp *rs, struct xfer *x, char *why, size_t wl, unsigned *wait_ms, int *rc)
{
	snprintf(why, wl, "HTTP %ld%s%s", rs->status, rs->error_code[0] ? " " : "", rs->error_code);
	if (retryable_status(rs->status)) {
		if (rs->status == 429 && x->retry_after > 0)
			*wait_ms = (unsigned)(x->retry_after * 1000);
		return O_RETRY;
	}
	*rc = rs->status == 404 || rs->status == 410 ? DWS_ENOENT : rs->status == 416 ? DWS_EFORMAT : DWS_EIO;
	rs->body = dws_xmalloc(x->elen + 1);
	memcpy(rs->body, x->ebuf, x->elen);
	rs->body[x->elen] = 0;
	rs->len = x->elen;
	free(x->buf);
	return O_DONE;
}

/* One attempt's result: O_DONE with *rc (x's buffer taken or freed),
 * O_REDIRECT with *redirect to follow, or O_RETRY. */
static enum outcome judge(const dws_http_req *rq, dws_http_resp *rs, struct xfer *x, CURLcode cc, int64_t deadline,
			  char **redirect, const char *url, char *why, size_t wl, unsigned *wait_ms, int *rc)
{
	*rc = DWS_EIO;
	if (x->overflow) {
		snprintf(why, wl, rq->range_len ? "the server sent more than the %llu bytes asked for" : "the answer is larger than %llu bytes",
			 (unsigned long long)(rq->range_len ? rq->range_len : x->max));
		free(x->buf);
		return O_DONE;
	}
	if (cc != CURLE_OK) {
		snprintf(why, wl, "%s", curl_easy_strerror(cc));
		bool retry = retryable_curl(cc) && !(cc == CURLE_OPERATION_TIMEDOUT && dws_now_ms() >= deadline);
		free(x->buf);
		return retry ? O_RETRY : O_DONE;
	}
	if (rs->status >= 300 && rs->status < 400 && *redirect) {
		free(x->buf);
		if (rq->no_follow) {
			rs->location = *redirect;
			*redirect = NULL;
			*rc = DWS_OK;
			return O_DONE;
		}
		return O_REDIRECT;
	}
	enum outcome o = rs->status >= 200 && rs->status < 300 ? judge_ok(rq, rs, x, url, why, wl, rc)
							       : judge_error(rs, x, why, wl, wait_ms, rc);
	if (o == O_RETRY)
		free(x->buf);
	return o;
}

/* Why an attempt that did not give a 2xx failed (dws_http_error_kind). */
static int attempt_kind(const struct xfer *x, CURLcode cc, long status, enum outcome o)
{
	if (x->overflow)
		return DWS_HTTP_ERR_OTHER;
	if (cc != CURLE_OK)
		return DWS_HTTP_ERR_NETWORK;
	if (status == 429)
		return DWS_HTTP_ERR_THROTTLED;
	if (status == 404 || status == 410)
		return DWS_HTTP_ERR_NOT_FOUND;
	if (status < 200 || status >= 300)
		return DWS_HTTP_ERR_STATUS;
	return o == O_RETRY ? DWS_HTTP_ERR_TRUNCATED : DWS_HTTP_ERR_OTHER;
}

/* Wait before attempt att+1: DWS_OK, or why not (attempts or the deadline
 * used up). A shutdown cuts the wait short. */
static int backoff(dws_http *h, const dws_http_req *rq, unsigned att, unsigned wait_ms, int64_t deadline, char *why,
		   size_t wl)
{
	if (att + 1 >= h->o.max_attempts)
		return DWS_EIO;
	if (!wait_ms) {
		uint64_t b = (uint64_t)h->o.backoff_base_ms << (att < 16 ? att : 16);
		wait_ms = jitter(b > h->o.backoff_cap_ms ? h->o.backoff_cap_ms : (unsigned)b);
	}
	int64_t now = dws_now_ms();
	if (now + wait_ms >= deadline) {
		snprintf(why + strlen(why), wl - strlen(why), "; deadline reached");
		return DWS_ETIMEDOUT;
	}
	for (int64_t until = now + wait_ms; !halted(h, rq) && dws_now_ms() < until;) {
		int64_t left = until - dws_now_ms();
		int64_t slice = left < 50 ? (left > 0 ? left : 0) : 50;
		struct timespec ts = {0, (long)slice * 1000000};
		nanosleep(&ts, NULL);
	}
	return DWS_OK;
}

/* A refused request (401, 403): true to try again with credentials that
 * changed since (the one try it gets); else the explanation after why. */
static bool refused(dws_http *h, const char *url, const dws_http_resp *rs, const dws_secret *sec, bool *reauthed,
		    char *why, size_t wl)
{
	/* a CDN's 403 is about its signed URL, not about our credentials */
	if (!h->cred || (rs->status != 401 && rs->status != 403) || (h->ep_host && !same_host(h, url)))
		return false;
	if (!*reauthed && dws_cred_rejected(h->cred, sec->gen)) {
		*reauthed = true;
		return true;
	}
	size_t l = strlen(why);
	if (l + 3 < wl) {
		snprintf(why + l, wl - l, "; ");
		dws_cred_explain(h->cred, rs->status, why + l + 2, wl - l - 2);
	}
	return false;
}

int dws_http_do(dws_http *h, const dws_http_req *rq, dws_http_resp *rs,
		dws_error *err)
{
	memset(rs, 0, sizeof(*rs));
	int64_t deadline = rq->deadline_ms ? rq->deadline_ms : dws_now_ms() + h->o.deadline_ms;
	char *url = dws_xstrdup(rq->url);
	char why[640] = "";
	int hops = 0, rc = DWS_EIO, kind = -1;
	bool reauthed = false;
	for (unsigned att = 0;; att++) {
		struct xfer x = {.h = h, .rq = rq, .rs = rs, .max = rq->max_body ? rq->max_body : DEFAULT_MAX_BODY};
		char *redirect = NULL;
		unsigned wait_ms = 0;
		headers_reset(rs);
		if (halted(h, rq)) {
			snprintf(why, sizeof(why), atomic_load(&h->cancelled) ? "shutting down" : "interrupted");
			break;
		}
		dws_secret sec = {0};
		dws_error ce = {0};
		if (h->cred && (rc = dws_cred_get(h->cred, &sec, &ce)) != DWS_OK) {
			snprintf(why, sizeof(why), "%.600s", ce.msg);
			break;
		}
		CURLcode cc = attempt(h, rq, url, &sec, deadline, &x, &redirect);
		if (x.ecut && cc == CURLE_WRITE_ERROR)
			cc = CURLE_OK; /* an endless error body: its status stands */
		enum outcome o = judge(rq, rs, &x, cc, deadline, &redirect, url, why, sizeof(why), &wait_ms, &rc);
		bool again = o == O_DONE && rc != DWS_OK && refused(h, url, rs, &sec, &reauthed, why, sizeof(why));
		dws_secret_clear(&sec);
		if (again) {
			free(rs->body);
			rs->body = NULL;
			rc = DWS_EIO;
			att--; /* not a failed attempt: other credentials */
			continue;
		}
		if (o == O_REDIRECT) {
			if (++hops > MAX_HOPS) {
				free(redirect);
				snprintf(why, sizeof(why), "more than %d redirects", MAX_HOPS);
				rc = DWS_EIO;
				kind = DWS_HTTP_ERR_OTHER;
				break;
			}
			free(url);
			url = redirect;
			att--; /* a redirect is not a failed attempt */
			continue;
		}
		free(redirect);
		kind = attempt_kind(&x, cc, rs->status, o);
		if (o == O_DONE || (rc = backoff(h, rq, att, wait_ms, deadline, why, sizeof(why))) != DWS_OK)
			break;
		atomic_fetch_add(&h->retries[kind], 1);
		rc = DWS_EIO;
		/* retry from the original URL: a redirect target may have expired */
		if (hops) {
			free(url);
			url = dws_xstrdup(rq->url);
			hops = 0;
		}
	}
	if (rc != DWS_OK && rq->stop && *rq->stop)
		snprintf(why, sizeof(why), "interrupted");
	if (rc != DWS_OK)
		fail_line(rq, why, rc, err);
	if (rc != DWS_OK && kind >= 0 && !halted(h, rq)) /* a shutdown is no failure */
		atomic_fetch_add(&h->failures[kind], 1);
	free(url);
	return rc;
}
