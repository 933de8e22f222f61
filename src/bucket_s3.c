/* s3://BUCKET[/PREFIX]: placeholder until the S3 backend lands. */
#include "bucket.h"

int dws_bucket_s3_open(const char *uri, const dws_bucket_opts *o, dws_bucket **out,
		       dws_error *err)
{
	(void)o;
	(void)out;
	return dws_fail(err, DWS_EUNSUP, "%s: s3:// buckets are not supported yet", uri);
}
