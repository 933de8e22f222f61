/* zstd objects as blobs: a .zst step file decompressed to an unnamed file
 * (bounded by what its safetensors header declares), or just its first
 * bytes (the header). */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

/* ---- zstd ---- */

/* Stream-decompress src (read with hint h); hand each output chunk to sink
 * until it returns nonzero (stop early, not an error) or the stream ends.
 * Output past max_out is an error, raised before the sink sees it. exact:
 * max_out is the size the content's safetensors header declares; ending
 * short of it is an error too. */
static int zstd_stream(dws_blob *src, const dws_read_hint *h, uint64_t max_out, bool exact,
		       int (*sink)(void *ctx, const void *p, size_t n, dws_error *err),
		       void *ctx, dws_error *err)
{
	ZSTD_DCtx *dc = ZSTD_createDCtx();
	size_t incap = ZSTD_DStreamInSize(), outcap = ZSTD_DStreamOutSize();
	char *in = dws_xmalloc(incap), *outb = dws_xmalloc(outcap);
	uint64_t off = 0, total = 0;
	int rc = DWS_OK;
	size_t last = 1;
	bool stopped = false;
	/* a window bigger than 1 GiB is refused: it would cost that much memory.
	 * Knowing the size, no bigger window than it is needed, nor than 128 MiB
	 * (what compressors use by default, even for small input of unknown size) */
	int wlog = 30;
	if (exact)
		for (wlog = 27; wlog < 30 && (1ULL << wlog) < max_out;)
			wlog++;
	ZSTD_DCtx_setParameter(dc, ZSTD_d_windowLogMax, wlog);
	while (off < dws_blob_size(src) && !stopped) {
		size_t n = dws_blob_size(src) - off < incap ? (size_t)(dws_blob_size(src) - off) : incap;
		rc = dws_blob_read_hint(src, off, in, n, h, err);
		if (rc)
			break;
		off += n;
		ZSTD_inBuffer ib = {in, n, 0};
		while (ib.pos < ib.size && !stopped) {
			ZSTD_outBuffer ob = {outb, outcap, 0};
			last = ZSTD_decompressStream(dc, &ob, &ib);
			if (ZSTD_isError(last)) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: bad zstd data: %s", dws_blob_name(src), ZSTD_getErrorName(last));
				goto out;
			}
			total += ob.pos;
			if (total > max_out) {
				if (exact)
					rc = dws_fail(err, DWS_EFORMAT, "%s: trailing data: the zstd stream goes on past the %llu bytes its safetensors header declares",
						      dws_blob_name(src), (unsigned long long)max_out);
				else
					rc = dws_fail(err, DWS_EFORMAT, "%s: zstd data decompresses past the %llu byte limit", dws_blob_name(src),
						      (unsigned long long)max_out);
				goto out;
			}
			if (ob.pos) {
				int s = sink(ctx, outb, ob.pos, err);
				if (s < 0) {
					rc = s;
					goto out;
				}
				stopped = s > 0;
			}
		}
	}
	if (rc || stopped)
		goto out;
	if (last != 0)
		rc = dws_fail(err, DWS_EFORMAT, "%s: truncated zstd data (the frame does not end)", dws_blob_name(src));
	else if (exact && total < max_out)
		rc = dws_fail(err, DWS_EFORMAT, "%s: truncated: the zstd stream ends after %llu of the %llu bytes its safetensors header declares",
			      dws_blob_name(src), (unsigned long long)total, (unsigned long long)max_out);
out:
	free(in);
	free(outb);
	ZSTD_freeDCtx(dc);
	return rc;
}

struct fd_sink {
	int fd;
	uint64_t off;
	const char *name;
};

static int sink_fd(void *ctx, const void *p, size_t n, dws_error *err)
{
	struct fd_sink *s = ctx;
	const char *c = p;
	while (n) {
		ssize_t w = pwrite(s->fd, c, n, (off_t)s->off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return dws_fail(err, DWS_EIO, "%s: writing the decompressed copy: %s", s->name, strerror(errno));
		}
		c += w;
		n -= (size_t)w;
		s->off += (uint64_t)w;
	}
	return 0;
}

/* mkdir -p, each folder made private (0700): where decompressed copies go */
static int mkdirs(const char *path)
{
	char *p = dws_xstrdup(path);
	int rc = 0;
	for (char *c = p + 1; *c && !rc; c++)
		if (*c == '/') {
			*c = 0;
			rc = mkdir(p, 0700) == 0 || errno == EEXIST ? 0 : -1;
			*c = '/';
		}
	if (!rc)
		rc = mkdir(p, 0700) == 0 || errno == EEXIST ? 0 : -1;
	free(p);
	return rc;
}

/* An unlinked temporary file under tmpdir (NULL: $TMPDIR or /tmp), made
 * first when it does not exist (a cache_dir no remote cache has made). */
static int tmp_file(const char *tmpdir, const char *what, int *fd, dws_error *err)
{
	if (!tmpdir)
		tmpdir = getenv("TMPDIR");
	if (!tmpdir || !*tmpdir)
		tmpdir = "/tmp";
	*fd = open(tmpdir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (*fd < 0 && errno == ENOENT && mkdirs(tmpdir) == 0)
		*fd = open(tmpdir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (*fd < 0)
		return dws_fail(err, DWS_EIO, "%s: cannot create a temporary file in %s: %s", what, tmpdir, strerror(errno));
	return DWS_OK;
}

static int zstd_to_file(dws_blob *src, const char *tmpdir, uint64_t max_size, bool exact,
			dws_blob **out, dws_error *err)
{
	int fd;
	int rc = tmp_file(tmpdir, dws_blob_name(src), &fd, err);
	if (rc)
		return rc;
	struct fd_sink s = {fd, 0, dws_blob_name(src)};
	rc = zstd_stream(src, NULL, max_size, exact, sink_fd, &s, err);
	if (rc) {
		close(fd);
		return rc;
	}
	char *name = dws_xasprintf("%s (decompressed)", dws_blob_name(src));
	*out = dws_blob_from_fd(name, fd, s.off);
	free(name);
	return DWS_OK;
}

int dws_blob_zstd(dws_blob *src, const char *tmpdir, uint64_t max_size,
		  dws_blob **out, dws_error *err)
{
	return zstd_to_file(src, tmpdir, max_size, false, out, err);
}

struct mem_sink {
	char *p;
	size_t len, want;
};

static int sink_mem(void *ctx, const void *p, size_t n, dws_error *err)
{
	(void)err;
	struct mem_sink *s = ctx;
	size_t take = s->want - s->len < n ? s->want - s->len : n;
	memcpy(s->p + s->len, p, take);
	s->len += take;
	return s->len == s->want;
}

int dws_zstd_prefix_hint(dws_blob *src, size_t want, const dws_read_hint *h,
			 void **out, size_t *out_len, dws_error *err)
{
	struct mem_sink s = {dws_xmalloc(want ? want : 1), 0, want};
	int rc = zstd_stream(src, h, UINT64_MAX, false, sink_mem, &s, err);
	if (rc) {
		free(s.p);
		return rc;
	}
	*out = s.p;
	*out_len = s.len;
	return DWS_OK;
}

int dws_zstd_prefix(dws_blob *src, size_t want, void **out, size_t *out_len,
		    dws_error *err)
{
	return dws_zstd_prefix_hint(src, want, NULL, out, out_len, err);
}

/* ---- zstd objects holding one safetensors file ---- */

int dws_zstd_st_header(dws_blob *src, dws_st_file **st, uint64_t *size,
		       dws_error *err)
{
	void *buf = NULL;
	size_t got = 0;
	uint64_t need = 0;
	*st = NULL;
	int rc = dws_zstd_prefix(src, 4096, &buf, &got, err);
	if (!rc)
		rc = dws_st_parse(buf, got, DWS_ST_SIZE_UNKNOWN, dws_blob_name(src), st, &need, err);
	if (rc == 1) {
		free(buf);
		buf = NULL;
		rc = dws_zstd_prefix(src, (size_t)need, &buf, &got, err);
		if (!rc)
			rc = dws_st_parse(buf, got, DWS_ST_SIZE_UNKNOWN, dws_blob_name(src), st, NULL, err);
	}
	free(buf);
	/* no overflow: the parser kept every tensor's end below 2^64 - data_start */
	if (!rc)
		*size = dws_st_data_start(*st) + dws_st_data_end(*st);
	return rc;
}

struct buf_sink {
	char *p;
	uint64_t len;
};

static int sink_buf(void *ctx, const void *p, size_t n, dws_error *err)
{
	(void)err;
	struct buf_sink *s = ctx;
	memcpy(s->p + s->len, p, n); /* never past the size: zstd_stream stops first */
	s->len += n;
	return 0;
}

int dws_zstd_st_read(dws_blob *src, void *buf, uint64_t size, dws_error *err)
{
	struct buf_sink s = {buf, 0};
	return zstd_stream(src, NULL, size, true, sink_buf, &s, err);
}

int dws_zstd_st_file(dws_blob *src, const char *tmpdir, uint64_t size,
		     dws_blob **out, dws_error *err)
{
	return zstd_to_file(src, tmpdir, size, true, out, err);
}
