/* Time as the mount engine sees it: injected, so tests drive the swap
 * policy and the retry backoff with a clock of their own. */
#ifndef DWSFS_CLOCK_H
#define DWSFS_CLOCK_H

#include <stdint.h>
#include <time.h>

typedef struct dws_clock {
	int64_t (*mono_ms)(void *ctx);   /* a monotonic clock, ms */
	int64_t (*wall_ns)(void *ctx);   /* wall time, ns since the epoch */
	void *ctx;
} dws_clock;

/* CLOCK_MONOTONIC and CLOCK_REALTIME. */
extern const dws_clock dws_real_clock;

/* CLOCK_MONOTONIC ms from now as an absolute time for pthread_cond_timedwait
 * on a condition variable set to CLOCK_MONOTONIC. */
struct timespec dws_deadline_in(int64_t ms);

#endif
