/* The materialization scheduler (see materializer.h). */
#include "materializer.h"
#include "matpatch.h"
#include "clock.h"
#include "log.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* A remote root's blocks still to come: looked at again every second; past
 * the grace, once a reader opened one of its files, the copy is made
 * anyway, fetching what the cache lacks (blocks a reader was served but the
 * cache did not keep would never come). A root nobody reads fetches nothing. */
enum { LOCAL_RECHECK_MS = 1000, LOCAL_GRACE_MS = 10000, IDLE_RECHECK_MS = 10000 };

/* A materialized copy of a step: one unnamed file per file of the step. */
struct slot {
	int *fd;
	size_t n;
	uint64_t id, step, bytes; /* id 0: serves nothing (empty, or being written) */
	unsigned holds;           /* descriptors handed out for passthrough, not put back */
	int64_t born;             /* when it took its step: the newest serves */
};

struct dws_materializer {
	char *dir;
	uint64_t max;
	dws_materializer_ops ops;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool stop, kicked, working;
	struct slot slot[2];      /* at most two copies on disk */
	uint64_t skip_id;         /* over the cap or failed: not tried again */
	char note[200];           /* why the root is not materialized, "" if it is or will be */
	uint64_t wait_id;         /* the step waiting for its sources to be local */
	int64_t wait_since;
	atomic_bool cancel;
	uint64_t in_place, fresh; /* copies brought forward in place; written whole */
};

static int64_t now_ms(void) { return dws_real_clock.mono_ms(NULL); }

static void close_fds(int *fd, size_t n)
{
	for (size_t i = 0; fd && i < n; i++)
		if (fd[i] >= 0)
			close(fd[i]);
	free(fd);
}

/* Every file of s into unnamed files: the descriptors, or NULL (failed or
 * cancelled; *cancelled says which; err the failure). */
static int *write_all(dws_materializer *mt, dws_step *s, bool *cancelled, dws_error *err)
{
	size_t n = dws_step_file_count(s);
	int *fd = dws_xcalloc(n ? n : 1, sizeof(*fd));
	for (size_t i = 0; i < n; i++)
		fd[i] = -1;
	for (size_t i = 0; i < n; i++)
		if (dws_step_materialize(s, i, mt->dir, DWS_MAT_FREE_FLOOR, &mt->cancel, &fd[i], err)) {
			*cancelled = atomic_load(&mt->cancel);
			close_fds(fd, n);
			return NULL;
		}
	return fd;
}

/* Under lock: the slot to bring s to: one no passthrough open holds, the
 * one whose step is the nearest before s's (fewest changes to write in
 * place), else the emptier. NULL: both are held. */
static struct slot *pick_locked(dws_materializer *mt, uint64_t step)
{
	struct slot *best = NULL;
	for (int i = 0; i < 2; i++) {
		struct slot *sl = &mt->slot[i];
		if (sl->holds)
			continue;
		bool usable = sl->id && sl->step < step, best_usable = best && best->id && best->step < step;
		if (!best || (usable && (!best_usable || sl->step > best->step)) || (!usable && !best_usable && !sl->fd))
			best = sl;
	}
	return best;
}

/* Slot sl (served by nobody) brought from its step to s in place: true if
 * done. A copy anything still has open is left alone (a mapping outlives
 * its file's handles; the descriptors handed out are opens of their own). */
static bool forward_in_place(dws_materializer *mt, struct slot *sl, uint64_t from, dws_step *s)
{
	if (!mt->ops.patch || dws_matpatch_in_use(sl->fd, sl->n)) {
		dws_log_debug("step %llu: the copy of step %llu is still open or mapped: written whole",
			      (unsigned long long)dws_step_number(s), (unsigned long long)from);
		return false;
	}
	dws_patchfile *p = NULL;
	dws_error err = {0};
	int rc = mt->ops.patch(mt->ops.ctx, from, dws_step_number(s), &p, &err);
	if (!rc)
		rc = dws_matpatch_apply(p, s, sl->fd, sl->n, &err);
	if (rc == DWS_EUNSUP)
		dws_log_debug("step %llu: %s", (unsigned long long)dws_step_number(s), err.msg);
	else if (rc)
		dws_log_warn("step %llu: copy of step %llu not brought forward in place: %s", (unsigned long long)dws_step_number(s),
			     (unsigned long long)from, err.msg);
	dws_patchfile_unref(p);
	return rc == DWS_OK;
}

/* Under lock, which it drops while writing: slot sl made s's copy, in
 * place where it holds an earlier step of s's chain, else written whole.
 * false: failed or cancelled (the slot is then empty). */
static bool fill_slot_unlock(dws_materializer *mt, struct slot *sl, dws_step *s, const char **how, bool *cancelled)
{
	uint64_t from = sl->id ? sl->step : 0;
	sl->id = 0; /* from now on no open gets it */
	pthread_mutex_unlock(&mt->lock);
	bool done = from && from < dws_step_number(s) && forward_in_place(mt, sl, from, s);
	int *fd = NULL;
	dws_error err = {0};
	if (!done) {
		close_fds(sl->fd, sl->n); /* its disk space back first: at most two copies */
		sl->fd = NULL, sl->n = 0;
		fd = write_all(mt, s, cancelled, &err);
		if (!fd && !*cancelled)
			dws_log_warn("step %llu not materialized: %s", (unsigned long long)dws_step_number(s), err.msg);
	}
	pthread_mutex_lock(&mt->lock);
	if (fd)
		sl->fd = fd, sl->n = dws_step_file_count(s);
	if (!done && !fd) {
		snprintf(mt->note, sizeof(mt->note), "%.190s", *cancelled ? "" : err.msg);
		return false;
	}
	*how = done ? "brought forward in place" : "written";
	done ? mt->in_place++ : mt->fresh++;
	return true;
}

/* false: the step's sources are not all local yet, or both copies are
 * held by open files (look again later). */
static bool materialize(dws_materializer *mt, dws_step *s)
{
	uint64_t id = dws_step_id(s), total = 0;
	size_t n = dws_step_file_count(s);
	bool local = true;
	for (size_t i = 0; i < n; i++) {
		total += dws_step_file(s, i)->size;
		local = local && dws_step_file_local(s, i);
	}
	pthread_mutex_lock(&mt->lock);
	if (total > mt->max) {
		snprintf(mt->note, sizeof(mt->note), "step of %llu bytes, over materialize_max (%llu)",
			 (unsigned long long)total, (unsigned long long)mt->max);
		dws_log_info("step %llu: %s: read through the daemon only", (unsigned long long)dws_step_number(s), mt->note);
		mt->skip_id = id;
		pthread_mutex_unlock(&mt->lock);
		return true;
	}
	if (!local && mt->wait_id != id)
		mt->wait_id = id, mt->wait_since = now_ms();
	bool fetch = !local && now_ms() - mt->wait_since >= LOCAL_GRACE_MS && mt->ops.opened &&
		     mt->ops.opened(mt->ops.ctx, id);
	struct slot *sl = local || fetch ? pick_locked(mt, dws_step_number(s)) : NULL;
	if (!sl) {
		snprintf(mt->note, sizeof(mt->note), "%s",
			 local || fetch ? "both copies are held by open files" : "waiting for the sources' blocks to be cached");
		pthread_mutex_unlock(&mt->lock);
		return false;
	}
	if (fetch)
		dws_log_info("step %llu: source blocks not in the cache %lld s after it became the root: fetching them to materialize",
			     (unsigned long long)dws_step_number(s), (long long)(LOCAL_GRACE_MS / 1000));
	mt->working = true;
	mt->note[0] = 0;
	atomic_store(&mt->cancel, mt->stop); /* a swap or a build from now on cancels */
	int64_t t0 = now_ms();
	const char *how = NULL;
	bool cancelled = false;
	bool ok = fill_slot_unlock(mt, sl, s, &how, &cancelled);
	if (ok) {
		sl->id = id, sl->step = dws_step_number(s), sl->bytes = total, sl->born = now_ms();
		dws_log_info("step %llu: materialized %zu files (%llu bytes), %s in %lld ms under %s: opens read them through the kernel",
			     (unsigned long long)dws_step_number(s), n, (unsigned long long)total, how,
			     (long long)(now_ms() - t0), mt->dir);
	} else if (!cancelled) {
		mt->skip_id = id; /* not tried again; the next step is */
	}
	mt->working = false;
	pthread_mutex_unlock(&mt->lock);
	return true;
}

/* Under lock: the slot serving id, or NULL. */
static struct slot *slot_of_locked(dws_materializer *mt, uint64_t id)
{
	for (int i = 0; i < 2 && id; i++)
		if (mt->slot[i].id == id)
			return &mt->slot[i];
	return NULL;
}

static void *mat_main(void *arg)
{
	dws_materializer *mt = arg;
	struct sched_param sp = {0};
	if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
		(void)setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
	bool waiting = false; /* for a root's sources to be local */
	pthread_mutex_lock(&mt->lock);
	while (!mt->stop) {
		if (!mt->kicked) {
			/* a kick can come before the engine could take it (the
			 * compactor's first idle before m->mat was set): look
			 * again on a clock as well */
			struct timespec ts = dws_deadline_in(waiting ? LOCAL_RECHECK_MS : IDLE_RECHECK_MS);
			pthread_cond_timedwait(&mt->cond, &mt->lock, &ts);
			if (mt->stop)
				break;
		}
		mt->kicked = false;
		pthread_mutex_unlock(&mt->lock);
		waiting = mt->ops.busy(mt->ops.ctx); /* merging, or not started: again soon */
		dws_step *s = waiting ? NULL : mt->ops.root(mt->ops.ctx);
		pthread_mutex_lock(&mt->lock);
		bool todo = s && !slot_of_locked(mt, dws_step_id(s)) && dws_step_id(s) != mt->skip_id;
		pthread_mutex_unlock(&mt->lock);
		if (todo)
			waiting = !materialize(mt, s);
		dws_step_unref(s);
		pthread_mutex_lock(&mt->lock);
	}
	pthread_mutex_unlock(&mt->lock);
	return NULL;
}

int dws_materializer_start(const char *dir, uint64_t max_bytes, const dws_materializer_ops *ops,
			   dws_materializer **out, dws_error *err)
{
	dws_materializer *mt = dws_xcalloc(1, sizeof(*mt));
	mt->dir = dws_xstrdup(dir);
	mt->max = max_bytes;
	mt->ops = *ops;
	mt->kicked = true;
	pthread_mutex_init(&mt->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&mt->cond, &ca);
	pthread_condattr_destroy(&ca);
	int e = pthread_create(&mt->thread, NULL, mat_main, mt);
	if (e) {
		pthread_cond_destroy(&mt->cond);
		pthread_mutex_destroy(&mt->lock);
		free(mt->dir);
		free(mt);
		return dws_fail(err, DWS_EIO, "cannot start the materialization thread: %s", strerror(e));
	}
	*out = mt;
	return DWS_OK;
}

void dws_materializer_kick(dws_materializer *mt)
{
	pthread_mutex_lock(&mt->lock);
	mt->kicked = true;
	pthread_cond_signal(&mt->cond);
	pthread_mutex_unlock(&mt->lock);
}

void dws_materializer_cancel(dws_materializer *mt) { atomic_store(&mt->cancel, true); }

int dws_materializer_fd(dws_materializer *mt, uint64_t id, size_t file)
{
	int fd = -1;
	pthread_mutex_lock(&mt->lock);
	struct slot *sl = slot_of_locked(mt, id);
	if (sl && file < sl->n)
		fd = dws_matpatch_reopen(sl->fd[file]);
	if (fd >= 0)
		sl->holds++;
	pthread_mutex_unlock(&mt->lock);
	return fd;
}

void dws_materializer_put(dws_materializer *mt, uint64_t id)
{
	pthread_mutex_lock(&mt->lock);
	struct slot *sl = slot_of_locked(mt, id);
	if (sl && sl->holds && --sl->holds == 0) {
		mt->kicked = true; /* a step may be waiting for this copy */
		pthread_cond_signal(&mt->cond);
	}
	pthread_mutex_unlock(&mt->lock);
}

bool dws_materializer_has(dws_materializer *mt, uint64_t id)
{
	pthread_mutex_lock(&mt->lock);
	bool yes = slot_of_locked(mt, id) != NULL;
	pthread_mutex_unlock(&mt->lock);
	return yes;
}

bool dws_materializer_pending(dws_materializer *mt, uint64_t root_id)
{
	pthread_mutex_lock(&mt->lock);
	bool p = mt->working || (root_id && !slot_of_locked(mt, root_id) && root_id != mt->skip_id);
	pthread_mutex_unlock(&mt->lock);
	return p;
}

bool dws_materializer_done(dws_materializer *mt, uint64_t *step, uint64_t *bytes)
{
	pthread_mutex_lock(&mt->lock);
	const struct slot *newest = NULL;
	for (int i = 0; i < 2; i++)
		if (mt->slot[i].id && (!newest || mt->slot[i].born > newest->born))
			newest = &mt->slot[i];
	*step = newest ? newest->step : 0;
	*bytes = newest ? newest->bytes : 0;
	pthread_mutex_unlock(&mt->lock);
	return newest != NULL;
}

void dws_materializer_note(dws_materializer *mt, char *out, size_t len, uint64_t *in_place, uint64_t *fresh)
{
	pthread_mutex_lock(&mt->lock);
	snprintf(out, len, "%s", mt->note);
	*in_place = mt->in_place;
	*fresh = mt->fresh;
	pthread_mutex_unlock(&mt->lock);
}

void dws_materializer_stop(dws_materializer *mt)
{
	if (!mt)
		return;
	atomic_store(&mt->cancel, true);
	pthread_mutex_lock(&mt->lock);
	mt->stop = true;
	pthread_cond_signal(&mt->cond);
	pthread_mutex_unlock(&mt->lock);
	pthread_join(mt->thread, NULL);
	for (int i = 0; i < 2; i++)
		close_fds(mt->slot[i].fd, mt->slot[i].n);
	pthread_cond_destroy(&mt->cond);
	pthread_mutex_destroy(&mt->lock);
	free(mt->dir);
	free(mt);
}
