/* HTTP over libcurl for the remote bucket backends. */
#ifndef DWSFS_HTTP_H
#define DWSFS_HTTP_H

#include "internal.h"

#include <signal.h>

typedef struct dws_http dws_http;

#define DWS_HTTP_CAPTURE 4 /* answer headers a client may name to keep */
#define DWS_HTTP_HEADERS 4 /* request headers a request may add */

struct dws_cred;

typedef struct dws_http_opts {
	const char *token;        /* Bearer token; sent to the endpoint host only */
	const char *endpoint;     /* scheme://host[:port] the token belongs to */
	const char *ca_file;      /* extra CA bundle; TLS verification stays on */
	const char *aws_sigv4;    /* "aws:amz:REGION:s3" to sign with SigV4 */
	const char *aws_userpwd;  /* "KEY:SECRET" */
	/* credentials asked for before every attempt (a token to send as
	 * above, or AWS keys to sign with): owned by the handle from now on,
	 * even when dws_http_new fails. A 401 or 403 asks for them again and,
	 * when they changed, tries once more; a refusal's message says where
	 * they came from and what to do. */
	struct dws_cred *cred;
	unsigned connect_timeout_ms; /* default 10000 */
	unsigned stall_timeout_ms;   /* no byte for this long ends a transfer; 10000 */
	unsigned max_attempts;       /* default 8 */
	unsigned backoff_base_ms;    /* default 200 */
	unsigned backoff_cap_ms;     /* default 10000 */
	unsigned deadline_ms;        /* a whole request with retries; 60000 */
	/* further answer headers kept in every dws_http_resp (captured[i] is
	 * capture[i]'s value); NULL ends the list early */
	const char *capture[DWS_HTTP_CAPTURE];
	const char *error_header; /* names a failure: its value in error_code,
				     and in the message after the status */
} dws_http_opts;

typedef enum dws_http_class { DWS_HTTP_API, DWS_HTTP_RESOLVE, DWS_HTTP_CDN, DWS_HTTP_S3, DWS_HTTP_NCLASS } dws_http_class;

/* A PUT's body from a file: len bytes from offset off (read again for each
 * attempt); sent(ctx, bytes) as they go, bytes counted from off. */
typedef struct dws_http_upload {
	int fd;
	uint64_t off, len;
	void (*sent)(void *ctx, uint64_t bytes);
	void *ctx;
} dws_http_upload;

typedef struct dws_http_req {
	const char *method;       /* "GET" (default), "HEAD", "POST", "PUT", "DELETE" */
	const char *url;
	dws_http_class cls;
	uint64_t range_off, range_len; /* range_len > 0: Range: bytes=off-(off+len-1) */
	const char *body;         /* POST or PUT body (NUL-terminated) */
	const dws_http_upload *upload; /* PUT: the body from a file instead */
	const char *headers[DWS_HTTP_HEADERS]; /* "Name: value" lines to add */
	const char *content_type;
	void *dst;                /* with a range: exactly range_len bytes of a 2xx
				     land here, never a byte of an error answer */
	size_t max_body;          /* buffered body cap (default 64 MiB) */
	bool no_follow;           /* return a 3xx instead of following it */
	const char *if_match;     /* If-Match: a strong ETag (a changed object: 412) */
	int64_t deadline_ms;      /* absolute CLOCK_MONOTONIC ms; 0: opts default */
	const char *what;         /* names the object in errors */
	/* set (by a signal handler, say): this request ends at once, with no
	 * retry and no wait ("interrupted"); NULL: none */
	const volatile sig_atomic_t *stop;
} dws_http_req;

typedef struct dws_http_resp {
	long status;
	char *body;               /* NUL-terminated, malloc'd: a 2xx's body (when no
				     dst), or the first 4 KiB of an error answer's */
	size_t len;
	char *location;           /* absolute redirect target (no_follow) */
	char *final_url;          /* where the bytes came from after redirects */
	char link_next[2048];     /* Link: <...>; rel="next" */
	char etag[160];           /* ETag */
	char error_code[64];      /* the opts' error_header */
	char captured[DWS_HTTP_CAPTURE][160]; /* the opts' capture headers, "" absent */
	uint64_t content_length;  /* Content-Length */
	bool has_content_length;
	uint64_t range_total;     /* Content-Range: bytes A-B/TOTAL */
	bool has_range_total;
} dws_http_resp;

int dws_http_new(const dws_http_opts *o, dws_http **out, dws_error *err);
void dws_http_free(dws_http *h);
/* From now on every transfer of h, running or to come, fails at once
 * (shutting down: no retry, no wait). */
void dws_http_cancel(dws_http *h);
/* Perform with retries (408, 429, 5xx, resets, stalls, truncation) within
 * the deadline. A 2xx is DWS_OK; 404 is DWS_ENOENT; other finals DWS_EIO.
 * The token never goes to another host and never into a message. */
int dws_http_do(dws_http *h, const dws_http_req *rq, dws_http_resp *rs,
		dws_error *err);
void dws_http_resp_free(dws_http_resp *rs);
/* libcurl's global setup, once per process (before any handle). */
void dws_http_global_init(void);
/* Escape everything but unreserved characters (a query value). */
char *dws_http_escape(const char *s);
/* A query string "a=1&b=2" of n name/value pairs (kv[2i], kv[2i+1]; a NULL
 * value is "") in SigV4's canonical form: each name and value escaped (all
 * but A-Za-z0-9-._~, uppercase hex), sorted by name then value, every "="
 * written. libcurl up to 8.x signs the query as sent, unsorted, while S3
 * checks the canonical form: an S3 query must be built here. */
char *dws_http_query(const char *const *kv, size_t n);
/* Escape each path segment (keeps '/'): "a b/c#d" -> "a%20b/c%23d". */
char *dws_http_escape_path(const char *path);
/* Requests and bytes per class since start. */
void dws_http_counts(const dws_http *h, dws_http_class c, uint64_t *requests,
		     uint64_t *bytes);

/* Attempts retried and requests failed for good since start, by why
 * (dws_http_error_kind). */
void dws_http_errors(const dws_http *h, uint64_t retries[DWS_HTTP_NERR], uint64_t failures[DWS_HTTP_NERR]);

int64_t dws_now_ms(void);

#endif
