/* The shape of a model folder: its files, each file's extents (raw bytes or
 * a tensor), its tensors (slots) and its folder tree. Made once from the
 * base model or an anchor, then immutable and shared by every step of its
 * chain: read it freely, never change it. */
#ifndef DWSFS_LAYOUT_H
#define DWSFS_LAYOUT_H

#include "internal.h"

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

dws_layout *dws_layout_new(void);
/* Add one file, read from blob; for a safetensors file (st), its tensors
 * become slots, named by the checkpoint, trainer_name(ctx, name) giving the
 * trainer's name for each (malloc'd), and its extents cover the whole file
 * (gaps are served from the file itself). */
int dws_layout_add_file(dws_layout *L, const char *path, dws_blob *blob, const dws_st_file *st,
			char *(*trainer_name)(void *ctx, const char *name), void *ctx, dws_error *err);
/* Done adding: index the paths and build the folder tree. */
void dws_layout_seal(dws_layout *L);
dws_layout *dws_layout_ref(dws_layout *L);
void dws_layout_unref(dws_layout *L);
/* Elements of the layout's float tensors (what a sparse delta may patch) and
 * bytes of all its tensors (what a dense file applied onto it may hold). */
uint64_t dws_layout_patchable(const dws_layout *L);
/* The same tensors in the same order (names, dtypes, shapes, places): two
 * builds of one anchor's layout are. */
bool dws_layout_same(const dws_layout *a, const dws_layout *b);
uint64_t dws_layout_tensor_bytes(const dws_layout *L);
/* Child of folder node dir named name, or DWS_NODE_NONE. */
uint32_t dws_layout_node_lookup(const dws_layout *L, uint32_t dir, const char *name);

#endif
