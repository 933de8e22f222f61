/* When the root takes the step that is ready: a pure function of the root
 * view's use and the clock, so it is tested without threads or a mount. */
#ifndef DWSFS_SWAP_H
#define DWSFS_SWAP_H

#include <stdbool.h>
#include <stdint.h>

typedef struct dws_swap_policy {
	int64_t idle_ms;      /* swap once the root view was idle this long */
	int64_t max_delay_ms; /* or this long after a step became ready */
	bool never_force;     /* max_delay never forces it while a root file is open */
} dws_swap_policy;

typedef struct dws_swap_state {
	bool ready;            /* a step waits to be served */
	int64_t ready_since;   /* since when the root has been behind */
	int root_open;         /* open root files */
	int64_t root_activity; /* last open, release or lookup of the root */
} dws_swap_state;

typedef enum dws_swap_verdict {
	DWS_SWAP_WAIT,   /* not now: *wake_at says when to look again */
	DWS_SWAP_IDLE,   /* the root view is idle */
	DWS_SWAP_FORCED, /* swap_max_delay passed with the root in use */
} dws_swap_verdict;

/* *wake_at: when the verdict could change (INT64_MAX: only when the state
 * does), for DWS_SWAP_WAIT. */
dws_swap_verdict dws_swap_decide(const dws_swap_policy *p, const dws_swap_state *s, int64_t now,
				 int64_t *wake_at);

#endif
