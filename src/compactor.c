/* The compaction thread (see compactor.h). */
#include "compactor.h"
#include "clock.h"
#include "log.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

enum { ROUNDS = 8, SLICE_BYTES = 64u << 20 };

struct dws_compactor {
	dws_compactor_ops ops;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool wanted, merging, stop;
	atomic_bool stopping;
};

static int64_t now_ms(void) { return dws_real_clock.mono_ms(NULL); }

/* One plan, run in slices, each put in place before the next: the runs it
 * replaced are freed as the merged ones come, not after all. */
static void run_plan(dws_compactor *cp, dws_compaction *c)
{
	bool more = true;
	while (more && !atomic_load(&cp->stopping)) {
		more = dws_compaction_run(c, SLICE_BYTES, &cp->stopping);
		if (atomic_load(&cp->stopping))
			break;
		cp->ops.apply(cp->ops.ctx, c);
	}
}

/* A merge can make the next level worth merging: a few rounds, one log
 * line for them all. */
static void merge_rounds(dws_compactor *cp)
{
	int64_t t0 = now_ms();
	size_t tensors = 0;
	dws_step *done = NULL;
	for (int round = 0; round < ROUNDS && !atomic_load(&cp->stopping); round++) {
		dws_step *target = cp->ops.target(cp->ops.ctx);
		dws_compaction *c = dws_compaction_plan(target);
		if (!c) {
			dws_step_unref(target);
			break;
		}
		run_plan(cp, c);
		tensors += dws_compaction_count(c);
		dws_compaction_free(c);
		dws_step_unref(done);
		done = target;
	}
	if (done)
		dws_log_debug("step %llu: merged the patch runs of %zu tensors in %lld ms (%llu patched elements)",
			      (unsigned long long)dws_step_number(done), tensors, (long long)(now_ms() - t0),
			      (unsigned long long)dws_step_patch_entries(done));
	dws_step_unref(done);
}

static void *compact_main(void *arg)
{
	dws_compactor *cp = arg;
	/* background work: builds and reads go first on a busy machine */
	struct sched_param sp = {0};
	if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
		(void)setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
	pthread_mutex_lock(&cp->lock);
	/* tests: hold the first merge back (files opened before it) */
	const char *hold = getenv("DWSFS_TEST_MERGE_DELAY_MS");
	if (hold && atoi(hold) > 0) {
		struct timespec ts = dws_deadline_in(atoi(hold));
		while (!cp->stop && pthread_cond_timedwait(&cp->cond, &cp->lock, &ts) == 0)
			;
	}
	while (!cp->stop) {
		if (!cp->wanted) {
			pthread_cond_wait(&cp->cond, &cp->lock);
			continue;
		}
		cp->wanted = false;
		cp->merging = true;
		pthread_mutex_unlock(&cp->lock);
		merge_rounds(cp);
		pthread_mutex_lock(&cp->lock);
		cp->merging = cp->wanted; /* more to do at once, or idle */
		if (!cp->merging) {
			pthread_mutex_unlock(&cp->lock);
			cp->ops.idle(cp->ops.ctx);
			pthread_mutex_lock(&cp->lock);
		}
	}
	pthread_mutex_unlock(&cp->lock);
	return NULL;
}

int dws_compactor_start(const dws_compactor_ops *ops, dws_compactor **out, dws_error *err)
{
	dws_compactor *cp = dws_xcalloc(1, sizeof(*cp));
	cp->ops = *ops;
	cp->wanted = true; /* the first step may carry a long chain */
	pthread_mutex_init(&cp->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&cp->cond, &ca);
	pthread_condattr_destroy(&ca);
	int e = pthread_create(&cp->thread, NULL, compact_main, cp);
	if (e) {
		pthread_cond_destroy(&cp->cond);
		pthread_mutex_destroy(&cp->lock);
		free(cp);
		return dws_fail(err, DWS_EIO, "cannot start the compaction thread: %s", strerror(e));
	}
	*out = cp;
	return DWS_OK;
}

void dws_compactor_kick(dws_compactor *cp)
{
	pthread_mutex_lock(&cp->lock);
	cp->wanted = true;
	pthread_cond_signal(&cp->cond);
	pthread_mutex_unlock(&cp->lock);
}

bool dws_compactor_busy(dws_compactor *cp)
{
	pthread_mutex_lock(&cp->lock);
	bool busy = cp->wanted || cp->merging;
	pthread_mutex_unlock(&cp->lock);
	return busy;
}

void dws_compactor_stop(dws_compactor *cp)
{
	if (!cp)
		return;
	atomic_store(&cp->stopping, true);
	pthread_mutex_lock(&cp->lock);
	cp->stop = true;
	pthread_cond_signal(&cp->cond);
	pthread_mutex_unlock(&cp->lock);
	pthread_join(cp->thread, NULL);
	pthread_cond_destroy(&cp->cond);
	pthread_mutex_destroy(&cp->lock);
	free(cp);
}
