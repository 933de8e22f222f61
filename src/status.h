/* .dwsfs/status: a snapshot of the engine written as JSON (field by field
 * in docs/status.md). */
#ifndef DWSFS_STATUS_H
#define DWSFS_STATUS_H

#include "histogram.h"
#include "hook.h"
#include "internal.h"

typedef struct dws_status {
	uint64_t step, anchor;
	size_t chain_length;
	const char *bucket;
	int64_t last_poll_wall;       /* seconds since the epoch, 0: none */
	uint64_t latest_step;
	size_t lag_steps, steps;
	bool has_pending;
	uint64_t pending_step;
	uint64_t swaps;
	int64_t root_since_ns, last_build_ms;
	bool merging, materializing, has_materialized;
	uint64_t materialized_step, materialized_bytes;
	int root_open_handles;
	uint64_t patched_elements, whole_tensor_bytes, patch_bytes;
	size_t whole_tensors;
	bool remote;
	uint64_t bytes_fetched, cache_hits, cache_misses;
	dws_cache_counts cache;       /* remote */
	uint64_t requests[4];         /* remote: api, resolve, cdn, s3 */
	const char *last_error;       /* NULL: none */
	bool has_hook;
	dws_hook_stats hook;
	/* not in the document: for the metrics (docs/metrics.md) */
	dws_bucket_stats io;          /* the bucket's own counts */
	dws_histogram builds;         /* build + verify of each step built */
	uint64_t build_failures[2];   /* step builds failed: may pass, for good */
	uint64_t poll_failures;
} dws_status;

/* A snapshot of the engine, each part under its lock, taken by a reader
 * that must not wait long (the status file, the metrics): last_error NULL,
 * bucket the mount's own (valid while it is open). */
void dws_mount_status(dws_mount *m, dws_status *st);

/* The document, malloc'd, ending in a newline. */
char *dws_status_json(const dws_status *st, const dws_status_field *extra, size_t nextra);

#endif
