/* Bucket dispatch: a URI names a backend. Only the local folder exists in
 * this file; HTTP backends plug in through the same ops table. */
#include "bucket.h"

#include <stdlib.h>
#include <string.h>

int dws_bucket_open(const char *uri, dws_bucket **out, dws_error *err)
{
	*out = NULL;
	if (!uri || !*uri)
		return dws_fail(err, DWS_EINVAL, "bucket: empty location");
	if (strncmp(uri, "file://", 7) == 0)
		return dws_bucket_local_open(uri + 7, out, err);
	if (strstr(uri, "://"))
		return dws_fail(err, DWS_EUNSUP, "%s: unsupported bucket scheme (local folders and file:// are supported)", uri);
	return dws_bucket_local_open(uri, out, err);
}

void dws_bucket_close(dws_bucket *b)
{
	if (!b)
		return;
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
