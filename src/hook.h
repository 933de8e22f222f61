/* The on_swap hook: a command run with `sh -c` after each swap, on a thread
 * of its own, one run at a time; a swap during a run queues the newest step
 * (an older queued one is dropped). Its output goes to the log, a run past
 * its timeout is killed (its whole process group), and the last run's step,
 * exit status and duration show in the status. */
#ifndef DWSFS_HOOK_H
#define DWSFS_HOOK_H

#include "internal.h"

typedef struct dws_hook dws_hook;

typedef struct dws_hook_opts {
	const char *cmd;
	const char *mountpoint;   /* absolute: DWSFS_MOUNT, DWSFS_STEP_DIR */
	unsigned timeout_ms;      /* 0: none */
	bool keep_secrets;        /* pass HF_TOKEN and AWS_* keys on */
	uint64_t first_prev;      /* DWSFS_PREV_STEP of the first run: the root's
				   * step at start, what a server loaded */
} dws_hook_opts;


int dws_hook_start(const dws_hook_opts *o, dws_hook **out, dws_error *err);
/* Run for step s (a reference is taken: the step stays alive while the run
 * is queued or runs). DWSFS_PREV_STEP is the step of the last run that
 * exited 0 (first_prev before one did): what the server holds. */
void dws_hook_fire(dws_hook *h, dws_step *s);
/* The step with this id held for a queued or running run (a new
 * reference), or NULL: steps/N of a hook's step stays that step. */
dws_step *dws_hook_step(dws_hook *h, uint64_t id);
void dws_hook_stats_get(dws_hook *h, dws_hook_stats *out);
/* Stops: a running command is killed. */
void dws_hook_stop(dws_hook *h);

#endif
