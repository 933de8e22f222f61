/* A URI names a backend: a folder (or file://), hf:// or s3://. */
#include "bucket.h"

#include <string.h>

int dws_bucket_open_opts(const char *uri, const dws_bucket_opts *o,
			 dws_bucket **out, dws_error *err)
{
	*out = NULL;
	if (!uri || !*uri)
		return dws_fail(err, DWS_EINVAL, "bucket: empty location");
	if (strncmp(uri, "file://", 7) == 0)
		return dws_bucket_local_open(uri + 7, out, err);
	if (strncmp(uri, "hf://", 5) == 0)
		return dws_bucket_hf_open(uri, o, out, err);
	if (strncmp(uri, "s3://", 5) == 0)
		return dws_bucket_s3_open(uri, o, out, err);
	if (strstr(uri, "://"))
		return dws_fail(err, DWS_EUNSUP, "%s: unsupported bucket scheme (a folder, file://, hf:// or s3://)", uri);
	return dws_bucket_local_open(uri, out, err);
}

int dws_bucket_open(const char *uri, dws_bucket **out, dws_error *err)
{
	return dws_bucket_open_opts(uri, NULL, out, err);
}
