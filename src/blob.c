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
