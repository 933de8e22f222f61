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
struct dws_cache *dws_bucket_cache(dws_bucket *b);
void dws_objects_sort(dws_object *v, size_t n);

#endif
