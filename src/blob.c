/* Blobs: refcounted readable objects (a local file, memory, a decompressed
 * zstd object). Backends make them; the step view reads through them. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

struct dws_blob {
	const struct dws_blob_ops *ops;
	atomic_long refs;
	uint64_t size;
	char *name;
	void *priv;
	int fd;
	dws_fetch_count *count; /* where reads count as fetched; NULL: nowhere */
};

dws_blob *dws_blob_new(const struct dws_blob_ops *ops, const char *name,
		       uint64_t size, void *priv)
{
	dws_blob *b = dws_xcalloc(1, sizeof(*b));
	b->ops = ops;
	atomic_init(&b->refs, 1);
	b->size = size;
	b->name = dws_xstrdup(name);
	b->priv = priv;
	b->fd = -1;
	return b;
}

static const dws_read_hint normal = {DWS_READ_NORMAL, UINT64_MAX};

int dws_blob_read_hint(dws_blob *b, uint64_t off, void *buf, size_t len,
		       const dws_read_hint *h, dws_error *err)
{
	uint64_t end;
	if (!dws_add_ok(off, len, &end) || end > b->size)
		return dws_fail(err, DWS_EIO, "%s: read of %zu bytes at %llu is past the end (%llu bytes)", b->name, len,
				(unsigned long long)off, (unsigned long long)b->size);
	if (!len)
		return DWS_OK;
	return b->ops->read(b, off, buf, len, h ? h : &normal, err);
}

int dws_blob_read(dws_blob *b, uint64_t off, void *buf, size_t len,
		  dws_error *err)
{
	return dws_blob_read_hint(b, off, buf, len, NULL, err);
}

int dws_blob_read_ref_hint(dws_blob *b, uint64_t off, void *buf, size_t len,
			   const dws_read_hint *h, const void **ref, dws_pin *pin,
			   dws_error *err)
{
	*pin = (dws_pin){0};
	*ref = buf;
	if (!b->ops->read_ref || !len)
		return dws_blob_read_hint(b, off, buf, len, h, err);
	uint64_t end;
	if (!dws_add_ok(off, len, &end) || end > b->size)
		return dws_blob_read_hint(b, off, buf, len, h, err); /* its error */
	return b->ops->read_ref(b, off, buf, len, h ? h : &normal, ref, pin, err);
}

int dws_blob_read_ref(dws_blob *b, uint64_t off, void *buf, size_t len,
		      const void **ref, dws_pin *pin, dws_error *err)
{
	return dws_blob_read_ref_hint(b, off, buf, len, NULL, ref, pin, err);
}

bool dws_blob_local(dws_blob *b, uint64_t off, uint64_t len)
{
	uint64_t end;
	if (!dws_add_ok(off, len, &end) || end > b->size)
		return false;
	return b->fd >= 0 || (b->ops->cached && b->ops->cached(b, off, len));
}

void dws_pin_release(dws_pin *p)
{
	if (p->release)
		p->release(p->a, p->b);
	*p = (dws_pin){0};
}

uint64_t dws_blob_size(const dws_blob *b) { return b->size; }
const char *dws_blob_name(const dws_blob *b) { return b->name; }
void *dws_blob_priv(const dws_blob *b) { return b->priv; }
int dws_blob_fd(const dws_blob *b) { return b->fd; }
bool dws_blob_shared(const dws_blob *b) { return atomic_load(&((dws_blob *)b)->refs) > 1; }

struct dws_fetch_count {
	atomic_long refs;
	atomic_ullong bytes;
};

dws_fetch_count *dws_fetch_count_new(void)
{
	dws_fetch_count *c = dws_xcalloc(1, sizeof(*c));
	atomic_init(&c->refs, 1);
	atomic_init(&c->bytes, 0);
	return c;
}

dws_fetch_count *dws_fetch_count_ref(dws_fetch_count *c)
{
	if (c)
		atomic_fetch_add(&c->refs, 1);
	return c;
}

void dws_fetch_count_unref(dws_fetch_count *c)
{
	if (c && atomic_fetch_sub(&c->refs, 1) == 1)
		free(c);
}

uint64_t dws_fetch_count_get(const dws_fetch_count *c)
{
	return c ? atomic_load(&((dws_fetch_count *)c)->bytes) : 0;
}

void dws_blob_count_into(dws_blob *b, dws_fetch_count *c)
{
	dws_fetch_count_unref(b->count);
	b->count = dws_fetch_count_ref(c);
}

void dws_blob_count_fetched(dws_blob *b, uint64_t n)
{
	if (b->count)
		atomic_fetch_add(&b->count->bytes, n);
}

dws_blob *dws_blob_ref(dws_blob *b)
{
	if (b)
		atomic_fetch_add(&b->refs, 1);
	return b;
}

void dws_blob_unref(dws_blob *b)
{
	if (!b || atomic_fetch_sub(&b->refs, 1) != 1)
		return;
	if (b->ops->destroy)
		b->ops->destroy(b);
	if (b->fd >= 0)
		close(b->fd);
	dws_fetch_count_unref(b->count);
	free(b->name);
	free(b);
}

/* ---- file descriptor ---- */

static int fd_read(dws_blob *b, uint64_t off, void *buf, size_t len,
		   const dws_read_hint *h, dws_error *err)
{
	char *p = buf;
	while (len) {
		ssize_t r = pread(b->fd, p, len, (off_t)off);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return dws_fail(err, DWS_EIO, "%s: read at %llu: %s", b->name, (unsigned long long)off, strerror(errno));
		}
		if (r == 0)
			return dws_fail(err, DWS_EIO, "%s: truncated: file ended at %llu (it shrank while in use?)", b->name,
					(unsigned long long)off);
		p += r;
		off += (uint64_t)r;
		len -= (size_t)r;
		dws_blob_count_fetched(b, (uint64_t)r);
	}
	return DWS_OK;
}

static const struct dws_blob_ops fd_ops = {.read = fd_read};

dws_blob *dws_blob_from_fd(const char *name, int fd, uint64_t size)
{
	dws_blob *b = dws_blob_new(&fd_ops, name, size, NULL);
	b->fd = fd;
	return b;
}

/* ---- memory ---- */

static int mem_read(dws_blob *b, uint64_t off, void *buf, size_t len,
		    const dws_read_hint *h, dws_error *err)
{
	(void)h, (void)err;
	memcpy(buf, (const char *)b->priv + off, len);
	return DWS_OK;
}

static void mem_destroy(dws_blob *b) { free(b->priv); }

static const struct dws_blob_ops mem_ops = {.read = mem_read, .destroy = mem_destroy};

dws_blob *dws_blob_from_memory(const char *name, void *data, size_t len)
{
	return dws_blob_new(&mem_ops, name, len, data);
}

int dws_blob_slurp(dws_blob *b, uint64_t cap, void **out, size_t *len,
		   dws_error *err)
{
	if (b->size > cap || b->size > SIZE_MAX)
		return dws_fail(err, DWS_EFORMAT, "%s: %llu bytes is more than the %llu byte limit", b->name,
				(unsigned long long)b->size, (unsigned long long)cap);
	void *p = dws_xmalloc((size_t)b->size);
	int rc = dws_blob_read(b, 0, p, (size_t)b->size, err);
	if (rc) {
		free(p);
		return rc;
	}
	*out = p;
	*len = (size_t)b->size;
	return DWS_OK;
}

int dws_blob_xxh3(dws_blob *b, uint64_t off, uint64_t len, uint64_t *out,
		  dws_error *err)
{
	enum { CH = 4 << 20 };
	XXH3_state_t *st = XXH3_createState();
	char *buf = dws_xmalloc(CH);
	int rc = DWS_OK;
	XXH3_64bits_reset(st);
	while (len) {
		size_t n = len < CH ? (size_t)len : CH;
		rc = dws_blob_read(b, off, buf, n, err);
		if (rc)
			break;
		dws_xxh3_update(st, buf, n);
		off += n;
		len -= n;
	}
	*out = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	free(buf);
	return rc;
}

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
	while (off < src->size && !stopped) {
		size_t n = src->size - off < incap ? (size_t)(src->size - off) : incap;
		rc = dws_blob_read_hint(src, off, in, n, h, err);
		if (rc)
			break;
		off += n;
		ZSTD_inBuffer ib = {in, n, 0};
		while (ib.pos < ib.size && !stopped) {
			ZSTD_outBuffer ob = {outb, outcap, 0};
			last = ZSTD_decompressStream(dc, &ob, &ib);
			if (ZSTD_isError(last)) {
				rc = dws_fail(err, DWS_EFORMAT, "%s: bad zstd data: %s", src->name, ZSTD_getErrorName(last));
				goto out;
			}
			total += ob.pos;
			if (total > max_out) {
				if (exact)
					rc = dws_fail(err, DWS_EFORMAT, "%s: trailing data: the zstd stream goes on past the %llu bytes its safetensors header declares",
						      src->name, (unsigned long long)max_out);
				else
					rc = dws_fail(err, DWS_EFORMAT, "%s: zstd data decompresses past the %llu byte limit", src->name,
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
		rc = dws_fail(err, DWS_EFORMAT, "%s: truncated zstd data (the frame does not end)", src->name);
	else if (exact && total < max_out)
		rc = dws_fail(err, DWS_EFORMAT, "%s: truncated: the zstd stream ends after %llu of the %llu bytes its safetensors header declares",
			      src->name, (unsigned long long)total, (unsigned long long)max_out);
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
	int rc = tmp_file(tmpdir, src->name, &fd, err);
	if (rc)
		return rc;
	struct fd_sink s = {fd, 0, src->name};
	rc = zstd_stream(src, NULL, max_size, exact, sink_fd, &s, err);
	if (rc) {
		close(fd);
		return rc;
	}
	char *name = dws_xasprintf("%s (decompressed)", src->name);
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
		rc = dws_st_parse(buf, got, DWS_ST_SIZE_UNKNOWN, src->name, st, &need, err);
	if (rc == 1) {
		free(buf);
		buf = NULL;
		rc = dws_zstd_prefix(src, (size_t)need, &buf, &got, err);
		if (!rc)
			rc = dws_st_parse(buf, got, DWS_ST_SIZE_UNKNOWN, src->name, st, NULL, err);
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
