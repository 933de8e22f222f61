/* Where dwsctl publish writes a step (see publish.c). A step is one file,
 * so a reader must see all of it or none of it:
 *   a local bucket folder: written under a temporary name beside it,
 *     fsync'd, renamed into place;
 *   s3://BUCKET[/PREFIX]: spooled to an unnamed local file ($TMPDIR, else
 *     /var/tmp), then one PutObject, or past DWSFS_S3_MULTIPART_THRESHOLD a
 *     multipart upload (s3_upload.c; S3 shows an object whole or not at
 *     all), signed with the credentials reading uses;
 *   hf://: refused. The Hub takes uploads through Xet storage, which has no
 *     C client (shared/spec/hf-bucket-api.md, Writing).
 * A step the bucket holds already (any of its four names) is refused unless
 * forced; forced, the step's other files are removed once the new one is in
 * place, since the catalog would go on picking a complete anchor of the
 * step over the new file. */
#include "publish_int.h"
#include "s3_upload.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- the target ---- */

/* The step's files the bucket holds, into t->existing. */
static int find_step(dws_pubtarget *t, uint64_t step, dws_error *err)
{
	static const char *const dirs[] = {"anchors", "deltas"};
	for (size_t d = 0; d < 2; d++) {
		dws_object *v = NULL;
		size_t n = 0;
		int rc = dws_bucket_list(t->b, dirs[d], &v, &n, err);
		if (rc == DWS_ENOENT) {
			if (err)
				err->code = 0;
			continue;
		}
		if (rc)
			return rc;
		size_t dl = strlen(dirs[d]);
		for (size_t i = 0; i < n; i++) {
			uint64_t s;
			bool zst;
			const char *k = v[i].key;
			if (!strncmp(k, dirs[d], dl) && k[dl] == '/' && !strchr(k + dl + 1, '/') &&
			    dws_parse_step_name(k + dl + 1, &s, &zst) && s == step && t->nexisting < DWS_ARRAY_LEN(t->existing))
				t->existing[t->nexisting++] = dws_xstrdup(k);
		}
		dws_objects_free(v, n);
	}
	return DWS_OK;
}

int dws_pubtarget_open(const char *uri, uint64_t step, bool force, dws_pubtarget *t, dws_error *err)
{
	memset(t, 0, sizeof(*t));
	t->uri = uri;
	if (!strncmp(uri, "hf://", 5))
		return dws_fail(err, DWS_EUNSUP,
				"%s: dwsctl cannot write to a Hub bucket: the Hub takes uploads through Xet storage, which has no C "
				"client; publish into a local folder and push it with `hf buckets sync FOLDER %s`",
				uri, uri);
	t->remote = strstr(uri, "://") && strncmp(uri, "file://", 7);
	dws_s3_upload_conf c; /* bad upload settings: refused before any work */
	int rc = strncmp(uri, "s3://", 5) ? DWS_OK : dws_s3_upload_conf_env(&c, err);
	if (rc)
		return rc;
	if (!t->remote && mkdir(uri, 0755) != 0 && errno != EEXIST)
		return dws_fail(err, DWS_EIO, "%s: cannot create: %s", uri, strerror(errno));
	rc = dws_bucket_open(uri, &t->b, err);
	if (!rc)
		rc = find_step(t, step, err);
	if (!rc && t->nexisting && !force)
		rc = dws_fail(err, DWS_EINVAL, "%s: step %llu is already there (%s): publish another step, or --force to replace it",
			      uri, (unsigned long long)step, t->existing[0]);
	return rc;
}

void dws_pubtarget_close(dws_pubtarget *t)
{
	for (size_t i = 0; i < t->nexisting; i++)
		free(t->existing[i]);
	dws_bucket_close(t->b);
	memset(t, 0, sizeof(*t));
}

/* ---- the file ---- */

static int of_raw(dws_pubout *f, const void *p, size_t n, dws_error *err)
{
	const char *c = p;
	while (n) {
		ssize_t w = write(f->fd, c, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return dws_fail(err, DWS_EIO, "%s: write: %s", f->tmp ? f->tmp : "spool file", strerror(errno));
		}
		c += w;
		n -= (size_t)w;
		f->size += (uint64_t)w;
	}
	return DWS_OK;
}

int dws_pubout_write(dws_pubout *f, const void *p, size_t n, bool end, dws_error *err)
{
	if (!f->z)
		return of_raw(f, p, n, err);
	ZSTD_inBuffer in = {p, n, 0};
	for (;;) {
		ZSTD_outBuffer out = {f->zbuf, f->zcap, 0};
		size_t r = ZSTD_compressStream2(f->z, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
		if (ZSTD_isError(r))
			return dws_fail(err, DWS_EIO, "%s: zstd: %s", f->final, ZSTD_getErrorName(r));
		int rc = of_raw(f, f->zbuf, out.pos, err);
		if (rc)
			return rc;
		if (end ? r == 0 : in.pos == in.size)
			return DWS_OK;
	}
}

/* An unnamed file to spool a remote step in. */
static int spool_open(dws_pubout *f, dws_error *err)
{
	const char *dir = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	f->fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (f->fd < 0) { /* a filesystem without O_TMPFILE */
		char *p = dws_xasprintf("%s/.dwsctl-publish.XXXXXX", dir);
		f->fd = mkostemp(p, O_CLOEXEC);
		if (f->fd >= 0)
			unlink(p);
		free(p);
	}
	return f->fd >= 0 ? DWS_OK : dws_fail(err, DWS_EIO, "%s: cannot make a spool file: %s", dir, strerror(errno));
}

int dws_pubout_open(dws_pubout *f, dws_pubtarget *t, bool anchor, uint64_t step, bool zstd, int level,
		    uint64_t content_size, dws_error *err)
{
	memset(f, 0, sizeof(*f));
	f->fd = -1;
	f->key = dws_step_key(step, anchor, zstd);
	f->final = dws_xasprintf("%s/%s", t->uri, f->key);
	int rc;
	if (t->remote) {
		rc = spool_open(f, err);
	} else {
		char *slash = strrchr(f->final, '/');
		*slash = 0; /* the step's folder in the bucket */
		if (mkdir(f->final, 0755) != 0 && errno != EEXIST) {
			rc = dws_fail(err, DWS_EIO, "%s: cannot create: %s", f->final, strerror(errno));
			*slash = '/';
			return rc;
		}
		f->tmp = dws_xasprintf("%s/.%s.tmp.%ld", f->final, slash + 1, (long)getpid());
		*slash = '/';
		f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		rc = f->fd < 0 ? dws_fail(err, DWS_EIO, "%s: cannot create: %s", f->tmp, strerror(errno)) : DWS_OK;
	}
	if (!rc && zstd) {
		f->z = ZSTD_createCCtx();
		ZSTD_CCtx_setParameter(f->z, ZSTD_c_compressionLevel, level);
		ZSTD_CCtx_setParameter(f->z, ZSTD_c_checksumFlag, 1);
		ZSTD_CCtx_setPledgedSrcSize(f->z, content_size);
		f->zcap = ZSTD_CStreamOutSize();
		f->zbuf = dws_xmalloc(f->zcap);
	}
	return rc;
}

/* Forced: the step's other files go once the new one is in place. */
static int remove_others(dws_pubout *f, dws_pubtarget *t, dws_error *err)
{
	int rc = DWS_OK;
	for (size_t i = 0; i < t->nexisting && !rc; i++) {
		if (!strcmp(t->existing[i], f->key))
			continue;
		if (t->remote) {
			rc = dws_bucket_delete(t->b, t->existing[i], err);
		} else {
			char *p = dws_xasprintf("%s/%s", t->uri, t->existing[i]);
			if (unlink(p) != 0 && errno != ENOENT)
				rc = dws_fail(err, DWS_EIO, "%s: cannot remove: %s", p, strerror(errno));
			free(p);
		}
	}
	return rc;
}

static void upload_sent(void *ctx, uint64_t bytes)
{
	dws_pubout *f = ctx;
	if (f->pr && f->pr->fn)
		f->pr->fn(f->pr->ctx, "upload", bytes, f->size);
}

int dws_pubout_close(dws_pubout *f, dws_pubtarget *t, bool ok, const dws_progress *pr,
		     const volatile sig_atomic_t *stop, dws_error *err)
{
	int rc = DWS_OK;
	if (f->fd >= 0 && ok && fsync(f->fd) != 0)
		rc = dws_fail(err, DWS_EIO, "%s: fsync: %s", f->tmp ? f->tmp : f->final, strerror(errno));
	if (ok && !rc && t->remote) {
		f->pr = pr;
		rc = dws_bucket_put(t->b, f->key, f->fd, f->size, upload_sent, f, stop, err);
	} else if (ok && !rc && rename(f->tmp, f->final) != 0) {
		rc = dws_fail(err, DWS_EIO, "%s: cannot rename into place: %s", f->final, strerror(errno));
	}
	if (ok && !rc)
		rc = remove_others(f, t, err);
	if (f->fd >= 0)
		close(f->fd);
	if (f->tmp && (!ok || rc))
		unlink(f->tmp);
	ZSTD_freeCCtx(f->z);
	free(f->zbuf);
	free(f->tmp);
	free(f->key);
	f->tmp = f->key = NULL;
	f->z = NULL;
	f->zbuf = NULL;
	f->fd = -1;
	return rc;
}

void dws_pubout_free(dws_pubout *f)
{
	free(f->final);
	f->final = NULL;
}
