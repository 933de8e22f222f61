/* Backend interface behind dws_bucket. */
#ifndef DWSFS_BUCKET_H
#define DWSFS_BUCKET_H

#include "internal.h"

struct dws_bucket_ops {
	int (*list)(dws_bucket *b, const char *prefix, dws_object **out,
		    size_t *n, dws_error *err);
	int (*open_blob)(dws_bucket *b, const dws_object *obj, dws_blob **out,
			 dws_error *err);
	void (*close)(dws_bucket *b);
	int (*probe)(dws_bucket *b, char *token, size_t len, dws_error *err);
	int (*head)(dws_bucket *b, const char *key, dws_object *out, dws_error *err);
};

struct dws_http;
struct dws_cache;

struct dws_bucket {
	const struct dws_bucket_ops *ops;
	char *uri;
	void *priv;
	struct dws_cache *cache; /* remote buckets */
	struct dws_http *http;
};

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

#endif
