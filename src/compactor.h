/* The compaction thread: a delta appends one run of patches per tensor, and
 * runs are merged here, off the build path, at idle CPU priority, so a new
 * step never waits for a merge and reads look at few runs whatever the chain
 * length. Merging changes no byte: a step's table of runs is swapped for a
 * merged one behind its handle (compaction.c). */
#ifndef DWSFS_COMPACTOR_H
#define DWSFS_COMPACTOR_H

#include "internal.h"
#include "step.h"

typedef struct dws_compactor_ops {
	/* The step to merge: what is served next, else what is served (a new
	 * reference), or NULL. */
	dws_step *(*target)(void *ctx);
	/* dws_compaction_apply under the builder's lock. */
	void (*apply)(void *ctx, dws_compaction *c);
	/* Nothing left to merge. */
	void (*idle)(void *ctx);
	void *ctx;
} dws_compactor_ops;

typedef struct dws_compactor dws_compactor;

int dws_compactor_start(const dws_compactor_ops *ops, dws_compactor **out, dws_error *err);
/* There is something new to merge (a step was built). */
void dws_compactor_kick(dws_compactor *c);
/* Merging, or about to. */
bool dws_compactor_busy(dws_compactor *c);
void dws_compactor_stop(dws_compactor *c);

#endif
