/* The materialization scheduler: once the root is merged and the compaction
 * thread idle, the root's files are written whole into unnamed files
 * (dws_step_materialize) on a thread of its own, at idle priority, when the
 * step fits max_bytes and every source byte is local (a remote source only
 * once the block cache holds all of it: this never fetches). The FUSE layer
 * hands them to the kernel (passthrough): opens after that read the page
 * cache of a local file and never reach the daemon. */
#ifndef DWSFS_MATERIALIZER_H
#define DWSFS_MATERIALIZER_H

#include "internal.h"

typedef struct dws_materializer_ops {
	/* The root step if it is the one to serve from now on (no step pending
	 * a swap), a new reference, else NULL. */
	dws_step *(*root)(void *ctx);
	/* Whether merging is under way (wait for it: a merged step's runs are
	 * what gets written). */
	bool (*busy)(void *ctx);
	void *ctx;
} dws_materializer_ops;

typedef struct dws_materializer dws_materializer;

int dws_materializer_start(const char *dir, uint64_t max_bytes, const dws_materializer_ops *ops,
			   dws_materializer **out, dws_error *err);
/* Look again: the root changed or merging ended. */
void dws_materializer_kick(dws_materializer *mt);
/* A step starts to build, or the root moves on: a write under way stops
 * (the build never shares the machine with it). */
void dws_materializer_cancel(dws_materializer *mt);
/* A new descriptor of file i of the materialized step with this id, or -1
 * when that step is not the one materialized. */
int dws_materializer_fd(dws_materializer *mt, uint64_t id, size_t file);
bool dws_materializer_has(dws_materializer *mt, uint64_t id);
/* Writing, or the root (root_id, 0: none pending) still to be looked at. */
bool dws_materializer_pending(dws_materializer *mt, uint64_t root_id);
/* The step materialized and its bytes; false: none. */
bool dws_materializer_done(dws_materializer *mt, uint64_t *step, uint64_t *bytes);
void dws_materializer_stop(dws_materializer *mt);

#endif
