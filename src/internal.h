/* Internal helpers shared by the core; not part of the public API. */
#ifndef DWSFS_INTERNAL_H
#define DWSFS_INTERNAL_H

#include "core.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>

#define DWS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define DWS_PRINTF(f, a) __attribute__((format(printf, f, a)))

int dws_fail(dws_error *err, int code, const char *fmt, ...) DWS_PRINTF(3, 4);
/* Returns the code of err when set, else code. */
static inline int dws_code_of(const dws_error *err, int code)
{
	return err && err->code ? err->code : code;
}

/* An options struct's size against the library's (see dws_bucket_opts):
 * DWS_EINVAL naming the struct when it was not set up by its init. */
static inline int dws_opts_size(uint32_t got, size_t want, const char *name, dws_error *err)
{
	if (got == want)
		return DWS_OK;
	return dws_fail(err, DWS_EINVAL, "%s: not set up with %s_init (size %u, this library's is %zu)", name, name, got,
			want);
}

static inline bool dws_mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
	return !__builtin_mul_overflow(a, b, out);
}
static inline bool dws_add_ok(uint64_t a, uint64_t b, uint64_t *out)
{
	return !__builtin_add_overflow(a, b, out);
}

/* BF16, F16 or F32: what the trainer trains and a delta may patch. */
bool dws_dtype_is_float(dws_dtype d);

void *dws_xmalloc(size_t n);
void *dws_xcalloc(size_t n, size_t m);
void *dws_xrealloc(void *p, size_t n);
char *dws_xstrdup(const char *s);
/* For large arrays (patch runs): 2 MiB aligned and marked for transparent
 * huge pages, so filling hundreds of MB costs hundreds of faults, not 10^5.
 * Freed with free(). */
void *dws_big_alloc(size_t n);
/* dws_big_alloc without the huge page hint, given later by dws_big_hint: a
 * fault in a region hinted huge may compact memory on the spot (THP defrag
 * "madvise"), which stalled a step's build for 50-250 ms while the
 * compaction thread churned memory; khugepaged collapses a region hinted
 * after it was faulted in, off the faulting thread. */
void *dws_big_alloc_unhinted(size_t n);
void dws_big_hint(void *p, size_t n);
char *dws_xasprintf(const char *fmt, ...) DWS_PRINTF(1, 2);

/* Parse a decimal u64 string strictly (no sign, no spaces, no overflow). */
bool dws_parse_u64(const char *s, uint64_t *out);
/* All n bytes at off, retrying on EINTR and short transfers: false on an
 * error (errno) or the file's end. */
bool dws_pread_all(int fd, void *p, size_t n, uint64_t off);
bool dws_pwrite_all(int fd, const void *p, size_t n, uint64_t off);
/* "step_000123.safetensors[.zst]" -> 123; false if the name is not a step
 * (stepname.c: the naming rule of step files and folders). */
bool dws_parse_step_name(const char *base, uint64_t *step, bool *zst);
/* The key of a step file in a bucket: "anchors/step_000012.safetensors" or
 * "deltas/...", with ".zst" when compressed (malloc'd). */
char *dws_step_key(uint64_t step, bool anchor, bool zst);

/* XXH3-64 of bulk data (blocks, payloads, state digests): the library's
 * runtime-dispatched AVX2/AVX-512 code on x86-64 (about 5x faster than the
 * plain entry points, which Debian builds for SSE2), the plain one elsewhere.
 * Same values either way. */
struct XXH3_state_s;
uint64_t dws_xxh3(const void *p, size_t n);
void dws_xxh3_update(struct XXH3_state_s *st, const void *p, size_t n);

/* Open-addressing string -> size_t map. Keys are borrowed, not copied. */
typedef struct dws_strmap {
	const char **keys;
	size_t *vals;
	size_t cap, len;
} dws_strmap;
void dws_strmap_init(dws_strmap *m);
void dws_strmap_free(dws_strmap *m);
void dws_strmap_put(dws_strmap *m, const char *key, size_t val);
bool dws_strmap_get(const dws_strmap *m, const char *key, size_t *val);

/* What a blob read is for, passed with it: how a remote blob's cache and
 * readahead treat it. A NULL hint is DWS_READ_NORMAL with no limit. */
typedef enum dws_read_mode {
	DWS_READ_NORMAL, /* through the cache, the readahead following the reads */
	DWS_READ_DIRECT, /* a read within one block the cache lacks fetches just
			    these bytes and keeps nothing (headers read while
			    cataloguing) */
	DWS_READ_QUIET,  /* the blob's readahead left alone (no window, no
			    prefetch): background reads that must not make a
			    reader's scan look random */
} dws_read_mode;
typedef struct dws_read_hint {
	dws_read_mode mode;
	uint64_t ra_limit; /* readahead stops here: the end of the tensor being
			      read; UINT64_MAX: no limit */
} dws_read_hint;
int dws_blob_read_hint(dws_blob *b, uint64_t off, void *buf, size_t len,
		       const dws_read_hint *h, dws_error *err);
int dws_blob_read_ref_hint(dws_blob *b, uint64_t off, void *buf, size_t len,
			   const dws_read_hint *h, const void **ref, dws_pin *pin,
			   dws_error *err);
/* Whether [off, off+len) of b can be read without a fetch: a local file, or
 * every block of it in the remote cache (a hint: a block may go meanwhile). */
bool dws_blob_local(dws_blob *b, uint64_t off, uint64_t len);

/* Read a whole blob into memory (at most cap bytes). */
int dws_blob_slurp(dws_blob *b, uint64_t cap, void **out, size_t *len,
		   dws_error *err);

/* Blob construction for backends. */
struct dws_blob_ops {
	/* h is never NULL here */
	int (*read)(dws_blob *b, uint64_t off, void *buf, size_t len,
		    const dws_read_hint *h, dws_error *err);
	/* optional: see dws_blob_local */
	bool (*cached)(dws_blob *b, uint64_t off, uint64_t len);
	/* optional: see dws_blob_read_ref */
	int (*read_ref)(dws_blob *b, uint64_t off, void *buf, size_t len,
			const dws_read_hint *h, const void **ref, dws_pin *pin,
			dws_error *err);
	void (*destroy)(dws_blob *b);
};
/* A blob over ops, its backend's state in priv (ops->destroy frees it).
 * struct dws_blob is blob.c's own: backends reach a blob through these. */
dws_blob *dws_blob_new(const struct dws_blob_ops *ops, const char *name,
		       uint64_t size, void *priv);
void *dws_blob_priv(const dws_blob *b);
/* A blob over an open file descriptor (the blob owns it). */
dws_blob *dws_blob_from_fd(const char *name, int fd, uint64_t size);
/* That descriptor (to map the file), -1 for other blobs. */
int dws_blob_fd(const dws_blob *b);
/* Whether anyone but the caller holds a reference (a hint, unless the
 * caller knows nobody else can take one meanwhile). */
bool dws_blob_shared(const dws_blob *b);

/* Bytes read from a local bucket's files (dws_bucket_stats' bytes_fetched):
 * made by the bucket and shared with the blobs it opens, which may outlive
 * it; freed with the last reference. */
typedef struct dws_fetch_count dws_fetch_count;
dws_fetch_count *dws_fetch_count_new(void);
dws_fetch_count *dws_fetch_count_ref(dws_fetch_count *c);
void dws_fetch_count_unref(dws_fetch_count *c);
uint64_t dws_fetch_count_get(const dws_fetch_count *c);
/* b's reads count into c (b a local file of c's bucket); c NULL: none. */
void dws_blob_count_into(dws_blob *b, dws_fetch_count *c);
/* n bytes of b had otherwise (mapped): counted as fetched if b's reads are. */
void dws_blob_count_fetched(dws_blob *b, uint64_t n);

/* Read a safetensors header from a blob (validated against the blob size). */
int dws_st_read_blob(dws_blob *b, const char *what, dws_st_file **out,
		     dws_error *err);
int dws_st_read_blob_hint(dws_blob *b, const char *what, const dws_read_hint *h,
			  dws_st_file **out, dws_error *err);
/* dws_zstd_prefix, its reads made with hint h. */
int dws_zstd_prefix_hint(dws_blob *src, size_t want, const dws_read_hint *h,
			 void **out, size_t *out_len, dws_error *err);
/* The raw header bytes [0, data_start) of the file the header came from. */
const void *dws_st_raw(const dws_st_file *f);

/* A .zst object holding one safetensors file, never inflated past what it
 * can legitimately hold. Its header first: only the bytes it takes are
 * decompressed, and it declares the file's size (*size: 8 + header length +
 * the end of the last tensor's data; the header is checked on its own, its
 * tensors' bytes are not there yet). Then exactly that size, into buf or into
 * an unlinked temporary file under tmpdir (NULL: $TMPDIR or /tmp; made when
 * missing): a stream that ends short is truncated, one that goes on past it
 * is trailing data. Both are errors, and no byte past the size is written. */
int dws_zstd_st_header(dws_blob *src, dws_st_file **st, uint64_t *size,
		       dws_error *err);
int dws_zstd_st_read(dws_blob *src, void *buf, uint64_t size, dws_error *err);
int dws_zstd_st_file(dws_blob *src, const char *tmpdir, uint64_t size,
		     dws_blob **out, dws_error *err);

/* XXH3-64 of a byte range of a blob. */
int dws_blob_xxh3(dws_blob *b, uint64_t off, uint64_t len, uint64_t *out,
		  dws_error *err);

#endif
