/* Catch-up patches: what differs between two steps of a bucket, as one
 * safetensors file in the coordinates of the model the mount serves, for a
 * running inference server to update in place (vLLM's
 * load_checkpoint_weight_patches). Per changed tensor T: `T.indices` (I64,
 * flat row-major positions, sorted, unique) and `T.values` (the served
 * dtype), or, past a third of its elements changed across an anchor, `T.values`
 * alone with every element (T's shape). Unchanged tensors are absent.
 * `__metadata__`: format dwsfs_patch, version 1, from_step, to_step,
 * sparse_tensors, dense_tensors, changed_elements, shapes (JSON: each sparse
 * tensor's full shape). Applied to FROM's files it gives TO's bytes. */
#ifndef DWSFS_PATCHFILE_H
#define DWSFS_PATCHFILE_H

#include "internal.h"

/* The patch from built step `from` to built step `to` (from < to) of bl's
 * catalog, in an unnamed file under tmpdir (NULL: $TMPDIR, /tmp). chain_only:
 * only from the deltas between them (DWS_EUNSUP if they are not within one
 * chain), never by comparing tensors. */
int dws_patchfile_make(dws_builder *bl, dws_step *from, dws_step *to, const char *tmpdir, bool chain_only,
		       dws_patchfile **out, dws_error *err);
/* The same within one chain, from step number `from` alone: that step need
 * not be built (an old root, say). DWS_EUNSUP if an anchor lies between. */
int dws_patchfile_make_chain(dws_builder *bl, uint64_t from, dws_step *to, const char *tmpdir, dws_patchfile **out,
			     dws_error *err);
uint64_t dws_patchfile_changed(const dws_patchfile *p); /* elements written */
/* The whole file at path, atomically (a temp name renamed). */
int dws_patchfile_write(dws_patchfile *p, const char *path, dws_error *err);

#endif
