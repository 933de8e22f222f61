/* Writing one S3 object from a file: PutObject, or a multipart upload past a
 * threshold (see s3_upload.c). */
#ifndef DWSFS_S3_UPLOAD_H
#define DWSFS_S3_UPLOAD_H

#include "internal.h"

#include <signal.h>

#define DWS_S3_PUT_MAX (5ull << 30)     /* one PutObject, one part: 5 GiB */
#define DWS_S3_PART_MIN (5ull << 20)    /* every part but the last: 5 MiB */
#define DWS_S3_MAX_PARTS 10000u
#define DWS_S3_OBJECT_MAX (5ull << 40)  /* one object: 5 TiB */

typedef struct dws_s3_upload_conf {
	uint64_t threshold; /* objects over it go in parts (at most 5 GiB) */
	uint64_t part_size; /* 5 MiB to 5 GiB; grown for objects that need it */
} dws_s3_upload_conf;

/* DWSFS_S3_MULTIPART_THRESHOLD and DWSFS_S3_PART_SIZE (bytes, or with K, M,
 * G or T: binary units), 64 MiB each when unset. A bad value is one error
 * line naming the variable. */
int dws_s3_upload_conf_env(dws_s3_upload_conf *c, dws_error *err);

/* The part size for len bytes: part, grown to a whole MiB that fits the
 * object in DWS_S3_MAX_PARTS parts; 0 past DWS_S3_OBJECT_MAX. */
uint64_t dws_s3_part_size(uint64_t len, uint64_t part);

struct dws_http;

typedef struct dws_s3_put {
	struct dws_http *http;
	const char *url;       /* the object's, without a query */
	const char *what;      /* names it in errors: s3://BUCKET/KEY */
	int fd;
	uint64_t len;          /* bytes from offset 0 of fd */
	void (*sent)(void *ctx, uint64_t bytes);
	void *ctx;
	const volatile sig_atomic_t *stop; /* set: stop, undo, "interrupted" */
} dws_s3_put;

/* The object whole or not at all: one PutObject up to c->threshold, else a
 * multipart upload, aborted on any failure or a stop. */
int dws_s3_upload(const dws_s3_put *p, const dws_s3_upload_conf *c, dws_error *err);

#endif
