/* Step internals shared by step.c, builder.c, extract.c and publish.c. */
#ifndef DWSFS_STEP_H
#define DWSFS_STEP_H

#include "delta.h"
#include "internal.h"

/* A merged patch: the elements of one tensor that differ from its source, as
 * sorted indices with BF16 values (newest wins). Immutable once built and
 * shared between steps (copy-on-write per tensor). */
/* Memory shared by the runs of one delta file: one allocation, freed with
 * the last run that uses it. */
typedef struct dws_arena {
	atomic_long refs;
	void *mem;
} dws_arena;

dws_arena *dws_arena_new(size_t bytes);
void dws_arena_unref(dws_arena *a);

/* Where an output tensor's bytes come from, before patching. */
typedef struct dws_src {
	dws_blob *blob;
	uint64_t off;
	dws_dtype dtype;
} dws_src;

/* A run is sparse (n sorted indices with their values) or, once a tensor is
 * patched densely enough that 6 bytes per entry cost more than 2 bits and 2
 * bytes per element, dense: a bitmap of the patched elements and a value
 * slot per element (applied with masked stores). */
typedef struct dws_patch {
	atomic_long refs;
	uint32_t n;       /* entries: set bits when dense */
	uint32_t *idx;    /* sparse: ascending; NULL when dense */
	uint16_t *val;    /* sparse: per entry; dense: per element */
	uint64_t *bits;   /* dense: numel bits */
	uint64_t numel;   /* dense: the tensor's elements */
	bool full;        /* dense with every bit set: val is the whole tensor
			     (the source's values filled in), the source is
			     not read at all; n still counts the entries */
	dws_arena *arena; /* idx and val lie in it; NULL: owned */
} dws_patch;

/* A run over arrays the run takes ownership of (free()d with it). */
dws_patch *dws_patch_new_owned(uint32_t *idx, uint16_t *val, uint32_t n);
/* A run over arrays inside an arena (a reference to it is taken). */
dws_patch *dws_patch_new_in(dws_arena *a, uint32_t *idx, uint16_t *val, uint32_t n);
void dws_patch_unref(dws_patch *p);

/* A tensor's patch: sorted runs, oldest first; where runs overlap the newest
 * wins, which is what applying them in order gives. A delta appends its run
 * (no rewrite of what came before). A mount merges runs on its compaction
 * thread (dws_patchset_pick), off the build path; only past DWS_MAX_RUNS
 * (a chain built with nobody merging, e.g. dwsctl verify of a very long
 * chain) does appending merge them all at once. Immutable and shared
 * between steps. */
#define DWS_MAX_RUNS 128
typedef struct dws_patchset {
	atomic_long refs;
	uint32_t nruns;
	uint64_t entries;
	dws_patch *runs[];
} dws_patchset;

/* old + run (the reference to run is taken); numel: the tensor's elements. */
dws_patchset *dws_patchset_add(const dws_patchset *old, dws_patch *run, uint64_t numel);
void dws_patchset_unref(dws_patchset *ps);
/* dws_patchset_add for a build applying several files at once, where nobody
 * merges until it is done: once the tensor's entries pass a third of its
 * elements its runs become one dense run (*own: made by this build, seen by
 * nobody else), and the files after fold into it in place, so the build
 * never holds the chain's runs side by side. *own starts NULL per build. */
dws_patchset *dws_patchset_add_build(const dws_patchset *old, dws_patch *run, uint64_t numel,
				     dws_patch **own);
/* At the end of such a build: ps with the sparse runs still pending after
 * own folded into it, or NULL if there are none. */
dws_patchset *dws_patchset_fold_build(const dws_patchset *ps, dws_patch *own);
/* Background compaction: whether runs [j, j+k) of ps are worth merging now,
 * and a copy of ps with them replaced by merged (a reference is taken). */
bool dws_patchset_pick(const dws_patchset *ps, uint64_t numel, uint32_t *j, uint32_t *k);
dws_patchset *dws_patchset_splice(const dws_patchset *ps, uint32_t j, uint32_t k,
				  dws_patch *merged);
/* One run equal to applying runs[0..k) in order to a tensor of numel
 * elements: dense when that is smaller. With src (the tensor's BF16 source,
 * a local file or a remote one whose blocks are all in the block cache) and
 * runs[0] the oldest run of the tensor, a dense result is made full: reads
 * then take the tensor from it and never touch the source. */
dws_patch *dws_patch_compact(dws_patch *const *runs, uint32_t k, uint64_t numel,
			     const dws_src *src);
/* Dense runs are applied with AVX-512 masked stores where the CPU has them;
 * false forces the portable path (tests). */
void dws_patch_simd(bool on);
/* Apply the set to BF16 values of elements [e0, e0+cnt) held in dst. */
void dws_patchset_apply_bf16(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
			     uint16_t *dst);


/* One output tensor. */
typedef struct dws_slot {
	char *name;       /* output (checkpoint) name */
	char *trainer;    /* the trainer's name for it */
	uint32_t file;
	uint64_t off;     /* in the output file */
	dws_dtype dtype;  /* output dtype */
	uint64_t numel;
	uint32_t ndim;
	uint64_t *shape;
} dws_slot;

/* A run of an output file: raw bytes of the file's layout source at the same
 * offset (slot < 0) or a tensor. */
typedef struct dws_extent {
	uint64_t off, len;
	int64_t slot;
} dws_extent;

typedef struct dws_out_file {
	dws_file_info info;
	dws_blob *blob;   /* the layout source: base file or anchor */
	dws_extent *ext;
	size_t next;
} dws_out_file;

/* The shape of the output folder: from the base model, or from one anchor. */
typedef struct dws_layout {
	atomic_long refs;
	dws_out_file *files;
	size_t nfiles;
	dws_slot *slots;
	size_t nslots;
	dws_strmap by_name;  /* output name -> slot */
	dws_strmap by_path;  /* file path -> file */
	dws_node *nodes;     /* folder tree of the files */
	size_t nnodes;
	dws_strmap by_node_path; /* "parent-index/name" -> node */
	char **node_keys;
} dws_layout;

void dws_layout_build_tree(dws_layout *L);

void dws_layout_unref(dws_layout *l);

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
/* Elements of the layout's float tensors (what a sparse delta may patch) and
 * bytes of all its tensors (what a dense file applied onto it may hold). */
uint64_t dws_layout_patchable(const dws_layout *L);
uint64_t dws_layout_tensor_bytes(const dws_layout *L);
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
