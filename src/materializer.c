/* The materialization scheduler (see materializer.h). */
#include "materializer.h"
#include "clock.h"
#include "log.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

enum { LOCAL_RECHECK_MS = 1000 }; /* a remote root's blocks still to come */

struct dws_materializer {
	char *dir;
	uint64_t max;
	dws_materializer_ops ops;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool stop, kicked, working;
	uint64_t id, step, bytes; /* the step materialized (id 0: none) */
	uint64_t skip_id;         /* over the cap or failed: not tried again */
	int *fd;
	size_t n;
	atomic_bool cancel;
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
 * cancelled; *cancelled says which). */
static int *write_all(dws_materializer *mt, dws_step *s, bool *cancelled)
{
	size_t n = dws_step_file_count(s);
	int *fd = dws_xcalloc(n ? n : 1, sizeof(*fd));
	for (size_t i = 0; i < n; i++)
		fd[i] = -1;
	for (size_t i = 0; i < n; i++) {
		dws_error err = {0};
		if (dws_step_materialize(s, i, mt->dir, DWS_MAT_FREE_FLOOR, &mt->cancel, &fd[i], &err)) {
			*cancelled = atomic_load(&mt->cancel);
			if (!*cancelled)
				dws_log_warn("step %llu not materialized: %s", (unsigned long long)dws_step_number(s), err.msg);
			close_fds(fd, n);
			return NULL;
		}
	}
	return fd;
}

/* false: the step's sources are not all local yet (look again later). */
static bool materialize(dws_materializer *mt, dws_step *s)
{
	uint64_t id = dws_step_id(s), total = 0;
	size_t n = dws_step_file_count(s);
	bool local = true;
	for (size_t i = 0; i < n; i++) {
		total += dws_step_file(s, i)->size;
		local = local && dws_step_file_local(s, i);
	}
	if (total > mt->max) {
		dws_log_info("step %llu: %llu bytes, over materialize_max (%llu): read through the daemon only",
			     (unsigned long long)dws_step_number(s), (unsigned long long)total, (unsigned long long)mt->max);
		pthread_mutex_lock(&mt->lock);
		mt->skip_id = id;
		pthread_mutex_unlock(&mt->lock);
		return true;
	}
	if (!local)
		return false;
	pthread_mutex_lock(&mt->lock);
	mt->working = true;
	atomic_store(&mt->cancel, mt->stop); /* a swap or a build from now on cancels */
	pthread_mutex_unlock(&mt->lock);
	int64_t t0 = now_ms();
	bool cancelled = false;
	int *fd = write_all(mt, s, &cancelled);
	if (fd)
		dws_log_info("step %llu: materialized %zu files (%llu bytes) in %lld ms under %s: opens read them through the kernel",
			     (unsigned long long)dws_step_number(s), n, (unsigned long long)total, (long long)(now_ms() - t0),
			     mt->dir);
	pthread_mutex_lock(&mt->lock);
	mt->working = false;
	int *old = NULL;
	size_t nold = 0;
	if (fd) {
		old = mt->fd, nold = mt->n;
		mt->fd = fd, mt->n = n, mt->id = id;
		mt->step = dws_step_number(s), mt->bytes = total;
	} else if (!cancelled) {
		mt->skip_id = id; /* not tried again; the next step is */
	}
	pthread_mutex_unlock(&mt->lock);
	close_fds(old, nold);
	return true;
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
			struct timespec ts = dws_deadline_in(LOCAL_RECHECK_MS);
			if (waiting)
				pthread_cond_timedwait(&mt->cond, &mt->lock, &ts);
			else
				pthread_cond_wait(&mt->cond, &mt->lock);
			if (mt->stop)
				break;
		}
		mt->kicked = false;
		pthread_mutex_unlock(&mt->lock);
		waiting = false;
		dws_step *s = mt->ops.busy(mt->ops.ctx) ? NULL : mt->ops.root(mt->ops.ctx);
		pthread_mutex_lock(&mt->lock);
		bool todo = s && dws_step_id(s) != mt->id && dws_step_id(s) != mt->skip_id;
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
	if (id && id == mt->id && file < mt->n)
		fd = fcntl(mt->fd[file], F_DUPFD_CLOEXEC, 0);
	pthread_mutex_unlock(&mt->lock);
	return fd;
}

bool dws_materializer_has(dws_materializer *mt, uint64_t id)
{
	pthread_mutex_lock(&mt->lock);
	bool yes = id && id == mt->id;
	pthread_mutex_unlock(&mt->lock);
	return yes;
}

bool dws_materializer_pending(dws_materializer *mt, uint64_t root_id)
{
	pthread_mutex_lock(&mt->lock);
	bool p = mt->working || (root_id && root_id != mt->id && root_id != mt->skip_id);
	pthread_mutex_unlock(&mt->lock);
	return p;
}

bool dws_materializer_done(dws_materializer *mt, uint64_t *step, uint64_t *bytes)
{
	pthread_mutex_lock(&mt->lock);
	bool has = mt->id != 0;
	*step = mt->step;
	*bytes = has ? mt->bytes : 0;
	pthread_mutex_unlock(&mt->lock);
	return has;
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
	close_fds(mt->fd, mt->n);
	pthread_cond_destroy(&mt->cond);
	pthread_mutex_destroy(&mt->lock);
	free(mt->dir);
	free(mt);
}
