/* Step internals shared by step.c, builder.c, extract.c and publish.c. */
#ifndef DWSFS_STEP_H
#define DWSFS_STEP_H

#include "internal.h"

/* A merged patch: the elements of one tensor that differ from its source, as
 * sorted indices with BF16 values (newest wins). Immutable once built and
 * shared between steps (copy-on-write per tensor). */
typedef struct dws_patch {
	atomic_long refs;
	uint32_t n;
	uint32_t *idx;
	uint16_t *val;
} dws_patch;

dws_patch *dws_patch_merge(const dws_patch *old, const uint32_t *idx,
			   const unsigned char *val, uint64_t m);
void dws_patch_unref(dws_patch *p);

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
	dws_patch **patch;   /* per slot, NULL: unpatched */
	uint8_t *trained;    /* per slot: the trainer's files provide it */
};

#endif
