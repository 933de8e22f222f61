/* Step internals shared by step.c, builder.c, extract.c and publish.c. */
#ifndef DWSFS_STEP_H
#define DWSFS_STEP_H

#include "delta.h"
#include "internal.h"
#include "layout.h"
#include "patch.h"

struct dws_digest_item;
/* The trained tensors of s as state digest items (digest.h), ref = slot;
 * *out is malloc'd. */
size_t dws_step_digest_items(const dws_step *s, struct dws_digest_item **out);

struct dws_step {
	atomic_long refs;
	uint64_t step, anchor, id;
	size_t chain;
	dws_layout *layout;
	dws_src *src;        /* per slot */
	dws_patchset **patch; /* per slot, NULL: unpatched */
	uint8_t *trained;    /* per slot: the trainer's files provide it */
};

/* Step files read no further than they can legitimately hold (stepfile.c).
 * A sparse delta holds at most one index (4 bytes at most) and one BF16 value
 * per patchable element of the model. */
#define DWS_SPARSE_BYTES_PER_ELEMENT 6
/* Whether a parsed sparse file's tensors fit that bound. */
int dws_delta_check(const dws_st_file *st, uint64_t patchable, const char *what,
		    dws_error *err);
/* The whole size of a sparse step file, checked before any of its data is
 * read or inflated: a plain file's size against the bound with the largest
 * header; a .zst file's header-declared size (its header decompressed first)
 * against the bound. Both within max_bytes. A .zst is then read with
 * dws_zstd_st_read/_file and exactly this size. */
int dws_delta_size(dws_blob *raw, bool compressed, uint64_t patchable, uint64_t max_bytes,
		   uint64_t *size, dws_error *err);
/* A .zst dense file decompressed into an unlinked temporary file, once its
 * header shows its tensors within model_bytes and the file within max_bytes. */
int dws_dense_zstd(dws_blob *raw, const char *tmpdir, uint64_t model_bytes, uint64_t max_bytes,
		   dws_blob **out, dws_error *err);

/* The chain from an anchor to a step for a streaming extract: each sparse
 * file held in memory, its params checked (dws_delta_scan) but not decoded,
 * in chain order. */
typedef struct dws_lazy_file {
	char *what;
	void *data;             /* the whole file */
	size_t len;
	bool mapped;            /* data is an mmap, else malloc */
	dws_st_file *st;
	dws_delta_param *ps;    /* point into data */
	size_t np;
} dws_lazy_file;

typedef struct dws_lazy_chain {
	dws_step *first;        /* the anchor step: sources, no patches */
	dws_lazy_file *files;
	size_t nfiles;
} dws_lazy_chain;

/* *out is left NULL (and DWS_OK returned) when the step is not an anchor's
 * sparse chain: no anchor, the anchor itself, or a dense file in the chain;
 * the caller then builds the step. */
int dws_builder_lazy_chain(dws_builder *bl, uint64_t step, dws_lazy_chain **out,
			   dws_error *err);
void dws_lazy_chain_free(dws_lazy_chain *c);

/* Compaction off the build path. plan picks what to merge in step s (NULL:
 * nothing); run merges, without any lock, until about budget bytes of merged
 * runs are made (stops early when *stop turns true) and says whether jobs
 * remain; under the build lock, apply gives *merged, the planned step with
 * every run merged so far (same id and bytes, fewer runs), and splices them
 * into the builder's newest step too when it still holds them: *newest is
 * that step when it is another one (built meanwhile). Either may be NULL.
 * Run and apply in turns, so old runs go as new ones come. */
typedef struct dws_compaction dws_compaction;
dws_compaction *dws_compaction_plan(dws_step *s);
bool dws_compaction_run(dws_compaction *c, uint64_t budget, const atomic_bool *stop);
void dws_compaction_apply(dws_builder *bl, dws_compaction *c, dws_step **merged,
			  dws_step **newest);
size_t dws_compaction_count(const dws_compaction *c); /* tensors it merges */
void dws_compaction_free(dws_compaction *c);

#endif
