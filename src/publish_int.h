/* What publish.c and publish_out.c share: where a step goes. */
#ifndef DWSFS_PUBLISH_INT_H
#define DWSFS_PUBLISH_INT_H

#include "bucket.h"

#include <zstd.h>

/* The bucket a step is published into. */
typedef struct dws_pubtarget {
	const char *uri;        /* as given: a folder, file://, s3:// */
	bool remote;
	dws_bucket *b;
	char *existing[8];      /* keys of the step's files already there */
	size_t nexisting;
} dws_pubtarget;

/* Open uri for step: refused for hf:// (no uploader), and when the step is
 * there already unless force. A local folder is made if missing. */
int dws_pubtarget_open(const char *uri, uint64_t step, bool force, dws_pubtarget *t, dws_error *err);
void dws_pubtarget_close(dws_pubtarget *t);

/* The step's file being written: compressed on the way when zstd. */
typedef struct dws_pubout {
	int fd;
	char *tmp;              /* local: the temporary name; remote: NULL */
	char *final;            /* where it goes (path or URI/key); kept for
				   the caller until dws_pubout_free */
	char *key;              /* its key in the bucket */
	uint64_t size;          /* bytes written */
	ZSTD_CCtx *z;
	char *zbuf;
	size_t zcap;
	const dws_progress *pr;
} dws_pubout;

int dws_pubout_open(dws_pubout *f, dws_pubtarget *t, bool anchor, uint64_t step, bool zstd, int level,
		    uint64_t content_size, dws_error *err);
int dws_pubout_write(dws_pubout *f, const void *p, size_t n, bool end, dws_error *err);
/* ok: put it in place (rename, or upload with pr's "upload" progress, ended
 * and undone once *stop is set) and remove the step's other files; else
 * drop it. */
int dws_pubout_close(dws_pubout *f, dws_pubtarget *t, bool ok, const dws_progress *pr,
		     const volatile sig_atomic_t *stop, dws_error *err);
void dws_pubout_free(dws_pubout *f);

#endif
