/* Applying a SkyRL or miles version to a step being built (see
 * xorapply.c). The builder calls it with callbacks for what it keeps
 * itself: names to slots (map_prefix), and where a tensor's result goes
 * (its patch runs, folded while a chain is built at once). */
#ifndef DWSFS_XORAPPLY_H
#define DWSFS_XORAPPLY_H

#include "delta.h"
#include "format.h"
#include "step.h"

typedef struct dws_xapply {
	dws_step *s;             /* the step being built: the version before, cloned */
	dws_bucket *bucket;      /* where the version's objects are */
	const dws_xver *xv;
	bool verify;             /* compare every resulting tensor's checksum */
	dws_resolve_fn resolve;  /* a record's name to the layout's slot */
	void *rctx;
	/* Slot's result, on any of the apply's threads (one call per slot):
	 * run (a reference to hand on) is the elements that changed, as
	 * BF16 values, for a BF16 tensor; whole (a reference) the whole new
	 * tensor for any other dtype. */
	void (*put)(void *ctx, size_t slot, dws_patch *run, dws_blob *whole);
	void *pctx;
} dws_xapply;

/* A delta version (xor or overwrite) onto a->s: every tensor it names
 * decompressed window by window (bounded by the tensor's length), applied
 * to the previous values, checked, and handed to put. */
int dws_xver_apply(const dws_xapply *a, dws_error *err);
/* A full version (miles) onto a->s, which holds the base layout: every
 * tensor read from its shard from now on (sources set), each checked. */
int dws_xver_apply_full(const dws_xapply *a, dws_error *err);

#endif
