/* The mount engine's seams for tests: a clock and a bucket injected, and
 * the sync thread's work one turn at a time, so the swap policy, the retry
 * backoff and the refusal of bad steps are driven without threads, FUSE or
 * waiting. */
#ifndef DWSFS_ENGINE_H
#define DWSFS_ENGINE_H

#include "clock.h"
#include "internal.h"

typedef struct dws_mount_env {
	const dws_clock *clock;  /* NULL: the real one */
	dws_bucket *bucket;      /* NULL: open o->bucket; else taken over */
} dws_mount_env;

int dws_mount_open_env(const dws_mount_opts *o, const dws_mount_env *env, dws_mount **out,
		       dws_error *err);
/* One turn of the sync thread: poll when due, swap when due. Returns when
 * the next turn is due on the engine's clock. */
int64_t dws_mount_sync_once(dws_mount *m);

#endif
