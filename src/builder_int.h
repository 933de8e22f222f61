/* The step builder's state, shared by builder.c (building steps) and
 * builder_lazy.c (chains left undecoded); private to those two. */
#ifndef DWSFS_BUILDER_INT_H
#define DWSFS_BUILDER_INT_H

#include "bucket.h"
#include "delta.h"
#include "step.h"

struct cached_blob {
	char *key;      /* object key + identity: a rewritten object is new */
	dws_blob *blob;
};

struct dws_builder {
	dws_catalog *cat;
	dws_build_opts o;
	dws_prefix_map *maps;
	dws_bucket *base_bucket;   /* owned when the base is outside the bucket */
	char *base_prefix;         /* "base" inside the bucket, "" outside */
	dws_layout *base_layout;
	dws_step *prev;
	struct cached_blob *blobs;
	size_t nblobs;
	uint32_t *seen;            /* per slot: stamp of the file that last named it */
	size_t nseen;
	uint32_t stamp;
	unsigned char *scratch;    /* a delta file's bytes, reused from one to the next */
	size_t scratch_cap;
	/* a build applying several files: per slot, the dense run it made
	 * (dws_patchset_add_build); NULL when not folding */
	dws_patch **own;
	size_t nown;
	bool folding;
};

struct resolve_ctx {
	dws_builder *bl;
	dws_step *s;
	const char *what;
	dws_error *err;
	bool dup;
};

/* bl->seen holds at least n slots. */
void dws_bl_ensure_seen(dws_builder *bl, size_t n);
/* dws_resolve_fn over a struct resolve_ctx: a trainer name to its slot of
 * the step's layout; notes two names of one file landing on one tensor. */
int dws_bl_resolve(void *ctx, const char *name, size_t *slot, uint64_t *numel);
/* The producer's payload checksum of a file held in memory, when verifying. */
int dws_bl_check_payload_mem(dws_builder *bl, const dws_st_file *st, const unsigned char *data, size_t len,
			     const char *what, dws_error *err);
/* What a sparse file's params may patch: one tensor each, a float one. */
int dws_bl_check_patchable(const dws_step *s, const dws_delta_param *ps, size_t np, bool dup, const char *what,
			   dws_error *err);

#endif
