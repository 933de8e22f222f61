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
};

struct dws_bucket {
	const struct dws_bucket_ops *ops;
	char *uri;
	void *priv;
};

int dws_bucket_local_open(const char *path, dws_bucket **out, dws_error *err);
void dws_objects_sort(dws_object *v, size_t n);

#endif
