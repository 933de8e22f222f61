/* The patch index: the elements of a tensor that differ from its source,
 * as runs of sorted indices and BF16 values (newest wins), merged in the
 * background, dense once a third of the tensor is patched. */
#ifndef DWSFS_PATCH_H
#define DWSFS_PATCH_H

#include "internal.h"
#include "patchmem.h"

/* A merged patch: the elements of one tensor that differ from its source, as
 * sorted indices with BF16 values (newest wins). Immutable once built and
 * shared between steps (copy-on-write per tensor). */
/* Memory shared by the runs of one delta file: one allocation, freed with
 * the last run that uses it. */
typedef struct dws_arena {
	atomic_long refs;
	void *mem;
	dws_pmem blk;     /* mem's block (patchmem.h) */
} dws_arena;

dws_arena *dws_arena_new(size_t bytes);
/* Its runs are in it: a spilled arena's pages leave the process. */
void dws_arena_written(dws_arena *a);
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
	dws_pmem own[3];  /* owned: the blocks of idx, val and bits */
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
/* Each patched element k of [e0, e0+cnt) as fn(ctx, k - e0, value), run
 * after run (a newer run's value comes after an older one's). */
void dws_patchset_each(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
		       void (*fn)(void *ctx, uint64_t k, uint16_t v), void *ctx);
/* Apply the set to BF16 values of elements [e0, e0+cnt) held in dst. */
void dws_patchset_apply_bf16(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
			     uint16_t *dst);


#endif
