/* Steps as the rest of the core sees them: a handle (its insides are the
 * step module's: step_int.h), built by the builder through the calls below,
 * read by everyone; its patch runs merged in place by compaction. */
#ifndef DWSFS_STEP_H
#define DWSFS_STEP_H

#include "delta.h"
#include "internal.h"
#include "layout.h"
#include "patch.h"

/* ---- building: on a step nobody else holds yet ---- */

/* A step over layout L: every tensor read from the layout's own files,
 * nothing trained, no patch. */
dws_step *dws_step_new(dws_layout *L);
/* The chain goes on from p: a new step with p's sources and patches (shared)
 * and its place (step, anchor, chain). */
dws_step *dws_step_clone(dws_step *p);
/* Tensor slot now reads src (a reference to its blob is taken); its patch
 * goes. */
void dws_step_set_source(dws_step *s, size_t slot, const dws_src *src, bool trained);
dws_patchset *dws_step_patch(dws_step *s, size_t slot);
/* ps (its reference taken over) as slot's patch; slot is trained. */
void dws_step_set_patch(dws_step *s, size_t slot, dws_patchset *ps);
/* Every float tensor is the trainer's (a chain with no anchor, an anchor
 * that is the whole model). */
void dws_step_train_floats(dws_step *s);
void dws_step_place(dws_step *s, uint64_t step, uint64_t anchor, size_t chain);
void dws_step_set_id(dws_step *s, uint64_t id);

/* ---- reading its shape ---- */

const dws_layout *dws_step_layout(const dws_step *s);
bool dws_step_trained(dws_step *s, size_t slot);

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
/* The files of the chain after step `from` up to step `to` (built), as
 * dws_builder_lazy_chain gives them, `first` being `to`: what changed
 * between the two. *out is left NULL when they are not one chain of sparse
 * files (another anchor, a dense file between): the caller compares them
 * whole. */
int dws_builder_span(dws_builder *bl, dws_step *to, uint64_t from, dws_lazy_chain **out, dws_error *err);
void dws_lazy_chain_free(dws_lazy_chain *c);

/* Compaction off the build path (compaction.c). plan picks what to merge in
 * step s (NULL: nothing); run merges, without any lock, until about budget
 * bytes of merged runs are made (stops early when *stop turns true) and says
 * whether jobs remain; apply splices what was merged so far into s, and into
 * `also` (the builder's newest step, built meanwhile from s: it shares its
 * runs; may be NULL or s) where it still holds the runs they came from, each
 * a new table behind the same handle. Run and apply in turns, so old runs go
 * as new ones come. */
typedef struct dws_compaction dws_compaction;
dws_compaction *dws_compaction_plan(dws_step *s);
bool dws_compaction_run(dws_compaction *c, uint64_t budget, const atomic_bool *stop);
void dws_compaction_apply(dws_compaction *c, dws_step *also);
size_t dws_compaction_count(const dws_compaction *c); /* tensors it merges */
dws_step *dws_compaction_target(const dws_compaction *c); /* its step (borrowed) */
void dws_compaction_free(dws_compaction *c);

#endif
