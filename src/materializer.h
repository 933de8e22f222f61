/* The materialization scheduler: once the root is merged and the compaction
 * thread idle, the root's files are made whole in unnamed files on a thread
 * of its own, at idle priority, when the step fits max_bytes and every
 * source byte is local (a remote source only once the block cache holds all
 * of it, or, once a reader opened one of its files, 10 s after the step
 * became the root: then it fetches what the cache lacks). The FUSE layer hands them to the kernel
 * (passthrough): opens after that read the page cache of a local file and
 * never reach the daemon.
 *
 * Two copies at most, used in turn: the next step goes into the copy no
 * open file holds, brought forward in place from its step by the catch-up
 * patch when both are in one chain (only the changed elements written),
 * else written whole (dws_step_materialize). */
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
	/* The catch-up patch from step `from` to step `to` when both are in one
	 * chain (DWS_EUNSUP otherwise), to bring a copy forward in place. */
	int (*patch)(void *ctx, uint64_t from, uint64_t to, dws_patchfile **out, dws_error *err);
	/* Whether a file of the step with this id was the last one opened (a
	 * reader uses it: worth fetching what the cache lacks). */
	bool (*opened)(void *ctx, uint64_t id);
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
/* A new descriptor of file i of the materialized copy of the step with
 * this id, or -1 when no copy is that step's. It holds the copy (never
 * changed in place) until dws_materializer_put. */
int dws_materializer_fd(dws_materializer *mt, uint64_t id, size_t file);
void dws_materializer_put(dws_materializer *mt, uint64_t id);
bool dws_materializer_has(dws_materializer *mt, uint64_t id);
/* Writing, or the root (root_id, 0: none pending) still to be looked at. */
bool dws_materializer_pending(dws_materializer *mt, uint64_t root_id);
/* The step materialized and its bytes; false: none. */
bool dws_materializer_done(dws_materializer *mt, uint64_t *step, uint64_t *bytes);
/* Why the root is not materialized ("" if it is, or is to be); copies
 * brought forward in place and written whole so far. */
void dws_materializer_note(dws_materializer *mt, char *out, size_t len, uint64_t *in_place, uint64_t *fresh);
void dws_materializer_stop(dws_materializer *mt);

#endif
