/* A URI names a backend: a folder (or file://), hf:// or s3://. */
#include "bucket.h"

#include <string.h>

void dws_bucket_opts_init(dws_bucket_opts *o)
{
	*o = (dws_bucket_opts){
		.size = sizeof(*o),
		.cache_size = 16ull << 30,
		.block_size = 8u << 20,
		.stall_timeout_ms = 10000,
		.read_deadline_ms = 60000,
	};
}

/* Values the backends could not work with. */
static int check_opts(const dws_bucket_opts *o, dws_error *err)
{
	int rc = dws_opts_size(o->size, sizeof(*o), "dws_bucket_opts", err);
	if (!rc && (o->block_size < 4096 || o->block_size % 4096 || o->block_size > (1u << 30)))
		rc = dws_fail(err, DWS_EINVAL, "dws_bucket_opts: block_size %u is not a multiple of 4 KiB from 4 KiB to 1 GiB",
			      o->block_size);
	if (!rc && (!o->stall_timeout_ms || !o->read_deadline_ms))
		rc = dws_fail(err, DWS_EINVAL, "dws_bucket_opts: stall_timeout_ms and read_deadline_ms must be above 0");
	return rc;
}

int dws_bucket_open_opts(const char *uri, const dws_bucket_opts *o,
			 dws_bucket **out, dws_error *err)
{
	*out = NULL;
	int rc = o ? check_opts(o, err) : DWS_OK;
	if (rc)
		return rc;
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
