/* Backend interface behind dws_bucket. */
#ifndef DWSFS_BUCKET_H
#define DWSFS_BUCKET_H

#include "internal.h"

#include <pthread.h>
#include <signal.h>

struct dws_bucket_ops {
	int (*list)(dws_bucket *b, const char *prefix, dws_object **out,
		    size_t *n, dws_error *err);
	int (*open_blob)(dws_bucket *b, const dws_object *obj, dws_blob **out,
			 dws_error *err);
	void (*close)(dws_bucket *b);
	int (*probe)(dws_bucket *b, char *token, size_t len, dws_error *err);
	int (*head)(dws_bucket *b, const char *key, dws_object *out, dws_error *err);
	/* writing (dwsctl publish to a remote bucket); NULL: read-only */
	int (*put)(dws_bucket *b, const char *key, int fd, uint64_t len,
		   void (*sent)(void *ctx, uint64_t bytes), void *ctx,
		   const volatile sig_atomic_t *stop, dws_error *err);
	int (*del)(dws_bucket *b, const char *key, dws_error *err);
};

/* Write object key whole from fd (len bytes from offset 0); sent(ctx,
 * bytes) as they go (0 first). Once *stop is set (NULL: never) the write
 * ends, undone, with "interrupted". DWS_EUNSUP for a backend that cannot. */
int dws_bucket_put(dws_bucket *b, const char *key, int fd, uint64_t len,
		   void (*sent)(void *ctx, uint64_t bytes), void *ctx,
		   const volatile sig_atomic_t *stop, dws_error *err);
int dws_bucket_delete(dws_bucket *b, const char *key, dws_error *err);

struct dws_http;
struct dws_cache;

struct dws_bucket {
	const struct dws_bucket_ops *ops;
	char *uri;
	void *priv;
	struct dws_cache *cache; /* remote buckets */
	struct dws_http *http;
	dws_fetch_count *fetched; /* local buckets: bytes read from their files */
};

/* Reads of b's files count in into's bytes fetched from now on (a base
 * model folder read beside the bucket), where into counts its own. */
void dws_bucket_count_into(dws_bucket *b, const dws_bucket *into);

int dws_bucket_local_open(const char *path, dws_bucket **out, dws_error *err);
int dws_bucket_hf_open(const char *uri, const dws_bucket_opts *o, dws_bucket **out,
		       dws_error *err);
int dws_bucket_s3_open(const char *uri, const dws_bucket_opts *o, dws_bucket **out,
		       dws_error *err);
/* The end of a remote backend's open: the dws_bucket around priv, with the
 * shared block cache for bo. If rc (or the cache) failed, ops->close undoes
 * everything and rc is returned. */
int dws_bucket_remote_wrap(const struct dws_bucket_ops *ops, void *priv, const char *uri,
			   const dws_bucket_opts *bo, struct dws_http *http, int rc,
			   dws_bucket **out, dws_error *err);
void dws_objects_sort(dws_object *v, size_t n);

/* A growing list of listed objects, capped. */
typedef struct dws_objvec {
	dws_object *v;
	size_t n, cap;
} dws_objvec;
/* A zeroed new slot, or NULL past max objects. */
dws_object *dws_objvec_push(dws_objvec *ov, size_t max);

/* "2024-05-01T12:00:00.123Z" -> ns since the epoch; 0 if it does not parse. */
int64_t dws_parse_time_ns(const char *s);

/* What every range answer for one listed object must show, so that the
 * block cache, which keys blocks by the listed identity, never holds bytes
 * of another content (hf and s3 alike): the listed size as Content-Range's
 * total, the listed content hash wherever the answer names one (X-Xet-Hash,
 * an ETag that is the hash), and one ETag for every answer (sent as
 * If-Match, compared after the fact for servers that ignore it). */
typedef struct dws_range_pin {
	uint64_t size;          /* listed size */
	char hash[80];          /* listed content hash (Xet, LFS sha256), "" none */
	char etag[160];         /* the ETag answers must carry, "" none yet */
	bool etag_is_hash;      /* this server's ETags are content hashes: one
				   that is another hash of the listed hash's kind
				   is another content */
} dws_range_pin;

struct dws_http_resp;
/* Check the answer rs to a range read (or a HEAD) of the object pinned by
 * p, rc being what dws_http_do returned, hash the content hash the answer
 * names (the Hub's X-Xet-Hash; NULL or "" none): rc, or DWS_ENOENT with one
 * line saying what changed (for a 412, in place of dws_http_do's message). */
int dws_range_check(const char *what, const dws_range_pin *p, int rc,
		    const struct dws_http_resp *rs, const char *hash, dws_error *err);
/* The If-Match value for p (a strong ETag, quoted) into buf; "" if none. */
void dws_range_if_match(const dws_range_pin *p, char *buf, size_t n);
/* Whether an ETag (W/ and quotes aside) is the content hash `hash`. */
bool dws_etag_names(const char *etag, const char *hash);

/* Keys a listing ignored, each logged once per bucket however often it is
 * listed again (bounded: past IGNORED_MAX keys, one line says the rest go
 * unlogged). */
typedef struct dws_ignored {
	pthread_mutex_t lock;
	dws_strmap seen;
	char **keys;            /* owned; seen points into them */
	size_t n;
} dws_ignored;
void dws_ignored_init(dws_ignored *ig);
void dws_ignored_free(dws_ignored *ig);
/* Logs "URI: ignoring listed object 'KEY': WHY" the first time KEY comes. */
void dws_ignored_log(dws_ignored *ig, const char *uri, const char *key, const char *why);

#endif
