/* The core's API between its modules: what src/ shares and the tools do not
 * use (the tools' API is include/dwsfs/dwsfs.h). Same conventions. */
#ifndef DWSFS_CORE_H
#define DWSFS_CORE_H

#include "dwsfs/dwsfs.h"

/* ---- errors ---- */

const char *dws_code_name(int code);
/* Whether an error may go away by itself (the network, a server, a file
 * still being written): worth retrying. The other codes mean the input is
 * bad and stays bad until it changes. */
bool dws_code_transient(int code);

/* ---- dtypes ------------------------------------------------------------ */

typedef enum dws_dtype {
	DWS_DT_INVALID = 0,
	DWS_DT_BOOL, DWS_DT_U8, DWS_DT_I8, DWS_DT_F8_E5M2, DWS_DT_F8_E4M3,
	DWS_DT_I16, DWS_DT_U16, DWS_DT_F16, DWS_DT_BF16,
	DWS_DT_I32, DWS_DT_U32, DWS_DT_F32,
	DWS_DT_I64, DWS_DT_U64, DWS_DT_F64,
	DWS_DT_COUNT
} dws_dtype;
dws_dtype dws_dtype_parse(const char *s);
const char *dws_dtype_name(dws_dtype dt);
size_t dws_dtype_size(dws_dtype dt);
/* BF16 -> F16, round to nearest even (NaN stays NaN, overflow to inf). */
uint16_t dws_bf16_to_f16(uint16_t b);
float dws_bf16_to_f32(uint16_t b);
/* F32 -> BF16, round to nearest even (what torch's .to(bfloat16) does). */
uint16_t dws_f32_to_bf16(float f);
uint16_t dws_f16_to_bf16(uint16_t h);

/* ---- safetensors -------------------------------------------------------- */

typedef struct dws_st_tensor {
	const char *name;
	dws_dtype dtype;
	uint32_t ndim;
	const uint64_t *shape;
	uint64_t numel;
	uint64_t begin, end; /* relative to the data section */
} dws_st_tensor;
typedef struct dws_st_meta {
	const char *key, *value;
} dws_st_meta;
typedef struct dws_st_file dws_st_file;
int dws_st_parse(const void *prefix, size_t prefix_len, uint64_t file_size,
		 const char *what, dws_st_file **out, uint64_t *need,
		 dws_error *err);
void dws_st_free(dws_st_file *f);
size_t dws_st_count(const dws_st_file *f);
const dws_st_tensor *dws_st_at(const dws_st_file *f, size_t i);
const dws_st_tensor *dws_st_find(const dws_st_file *f, const char *name);
const char *dws_st_meta_get(const dws_st_file *f, const char *key);
size_t dws_st_meta_count(const dws_st_file *f);
const dws_st_meta *dws_st_meta_at(const dws_st_file *f, size_t i);
/* Bytes before the data section: 8 + header length. */
uint64_t dws_st_data_start(const dws_st_file *f);
/* Bytes of the data section the tensors declare: the end of the last one.
 * The file's size is dws_st_data_start + this. */
uint64_t dws_st_data_end(const dws_st_file *f);
/* Writer: builds a header (sorted keys, space padded to 8) for tensors laid
 * out back to back in the given order. */
typedef struct dws_st_out_tensor {
	const char *name;
	dws_dtype dtype;
	uint32_t ndim;
	const uint64_t *shape;
	uint64_t nbytes;
} dws_st_out_tensor;
int dws_st_build_header(const dws_st_out_tensor *t, size_t n,
			const dws_st_meta *meta, size_t nmeta, char **out,
			size_t *out_len, dws_error *err);

/* ---- blobs and buckets -------------------------------------------------- */

void dws_objects_free(dws_object *v, size_t n);
/* A readable source object. Thread safe; refcounted. */
typedef struct dws_blob dws_blob;
int dws_blob_read(dws_blob *b, uint64_t off, void *buf, size_t len,
		  dws_error *err); /* exact: short means error */
/* dws_blob_read, except that where the bytes sit whole in memory the blob
 * keeps (a block of the remote cache's hot set), *ref points there and *pin
 * keeps them until dws_pin_release: no copy. Otherwise they are read into
 * buf, *ref == buf and the pin holds nothing. */
int dws_blob_read_ref(dws_blob *b, uint64_t off, void *buf, size_t len,
		      const void **ref, dws_pin *pin, dws_error *err);
uint64_t dws_blob_size(const dws_blob *b);
const char *dws_blob_name(const dws_blob *b);
dws_blob *dws_blob_ref(dws_blob *b);
void dws_blob_unref(dws_blob *b);
/* A blob over memory the blob takes ownership of (free()d on last unref). */
dws_blob *dws_blob_from_memory(const char *name, void *data, size_t len);
/* A whole-object zstd decompression of `src` (a .zst object): streamed into an
 * unlinked temporary file under `tmpdir` (NULL: $TMPDIR or /tmp; made, 0700,
 * when missing), at most `max_size` bytes of output. */
int dws_blob_zstd(dws_blob *src, const char *tmpdir, uint64_t max_size,
		  dws_blob **out, dws_error *err);
/* Decompress only the first `want` bytes of a zstd blob into memory. */
int dws_zstd_prefix(dws_blob *src, size_t want, void **out, size_t *out_len,
		    dws_error *err);
int dws_bucket_open_opts(const char *uri, const dws_bucket_opts *o,
			 dws_bucket **out, dws_error *err);
/* Cheap "anything new?" probe: a token that changes when the bucket does.
 * DWS_EUNSUP where the backend has none (list instead). */
int dws_bucket_probe(dws_bucket *b, char *token, size_t len, dws_error *err);
/* Metadata of one object without listing (DWS_ENOENT if absent). */
int dws_bucket_head(dws_bucket *b, const char *key, dws_object *out,
		    dws_error *err);
bool dws_bucket_is_remote(const dws_bucket *b);
void dws_bucket_stats_get(const dws_bucket *b, dws_bucket_stats *out);
/* Every object under prefix ("" = all), recursively, sorted by key. */
int dws_bucket_list(dws_bucket *b, const char *prefix, dws_object **out,
		    size_t *n, dws_error *err);
int dws_bucket_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out,
			 dws_error *err);
/* Validate an object key: relative, no "..", no empty or "." components. */
bool dws_key_is_safe(const char *key);

/* ---- catalog ------------------------------------------------------------ */

/* The latest complete anchor at or before step, or NULL. */
const dws_stepfile *dws_catalog_anchor_for(const dws_catalog *c, uint64_t step);
bool dws_catalog_has_base(const dws_catalog *c);
/* The keys the n steps after the newest would have (keys[i] malloc'd): a
 * delta, compressed if the run compresses, or an anchor where the run's
 * anchor interval puts one. Returns how many (fewer past 2^63-1). */
size_t dws_catalog_next_keys(const dws_catalog *c, char **keys, size_t n);
dws_bucket *dws_catalog_bucket(const dws_catalog *c);

/* ---- steps -------------------------------------------------------------- */

/* The catalog the builder reads. */
dws_catalog *dws_builder_catalog(dws_builder *bl);
/* The step built last (borrowed: valid until the next build or free). */
dws_step *dws_builder_newest(dws_builder *bl);
/* Switch to a newer catalog of the same bucket (the caller keeps ownership of
 * both; the old one may be freed after this returns). */
void dws_builder_set_catalog(dws_builder *bl, dws_catalog *c);
/* The content id step N would have in catalog c: a hash of the chain's
 * objects (key and identity), so a rewritten or restarted step gets a new id
 * and the same content always the same one; never 0 for a step of the
 * catalog (64 bits: the FUSE layer maps ids to inode numbers). 0 if the
 * step is not in the catalog. */
uint64_t dws_catalog_step_id(const dws_catalog *c, uint64_t step);
/* Tensors of s held whole in memory (patched past a third and merged with
 * their source, which reads then never touch), and their bytes. */
size_t dws_step_whole_tensors(dws_step *s, uint64_t *bytes);
/* Bytes held by the patch runs of every step object alive in the process:
 * what the patches cost in memory, old objects still referenced included. */
uint64_t dws_patch_memory(void);
size_t dws_step_file_count(const dws_step *s);
int dws_step_file_lookup(const dws_step *s, const char *path); /* -1 if none */
/* Read bytes of file i at off; returns bytes read (short only at EOF) or <0. */
int64_t dws_step_read(dws_step *s, size_t file, uint64_t off, void *buf,
		      size_t len, dws_error *err);
/* Whether every byte of file i of s can be produced without a fetch: its
 * sources are local files, blocks the block cache holds, or tensors held
 * whole in memory. */
bool dws_step_file_local(dws_step *s, size_t file);
/* XXH3-64 state digest over the trainer view (src/digest.h). */
int dws_step_state_digest(dws_step *s, uint64_t *out, dws_error *err);

/* ---- tools (dwsctl) ----------------------------------------------------- */

/* Write step s as a folder at outdir, atomically: a sibling temp folder renamed
 * into place at the end. outdir must not exist (or be an empty folder). */
int dws_extract(dws_step *s, const char *outdir, const dws_progress *pr,
		dws_error *err);
dws_patchfile *dws_patchfile_ref(dws_patchfile *p);

#endif
