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

typedef struct dws_patch {
	atomic_long refs;
	uint32_t n;
	uint32_t *idx;
	uint16_t *val;
	dws_arena *arena; /* idx and val lie in it; NULL: owned */
} dws_patch;

/* A run over arrays the run takes ownership of (free()d with it). */
dws_patch *dws_patch_new_owned(uint32_t *idx, uint16_t *val, uint32_t n);
/* A run over arrays inside an arena (a reference to it is taken). */
dws_patch *dws_patch_new_in(dws_arena *a, uint32_t *idx, uint16_t *val, uint32_t n);
void dws_patch_unref(dws_patch *p);

/* A tensor's patch: sorted runs, oldest first; where runs overlap the newest
 * wins, which is what applying them in order gives. A delta appends its run
 * (no rewrite of what came before); past DWS_MAX_RUNS the runs are compacted
 * into one by a single k-way merge, so a read never looks at more than
 * DWS_MAX_RUNS runs. Immutable and shared between steps. */
#define DWS_MAX_RUNS 32
typedef struct dws_patchset {
	atomic_long refs;
	uint32_t nruns;
	uint64_t entries;
	dws_patch *runs[];
} dws_patchset;

/* old + run (the reference to run is taken). */
dws_patchset *dws_patchset_add(const dws_patchset *old, dws_patch *run);
void dws_patchset_unref(dws_patchset *ps);
/* One run equal to applying runs[0..k) in order. */
dws_patch *dws_patch_compact(dws_patch *const *runs, uint32_t k);
/* Apply the set to BF16 values of elements [e0, e0+cnt) held in dst. */
void dws_patchset_apply_bf16(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
			     uint16_t *dst);

/* Where an output tensor's bytes come from, before patching. */
typedef struct dws_src {
	dws_blob *blob;
	uint64_t off;
	dws_dtype dtype;
} dws_src;

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

struct dws_step {
	atomic_long refs;
	uint64_t step, anchor, id;
	size_t chain;
	dws_layout *layout;
	dws_src *src;        /* per slot */
	dws_patchset **patch; /* per slot, NULL: unpatched */
	uint8_t *trained;    /* per slot: the trainer's files provide it */
};

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

#endif
