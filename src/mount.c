/* The mount engine: what the FUSE layer serves, without FUSE.
 *
 * A sync thread polls the bucket, builds the newest step that builds and
 * verifies, holds it as `ready`, and swaps it in as the root once the root
 * view has been idle for swap_idle (no open handle, no open) or swap_max_delay
 * after it became ready. Steps are immutable values: a swap is one pointer
 * store, open handles keep the step they opened. A step that fails is never
 * served; the root stays where it is and the error shows in the status.
 *
 * Locks: build_lock serializes the builder (slow); lock guards the rest and is
 * never held while building or reading bytes. Order: build_lock, then lock. */
#include "internal.h"
#include "log.h"
#include "step.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct cached_step {
	dws_step *step;
	int64_t last_use;
};

struct step_entry {
	uint64_t step, id;
};

/* A step id that did not build or verify. A bad file fails for good (its id
 * changes when the file does); a failure that may pass (the network, a
 * server) is tried again, later each time. */
struct failure {
	uint64_t id;
	int code;
	unsigned attempts;
	int64_t retry_at;  /* CLOCK_MONOTONIC ms; transient only */
	char msg[768];
};

struct dws_mount {
	dws_mount_opts o;
	char *bucket_uri, *base, *tmpdir, *on_swap, *mountpoint;
	dws_prefix_map *maps;
	dws_bucket *bucket;

	pthread_mutex_t build_lock;
	dws_builder *bl;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	dws_catalog *cat;
	struct step_entry *table; /* current catalog's steps and ids */
	size_t ntable;
	dws_step *root, *ready;
	int64_t ready_since;
	int64_t last_build_ms;   /* build + verify of the newest step built */
	int64_t root_since_ns;   /* CLOCK_REALTIME when the root took its step */
	struct cached_step *cache;
	size_t ncache;
	int root_open;
	int64_t root_activity;
	struct failure *failed;   /* ids that failed to build or verify */
	size_t nfailed;
	char last_error[768];
	int64_t last_poll_wall;
	uint64_t swaps, cache_hits, cache_misses;
	bool stop, started;
	pthread_t thread;
	/* compaction of the builder's newest step, off the build path */
	pthread_t compactor;
	bool compactor_started, compact_wanted, merging;
	pthread_cond_t compact_cond;
	atomic_bool stopping;
	/* remote polling (sync thread only) */
	bool remote, has_probe;
	char info_token[256];
	int64_t next_info, next_relist;
	bool discovered;
	dws_object *found;  /* objects found by HEAD since the last listing */
	size_t nfound;
	unsigned failures;  /* polls failed in a row: the next waits longer */
	/* the root's files written whole into unnamed files (materialize.c),
	 * for the FUSE layer to hand the kernel; under lock */
	char *mat_dir;          /* NULL: off (dws_mount_materialize) */
	uint64_t mat_max;       /* a step larger than this is never written */
	uint64_t mat_id;        /* step id of mat_fd, 0: none */
	uint64_t mat_step, mat_bytes, mat_skip_id;
	int *mat_fd;
	size_t mat_n;
	bool materializing;
	atomic_bool mat_stop; /* the root moved on, or the mount closes */
};

static int64_t wall_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* CLOCK_MONOTONIC ms from now, for the mount's condition variables */
static struct timespec deadline_in(int64_t ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (ms % 1000) * 1000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	return ts;
}

/* ---- catalog table ---- */

static void set_catalog_locked(dws_mount *m, dws_catalog *c)
{
	size_t n = dws_catalog_count(c);
	struct step_entry *t = dws_xcalloc(n ? n : 1, sizeof(*t));
	for (size_t i = 0; i < n; i++) {
		t[i].step = dws_catalog_at(c, i)->step;
		t[i].id = dws_catalog_step_id(c, t[i].step);
	}
	free(m->table);
	m->table = t;
	m->ntable = n;
	m->cat = c;
	/* failures of ids the bucket no longer holds can never come back */
	for (size_t i = 0; i < m->nfailed;) {
		bool kept = false;
		for (size_t k = 0; k < n && !kept; k++)
			kept = t[k].id == m->failed[i].id;
		if (kept)
			i++;
		else
			m->failed[i] = m->failed[--m->nfailed];
	}
}

static struct failure *failure_find_locked(const dws_mount *m, uint64_t id)
{
	for (size_t i = 0; i < m->nfailed; i++)
		if (m->failed[i].id == id)
			return &m->failed[i];
	return NULL;
}

/* Whether id is not worth a build now: it failed for good, or its next try
 * is still to come. */
static bool failure_holds_locked(const dws_mount *m, uint64_t id, int64_t now)
{
	const struct failure *f = failure_find_locked(m, id);
	return f && (!dws_code_transient(f->code) || now < f->retry_at);
}

/* Remember that id failed with err; returns the ms until its next try (0:
 * never, the step is bad). Retries back off from 1 s to 60 s. */
static int64_t failure_note_locked(dws_mount *m, uint64_t id, const dws_error *err)
{
	struct failure *f = failure_find_locked(m, id);
	if (!f) {
		m->failed = dws_xrealloc(m->failed, (m->nfailed + 1) * sizeof(*m->failed));
		f = &m->failed[m->nfailed++];
		memset(f, 0, sizeof(*f));
		f->id = id;
	}
	f->code = err->code;
	snprintf(f->msg, sizeof(f->msg), "%s", err->msg);
	if (!dws_code_transient(f->code))
		return 0;
	int64_t wait = 1000;
	for (unsigned i = 0; i < f->attempts && wait < 60000; i++)
		wait *= 2;
	if (wait > 60000)
		wait = 60000;
	f->attempts++;
	f->retry_at = now_ms() + wait;
	return wait;
}

static void failure_forget_locked(dws_mount *m, uint64_t id)
{
	struct failure *f = failure_find_locked(m, id);
	if (f)
		*f = m->failed[--m->nfailed];
}

/* Whether a failed step is due for another try. */
static bool retry_due_locked(const dws_mount *m, int64_t now)
{
	for (size_t i = 0; i < m->nfailed; i++)
		if (dws_code_transient(m->failed[i].code) && now >= m->failed[i].retry_at)
			return true;
	return false;
}

/* ---- step cache ---- */

static dws_step *cache_find_locked(dws_mount *m, uint64_t id)
{
	if (m->root && dws_step_id(m->root) == id)
		return dws_step_ref(m->root);
	if (m->ready && dws_step_id(m->ready) == id)
		return dws_step_ref(m->ready);
	for (size_t i = 0; i < m->ncache; i++)
		if (dws_step_id(m->cache[i].step) == id) {
			m->cache[i].last_use = now_ms();
			return dws_step_ref(m->cache[i].step);
		}
	return NULL;
}

static void cache_put_locked(dws_mount *m, dws_step *s)
{
	for (size_t i = 0; i < m->ncache; i++)
		if (dws_step_id(m->cache[i].step) == dws_step_id(s))
			return;
	if (m->ncache == m->o.max_steps) {
		size_t old = 0;
		for (size_t i = 1; i < m->ncache; i++)
			if (m->cache[i].last_use < m->cache[old].last_use)
				old = i;
		/* open handles keep their own reference: evicting is safe */
		dws_step_unref(m->cache[old].step);
		m->cache[old] = m->cache[--m->ncache];
	}
	m->cache[m->ncache++] = (struct cached_step){dws_step_ref(s), now_ms()};
}

/* Build step n under build_lock. */
static int build(dws_mount *m, uint64_t n, dws_step **out, dws_error *err)
{
	pthread_mutex_lock(&m->build_lock);
	int rc = dws_builder_build(m->bl, n, out, err);
	pthread_mutex_unlock(&m->build_lock);
	return rc;
}

static int verify_state(dws_mount *m, dws_step *s, dws_error *err);
static dws_step *build_verified(dws_mount *m, uint64_t n, uint64_t id, bool quiet, dws_error *err);

int dws_mount_get_step_by_id(dws_mount *m, uint64_t id, dws_step **out,
			     dws_error *err)
{
	pthread_mutex_lock(&m->lock);
	dws_step *s = cache_find_locked(m, id);
	uint64_t n = 0;
	bool known = false;
	for (size_t i = 0; !s && i < m->ntable; i++)
		if (m->table[i].id == id) {
			n = m->table[i].step;
			known = true;
		}
	if (s)
		m->cache_hits++;
	else
		m->cache_misses++;
	/* a step that failed is served nowhere: not rebuilt until it may pass */
	const struct failure *f = s ? NULL : failure_find_locked(m, id);
	int frc = f && failure_holds_locked(m, id, now_ms()) ? dws_fail(err, f->code, "%s", f->msg) : DWS_OK;
	pthread_mutex_unlock(&m->lock);
	if (s) {
		*out = s;
		return DWS_OK;
	}
	if (frc)
		return frc;
	if (!known)
		return dws_fail(err, DWS_ENOENT, "%s: that step is no longer in the bucket", m->bucket_uri);
	s = build_verified(m, n, id, false, err);
	if (!s)
		return dws_code_of(err, DWS_EIO);
	if (dws_step_id(s) != id) { /* the catalog moved on while we built */
		dws_step_unref(s);
		return dws_fail(err, DWS_ENOENT, "%s: step %llu changed in the bucket", m->bucket_uri, (unsigned long long)n);
	}
	pthread_mutex_lock(&m->lock);
	cache_put_locked(m, s);
	pthread_mutex_unlock(&m->lock);
	*out = s;
	return DWS_OK;
}

int dws_mount_get_step(dws_mount *m, uint64_t step, dws_step **out,
		       dws_error *err)
{
	uint64_t id = 0;
	pthread_mutex_lock(&m->lock);
	for (size_t i = 0; i < m->ntable; i++)
		if (m->table[i].step == step)
			id = m->table[i].id;
	pthread_mutex_unlock(&m->lock);
	if (!id)
		return dws_fail(err, DWS_ENOENT, "%s: no step %llu", m->bucket_uri, (unsigned long long)step);
	return dws_mount_get_step_by_id(m, id, out, err);
}

size_t dws_mount_steps(dws_mount *m, uint64_t **out)
{
	pthread_mutex_lock(&m->lock);
	uint64_t *v = dws_xcalloc(m->ntable ? m->ntable : 1, sizeof(*v));
	size_t n = 0;
	for (size_t i = 0; i < m->ntable; i++) {
		const struct failure *f = failure_find_locked(m, m->table[i].id);
		if (!f || dws_code_transient(f->code)) /* a bad step is not listed */
			v[n++] = m->table[i].step;
	}
	pthread_mutex_unlock(&m->lock);
	*out = v;
	return n;
}

void dws_mount_step_checksum(dws_mount *m, uint64_t step, char out[17])
{
	pthread_mutex_lock(&m->lock);
	const dws_stepfile *f = m->cat ? dws_catalog_find(m->cat, step) : NULL;
	snprintf(out, 17, "%s", f ? f->state_xxh3 : "");
	pthread_mutex_unlock(&m->lock);
}

dws_step *dws_mount_root(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	dws_step *s = dws_step_ref(m->root);
	pthread_mutex_unlock(&m->lock);
	return s;
}

dws_step *dws_mount_root_lookup(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	dws_step *s = dws_step_ref(m->root);
	m->root_activity = now_ms();
	pthread_mutex_unlock(&m->lock);
	return s;
}

void dws_mount_root_opened(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->root_open++;
	m->root_activity = now_ms();
	pthread_mutex_unlock(&m->lock);
}

void dws_mount_root_released(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->root_open--;
	m->root_activity = now_ms();
	pthread_cond_signal(&m->cond);
	pthread_mutex_unlock(&m->lock);
}

/* ---- verification of a new step ---- */

static int verify_state(dws_mount *m, dws_step *s, dws_error *err)
{
	if (m->o.verify < DWS_VERIFY_STATE)
		return DWS_OK;
	char want[17];
	dws_mount_step_checksum(m, dws_step_number(s), want);
	return dws_step_check_state(s, want, m->bucket_uri, err);
}

/* Build step n and verify it; a failure is remembered against its id (see
 * struct failure) and logged. Returns NULL on failure, err filled. */
static dws_step *build_verified(dws_mount *m, uint64_t n, uint64_t id, bool quiet, dws_error *err)
{
	int64_t t0 = now_ms();
	dws_step *s = NULL;
	int rc = build(m, n, &s, err);
	if (!rc)
		rc = verify_state(m, s, err);
	if (!rc) {
		pthread_mutex_lock(&m->lock);
		failure_forget_locked(m, id);
		pthread_mutex_unlock(&m->lock);
		dws_log("step %llu ready: anchor %llu, %zu files since, %llu patched elements, built in %lld ms",
			(unsigned long long)n, (unsigned long long)dws_step_anchor(s), dws_step_chain_length(s),
			(unsigned long long)dws_step_patch_entries(s), (long long)(now_ms() - t0));
		return s;
	}
	dws_step_unref(s);
	if (!err->code)
		dws_fail(err, rc, "step %llu: %s", (unsigned long long)n, dws_code_name(rc));
	pthread_mutex_lock(&m->lock);
	int64_t again = failure_note_locked(m, id, err);
	snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	pthread_mutex_unlock(&m->lock);
	if (quiet) /* at start-up the caller reports one line */
		return NULL;
	if (again)
		dws_log_warn("step %llu not built yet (trying again in %lld s): %s", (unsigned long long)n,
			(long long)(again / 1000), err->msg);
	else
		dws_log_warn("step %llu refused: %s", (unsigned long long)n, err->msg);
	return NULL;
}

/* Build and verify the newest step that works and is newer than both
 * `after` (with have_root) and the step already ready to be served: the
 * pending step only ever moves forward. Steps that failed for good, or
 * whose next try is still to come, are skipped. Returns NULL if none. */
static dws_step *build_newest(dws_mount *m, uint64_t after, bool have_root, dws_error *last, bool quiet)
{
	pthread_mutex_lock(&m->lock);
	size_t n = m->ntable;
	struct step_entry *t = dws_xcalloc(n ? n : 1, sizeof(*t));
	memcpy(t, m->table, n * sizeof(*t));
	uint64_t floor = after;
	bool have_floor = have_root;
	if (m->ready && (!have_floor || dws_step_number(m->ready) > floor)) {
		floor = dws_step_number(m->ready);
		have_floor = true;
	}
	pthread_mutex_unlock(&m->lock);
	dws_step *got = NULL;
	for (size_t i = n; i-- > 0 && !got;) {
		if (have_floor && t[i].step <= floor)
			break;
		pthread_mutex_lock(&m->lock);
		bool skip = failure_holds_locked(m, t[i].id, now_ms());
		pthread_mutex_unlock(&m->lock);
		if (skip)
			continue;
		/* the root moves on: its materialization would only slow the
		 * build down (it restarts for the new root after the swap) */
		atomic_store(&m->mat_stop, true);
		dws_error err = {0};
		int64_t t0 = now_ms();
		got = build_verified(m, t[i].step, t[i].id, quiet, &err);
		if (!got) {
			if (last && !last->code)
				*last = err;
			continue;
		}
		pthread_mutex_lock(&m->lock);
		m->last_build_ms = now_ms() - t0;
		m->compact_wanted = true;
		pthread_cond_signal(&m->compact_cond);
		pthread_mutex_unlock(&m->lock);
	}
	free(t);
	return got;
}

/* ---- compaction thread ----
 *
 * A delta appends one run of patches per tensor; runs are merged here, on
 * their own thread, so a new step never waits for a merge and reads look at
 * few runs whatever the chain length. The merged step has the same bytes and
 * id as the one it replaces: the root and the step cache take it at once
 * (handles keep the object they opened; both give the same bytes). */

/* Put s in place of every held step with its id. */
static void replace_equivalent(dws_mount *m, dws_step *s)
{
	size_t nd = 0;
	uint64_t id = dws_step_id(s);
	pthread_mutex_lock(&m->lock);
	dws_step **drop = dws_xcalloc(2 + m->ncache, sizeof(*drop));
	if (m->root && dws_step_id(m->root) == id && m->root != s) {
		drop[nd++] = m->root;
		m->root = dws_step_ref(s);
	}
	if (m->ready && dws_step_id(m->ready) == id && m->ready != s) {
		drop[nd++] = m->ready;
		m->ready = dws_step_ref(s);
	}
	for (size_t i = 0; i < m->ncache; i++)
		if (dws_step_id(m->cache[i].step) == id && m->cache[i].step != s) {
			drop[nd++] = m->cache[i].step;
			m->cache[i].step = dws_step_ref(s);
		}
	pthread_mutex_unlock(&m->lock);
	for (size_t i = 0; i < nd; i++)
		dws_step_unref(drop[i]);
	free(drop);
}

/* ---- materialized root ----
 *
 * Once the root is merged and idle, its files are written whole into
 * unnamed files (dws_step_materialize) on this thread, at idle priority,
 * when the step fits mat_max and every source byte is local (a remote
 * source only once the block cache holds all of it: this never fetches).
 * The FUSE layer hands them to the kernel (passthrough): opens after that
 * read the page cache of a local file, and never reach the daemon. */

static bool materialize_pending_locked(dws_mount *m)
{
	if (!m->mat_dir || !m->root || m->ready || m->stop)
		return false;
	uint64_t id = dws_step_id(m->root);
	return id != m->mat_id && id != m->mat_skip_id;
}

static void close_fds(int *fd, size_t n)
{
	for (size_t i = 0; fd && i < n; i++)
		if (fd[i] >= 0)
			close(fd[i]);
	free(fd);
}

/* false: the root's sources are not all local yet (try later) */
static bool materialize_root(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	if (!materialize_pending_locked(m)) {
		pthread_mutex_unlock(&m->lock);
		return true;
	}
	dws_step *s = dws_step_ref(m->root);
	char *dir = dws_xstrdup(m->mat_dir);
	uint64_t max = m->mat_max, id = dws_step_id(s);
	atomic_store(&m->mat_stop, m->stop); /* a swap from now on cancels */
	pthread_mutex_unlock(&m->lock);
	size_t n = dws_step_file_count(s);
	uint64_t total = 0;
	bool local = true, skip = false, cancelled = false;
	for (size_t i = 0; i < n; i++) {
		total += dws_step_file(s, i)->size;
		local = local && dws_step_file_local(s, i);
	}
	int *fd = NULL;
	if (total > max) {
		dws_log("step %llu: %llu bytes, over materialize_max (%llu): read through the daemon only",
			(unsigned long long)dws_step_number(s), (unsigned long long)total, (unsigned long long)max);
		skip = true;
	} else if (local) {
		pthread_mutex_lock(&m->lock);
		m->materializing = true;
		pthread_mutex_unlock(&m->lock);
		int64_t t0 = now_ms();
		fd = dws_xcalloc(n ? n : 1, sizeof(*fd));
		for (size_t i = 0; i < n; i++)
			fd[i] = -1;
		for (size_t i = 0; i < n && !skip; i++) {
			dws_error err = {0};
			if (dws_step_materialize(s, i, dir, DWS_MAT_FREE_FLOOR, &m->mat_stop, &fd[i], &err)) {
				cancelled = atomic_load(&m->mat_stop);
				if (!cancelled)
					dws_log_warn("step %llu not materialized: %s", (unsigned long long)dws_step_number(s), err.msg);
				skip = true;
			}
		}
		if (!skip)
			dws_log("step %llu: materialized %zu files (%llu bytes) in %lld ms under %s: opens read them through the kernel",
				(unsigned long long)dws_step_number(s), n, (unsigned long long)total,
				(long long)(now_ms() - t0), dir);
	}
	int *old = NULL;
	size_t nold = 0;
	pthread_mutex_lock(&m->lock);
	m->materializing = false;
	if (skip) {
		if (!cancelled) /* not tried again; the next step is */
			m->mat_skip_id = id;
	} else if (fd) {
		old = m->mat_fd, nold = m->mat_n;
		m->mat_fd = fd, m->mat_n = n, m->mat_id = id;
		m->mat_step = dws_step_number(s), m->mat_bytes = total;
		fd = NULL;
	}
	pthread_mutex_unlock(&m->lock);
	close_fds(skip ? fd : old, skip ? n : nold);
	free(dir);
	dws_step_unref(s);
	return local || skip;
}

void dws_mount_materialize(dws_mount *m, const char *dir, uint64_t max_bytes)
{
	pthread_mutex_lock(&m->lock);
	if (!m->mat_dir && dir) {
		m->mat_dir = dws_xstrdup(dir);
		m->mat_max = max_bytes;
		pthread_cond_signal(&m->compact_cond);
	}
	pthread_mutex_unlock(&m->lock);
}

int dws_mount_materialized_fd(dws_mount *m, uint64_t id, size_t file)
{
	int fd = -1;
	pthread_mutex_lock(&m->lock);
	if (id && id == m->mat_id && file < m->mat_n)
		fd = fcntl(m->mat_fd[file], F_DUPFD_CLOEXEC, 0);
	pthread_mutex_unlock(&m->lock);
	return fd;
}

bool dws_mount_is_materialized(dws_mount *m, uint64_t id)
{
	pthread_mutex_lock(&m->lock);
	bool yes = id && id == m->mat_id;
	pthread_mutex_unlock(&m->lock);
	return yes;
}

static void *compact_main(void *arg)
{
	dws_mount *m = arg;
	/* background work: builds and reads go first on a busy machine */
	struct sched_param sp = {0};
	if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
		(void)setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
	pthread_mutex_lock(&m->lock);
	/* tests: hold the first merge back (files opened before it) */
	const char *hold = getenv("DWSFS_TEST_MERGE_DELAY_MS");
	if (hold && atoi(hold) > 0) {
		struct timespec ts = deadline_in(atoi(hold));
		while (!m->stop && pthread_cond_timedwait(&m->compact_cond, &m->lock, &ts) == 0)
			;
	}
	while (!m->stop) {
		if (!m->compact_wanted) {
			if (materialize_pending_locked(m)) {
				pthread_mutex_unlock(&m->lock);
				bool waiting = !materialize_root(m);
				pthread_mutex_lock(&m->lock);
				/* sources not all local yet (a remote bucket's blocks
				 * still to come): look again in a while */
				struct timespec ts = deadline_in(1000);
				if (waiting && !m->stop && !m->compact_wanted)
					pthread_cond_timedwait(&m->compact_cond, &m->lock, &ts);
				continue;
			}
			pthread_cond_wait(&m->compact_cond, &m->lock);
			continue;
		}
		m->compact_wanted = false;
		m->merging = true;
		pthread_mutex_unlock(&m->lock);
		/* a merge can make the next level worth merging: a few rounds,
		 * one log line for them all */
		int64_t t_all = now_ms();
		size_t merged_tensors = 0;
		dws_step *done = NULL;
		for (int round = 0; round < 8 && !atomic_load(&m->stopping); round++) {
			/* what is served next, else what is served */
			pthread_mutex_lock(&m->lock);
			dws_step *target = dws_step_ref(m->ready ? m->ready : m->root);
			pthread_mutex_unlock(&m->lock);
			dws_compaction *c = dws_compaction_plan(target);
			dws_step_unref(target);
			if (!c)
				break;
			dws_step *last = NULL;
			bool more = true;
			/* in slices, each put in place before the next: the runs it
			 * replaced are freed as the merged ones come, not after all */
			while (more && !atomic_load(&m->stopping)) {
				more = dws_compaction_run(c, 64u << 20, &m->stopping);
				if (atomic_load(&m->stopping))
					break;
				dws_step *ns = NULL, *newer = NULL;
				pthread_mutex_lock(&m->build_lock);
				dws_compaction_apply(m->bl, c, &ns, &newer);
				pthread_mutex_unlock(&m->build_lock);
				if (newer) {
					replace_equivalent(m, newer);
					if (m->o.merged)
						m->o.merged(m->o.ctx, newer);
					dws_step_unref(newer);
				}
				if (ns) {
					replace_equivalent(m, ns);
					if (m->o.merged)
						m->o.merged(m->o.ctx, ns);
					dws_step_unref(last);
					last = ns;
				}
			}
			merged_tensors += dws_compaction_count(c);
			dws_compaction_free(c);
			if (!last)
				break;
			dws_step_unref(done);
			done = last;
		}
		if (done)
			dws_log_debug("step %llu: merged the patch runs of %zu tensors in %lld ms (%llu patched elements)",
				(unsigned long long)dws_step_number(done), merged_tensors, (long long)(now_ms() - t_all),
				(unsigned long long)dws_step_patch_entries(done));
		dws_step_unref(done);
		pthread_mutex_lock(&m->lock);
		m->merging = m->compact_wanted; /* more to do at once, or idle */
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* ---- sync thread ---- */

static void run_on_swap(dws_mount *m, uint64_t step)
{
	if (!m->on_swap)
		return;
	pid_t pid = fork();
	if (pid == 0) {
		/* grandchild runs the command; the child exits so nothing is left to reap */
		if (fork() == 0) {
			char buf[32];
			snprintf(buf, sizeof(buf), "%llu", (unsigned long long)step);
			setenv("DWSFS_STEP", buf, 1);
			setenv("DWSFS_MOUNT", m->mountpoint ? m->mountpoint : "", 1);
			/* the daemon's credentials are not the hook's business */
			static const char *const secrets[] = {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
							      "AWS_SESSION_TOKEN"};
			for (size_t i = 0; !m->o.on_swap_keep_secrets && i < DWS_ARRAY_LEN(secrets); i++)
				unsetenv(secrets[i]);
			execl("/bin/sh", "sh", "-c", m->on_swap, (char *)NULL);
			_exit(127);
		}
		_exit(0);
	}
	if (pid > 0)
		waitpid(pid, NULL, 0);
	else
		dws_log_error("on_swap: cannot fork: %s", strerror(errno));
}

/* Remote buckets are polled within Hub quotas: each poll HEADs the name the
 * next delta would have (a resolver call); a bucket-info probe (one API call)
 * every info_poll_ms notices anything else (anchors, skipped step numbers,
 * restarts) and only then is the bucket listed again (API calls); a full
 * listing happens at least every relist_ms. */
static bool poll_remote(dws_mount *m, bool *relist, dws_error *err)
{
	int64_t now = now_ms();
	*relist = now >= m->next_relist || !m->has_probe; /* S3: listing is the probe */
	if (!m->has_probe)
		return true;
	if (now >= m->next_info) {
		char tok[256];
		int rc = dws_bucket_probe(m->bucket, tok, sizeof(tok), err);
		m->next_info = now + m->o.info_poll_ms;
		if (rc && rc != DWS_EUNSUP)
			return false;
		if (!rc && strcmp(tok, m->info_token) != 0) {
			if (!m->discovered && m->info_token[0])
				*relist = true;
			snprintf(m->info_token, sizeof(m->info_token), "%s", tok);
		}
		m->discovered = false;
	}
	if (*relist)
		return true;
	/* the next step numbers, as deltas (compressed if the run compresses),
	 * or as an anchor where the run's anchor interval puts one */
	pthread_mutex_lock(&m->lock);
	uint64_t next = m->ntable ? m->table[m->ntable - 1].step + 1 : 1;
	bool zst = false;
	uint64_t a_last = 0, a_every = 0;
	for (size_t i = 0; m->cat && i < dws_catalog_count(m->cat); i++) {
		const dws_stepfile *f = dws_catalog_at(m->cat, i);
		zst = f->compressed;
		if (f->in_anchors) {
			if (a_last && f->step > a_last)
				a_every = f->step - a_last;
			a_last = f->step;
		}
	}
	pthread_mutex_unlock(&m->lock);
	bool found_any = false;
	for (int k = 0; k < 16; k++, next++) {
		char key[64];
		bool anchor = a_every && next > a_last && (next - a_last) % a_every == 0;
		snprintf(key, sizeof(key), "%s/step_%06llu.safetensors%s", anchor ? "anchors" : "deltas", (unsigned long long)next,
			 zst ? ".zst" : "");
		dws_object o;
		dws_error e = {0};
		int rc = dws_bucket_head(m->bucket, key, &o, &e);
		if (rc == DWS_ENOENT)
			break;
		if (rc) {
			*err = e;
			return found_any;
		}
		m->found = dws_xrealloc(m->found, (m->nfound + 1) * sizeof(*m->found));
		m->found[m->nfound++] = o;
		m->discovered = found_any = true;
	}
	return found_any;
}

static void poll_failed(dws_mount *m, const dws_error *err)
{
	dws_log_warn("poll failed: %s", err->msg);
	pthread_mutex_lock(&m->lock);
	snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	m->last_poll_wall = (int64_t)time(NULL);
	pthread_mutex_unlock(&m->lock);
	m->failures++;
}

/* After n failed polls in a row the next waits poll * 2^n, at most 60 s. */
static int64_t poll_delay(const dws_mount *m)
{
	uint64_t cap = m->o.poll_ms > 60000 ? m->o.poll_ms : 60000, d = m->o.poll_ms;
	for (unsigned i = 0; i < m->failures && d < cap; i++)
		d *= 2;
	return (int64_t)(d < cap ? d : cap);
}

static void poll_once(dws_mount *m)
{
	dws_error err = {0};
	dws_catalog *c = NULL;
	dws_catalog_opts co = {.prev = m->cat};
	bool relist = true;
	if (m->remote) {
		bool changed = poll_remote(m, &relist, &err);
		if (err.code) {
			poll_failed(m, &err);
			if (!changed)
				return;
			memset(&err, 0, sizeof(err));
		}
		/* a step that failed for a passing reason is tried again with
		 * the listing it had (its headers read again where they failed) */
		pthread_mutex_lock(&m->lock);
		bool retry = retry_due_locked(m, now_ms());
		pthread_mutex_unlock(&m->lock);
		if (!relist && !changed && !retry) {
			pthread_mutex_lock(&m->lock);
			m->last_poll_wall = (int64_t)time(NULL);
			pthread_mutex_unlock(&m->lock);
			if (m->failures)
				dws_log("poll recovered after %u failures", m->failures);
			m->failures = 0;
			return;
		}
		co.reuse_listing = !relist;
		co.extra = m->found;
		co.nextra = m->nfound;
	}
	int rc = dws_catalog_load(m->bucket, &co, &c, &err);
	if (!rc && relist && m->remote) {
		m->next_relist = now_ms() + m->o.relist_ms;
		dws_objects_free(m->found, m->nfound); /* the listing has them now */
		m->found = NULL;
		m->nfound = 0;
	}
	pthread_mutex_lock(&m->lock);
	m->last_poll_wall = (int64_t)time(NULL);
	pthread_mutex_unlock(&m->lock);
	if (rc) {
		poll_failed(m, &err);
		return;
	}
	if (m->failures) {
		dws_log("poll recovered after %u failures", m->failures);
		m->failures = 0;
	}
	pthread_mutex_lock(&m->build_lock);
	pthread_mutex_lock(&m->lock);
	dws_catalog *old = m->cat;
	set_catalog_locked(m, c);
	dws_builder_set_catalog(m->bl, c);
	uint64_t root_step = dws_step_number(m->root);
	/* a ready step the bucket no longer holds as it was is never served */
	dws_step *gone = NULL;
	if (m->ready && dws_catalog_step_id(c, dws_step_number(m->ready)) != dws_step_id(m->ready)) {
		gone = m->ready;
		m->ready = NULL;
	}
	pthread_mutex_unlock(&m->lock);
	pthread_mutex_unlock(&m->build_lock);
	dws_catalog_free(old);
	dws_step_unref(gone);

	dws_step *s = build_newest(m, root_step, true, NULL, false);
	if (!s)
		return;
	pthread_mutex_lock(&m->lock);
	/* a newer ready step replaces an older one that never got served; the
	 * root has been behind since the first of them became ready, and
	 * swap_max_delay counts from then whatever arrives meanwhile */
	dws_step *drop = m->ready;
	if (!drop)
		m->ready_since = now_ms();
	m->ready = s;
	pthread_mutex_unlock(&m->lock);
	dws_step_unref(drop);
}

static void *sync_main(void *arg)
{
	dws_mount *m = arg;
	int64_t next_poll = now_ms() + m->o.poll_ms;
	pthread_mutex_lock(&m->lock);
	while (!m->stop) {
		int64_t now = now_ms();
		if (now >= next_poll) {
			pthread_mutex_unlock(&m->lock);
			poll_once(m);
			pthread_mutex_lock(&m->lock);
			next_poll = now_ms() + poll_delay(m);
			continue;
		}
		int64_t wake = next_poll;
		if (m->ready) {
			bool idle = m->root_open == 0 && now - m->root_activity >= m->o.swap_idle_ms;
			bool overdue = !m->o.swap_never_force && now - m->ready_since >= m->o.swap_max_delay_ms;
			if (idle || overdue) {
				dws_step *old = m->root;
				m->root = m->ready;
				m->ready = NULL;
				m->swaps++;
				m->root_since_ns = wall_ns();
				atomic_store(&m->mat_stop, true); /* the old root's is not wanted */
				pthread_cond_signal(&m->compact_cond); /* materialize it */
				m->last_error[0] = 0;
				uint64_t n = dws_step_number(m->root);
				dws_step *nr = dws_step_ref(m->root);
				pthread_mutex_unlock(&m->lock);
				dws_log("root now serves step %llu (was %llu)%s", (unsigned long long)n,
					(unsigned long long)dws_step_number(old), idle ? "" : " after swap_max_delay, with the root in use");
				if (m->o.swapped)
					m->o.swapped(m->o.ctx, old, nr);
				run_on_swap(m, n);
				dws_step_unref(old);
				dws_step_unref(nr);
				pthread_mutex_lock(&m->lock);
				continue;
			}
			int64_t w = !m->root_open ? m->root_activity + m->o.swap_idle_ms
				    : m->o.swap_never_force ? wake : m->ready_since + m->o.swap_max_delay_ms;
			if (w < wake)
				wake = w;
		}
		int64_t ms = wake - now_ms();
		struct timespec ts = deadline_in(ms < 1 ? 1 : ms);
		pthread_cond_timedwait(&m->cond, &m->lock, &ts);
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* ---- status ---- */

char *dws_mount_status_json(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	json_t *j = json_object();
	size_t latest = m->ntable ? m->table[m->ntable - 1].step : 0;
	uint64_t rs = dws_step_number(m->root);
	size_t lag = 0;
	for (size_t i = 0; i < m->ntable; i++)
		lag += m->table[i].step > rs;
	char when[32] = "";
	if (m->last_poll_wall) {
		time_t t = (time_t)m->last_poll_wall;
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	}
	json_object_set_new(j, "step", json_integer((json_int_t)rs));
	json_object_set_new(j, "anchor", json_integer((json_int_t)dws_step_anchor(m->root)));
	json_object_set_new(j, "chain_length", json_integer((json_int_t)dws_step_chain_length(m->root)));
	json_object_set_new(j, "bucket", json_string(m->bucket_uri));
	json_object_set_new(j, "last_poll", m->last_poll_wall ? json_string(when) : json_null());
	json_object_set_new(j, "latest_step", json_integer((json_int_t)latest));
	json_object_set_new(j, "lag_steps", json_integer((json_int_t)lag));
	json_object_set_new(j, "pending_step", m->ready ? json_integer((json_int_t)dws_step_number(m->ready)) : json_null());
	json_object_set_new(j, "steps", json_integer((json_int_t)m->ntable));
	json_object_set_new(j, "swaps", json_integer((json_int_t)m->swaps));
	json_object_set_new(j, "root_since_ns", json_integer((json_int_t)m->root_since_ns));
	json_object_set_new(j, "last_build_ms", json_integer((json_int_t)m->last_build_ms));
	json_object_set_new(j, "merging", json_boolean(m->merging || m->compact_wanted));
	json_object_set_new(j, "materializing", json_boolean(m->materializing || materialize_pending_locked(m)));
	json_object_set_new(j, "materialized_step", m->mat_id ? json_integer((json_int_t)m->mat_step) : json_null());
	json_object_set_new(j, "materialized_bytes", json_integer((json_int_t)(m->mat_id ? m->mat_bytes : 0)));
	json_object_set_new(j, "root_open_handles", json_integer(m->root_open));
	json_object_set_new(j, "patched_elements", json_integer((json_int_t)dws_step_patch_entries(m->root)));
	uint64_t whole_bytes;
	size_t whole = dws_step_whole_tensors(m->root, &whole_bytes);
	json_object_set_new(j, "whole_tensors", json_integer((json_int_t)whole));
	json_object_set_new(j, "whole_tensor_bytes", json_integer((json_int_t)whole_bytes));
	json_object_set_new(j, "patch_bytes", json_integer((json_int_t)dws_patch_memory()));
	if (m->remote) {
		uint64_t req[4], bytes[4];
		dws_cache_counts cc;
		dws_bucket_http_counts(m->bucket, req, bytes);
		dws_bucket_cache_stats(m->bucket, &cc);
		json_object_set_new(j, "bytes_fetched", json_integer((json_int_t)(bytes[2] + bytes[3] + bytes[0] + bytes[1])));
		json_object_set_new(j, "cache_hits", json_integer((json_int_t)cc.hits));
		json_object_set_new(j, "cache_misses", json_integer((json_int_t)cc.misses));
		json_object_set_new(j, "cache_bytes", json_integer((json_int_t)cc.bytes));
		json_object_set_new(j, "cache_unkept_blocks", json_integer((json_int_t)cc.unkept_blocks));
		json_object_set_new(j, "cache_unkept_bytes", json_integer((json_int_t)cc.unkept_bytes));
		json_object_set_new(j, "cache_waits", json_integer((json_int_t)cc.waits));
		json_object_set_new(j, "cache_wait_ms", json_integer((json_int_t)cc.wait_ms));
		json_object_set_new(j, "api_calls", json_integer((json_int_t)req[0]));
		json_object_set_new(j, "resolver_calls", json_integer((json_int_t)req[1]));
		json_object_set_new(j, "cdn_requests", json_integer((json_int_t)req[2]));
		json_object_set_new(j, "s3_requests", json_integer((json_int_t)req[3]));
	} else {
		json_object_set_new(j, "bytes_fetched", json_integer((json_int_t)dws_stats_bytes_fetched()));
		json_object_set_new(j, "cache_hits", json_integer((json_int_t)m->cache_hits));
		json_object_set_new(j, "cache_misses", json_integer((json_int_t)m->cache_misses));
	}
	json_object_set_new(j, "last_error", m->last_error[0] ? json_string(m->last_error) : json_null());
	pthread_mutex_unlock(&m->lock);
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	json_decref(j);
	char *out = dws_xasprintf("%s\n", s ? s : "{}");
	free(s);
	return out;
}

/* ---- life cycle ---- */

int dws_mount_open(const dws_mount_opts *o, dws_mount **out, dws_error *err)
{
	dws_mount *m = dws_xcalloc(1, sizeof(*m));
	m->o = *o;
	if (!m->o.poll_ms)
		m->o.poll_ms = 1000;
	if (!m->o.info_poll_ms)
		m->o.info_poll_ms = 60000;
	if (!m->o.relist_ms)
		m->o.relist_ms = 600000;
	if (!m->o.swap_idle_ms)
		m->o.swap_idle_ms = 1000;
	if (!m->o.swap_max_delay_ms)
		m->o.swap_max_delay_ms = 30000;
	if (!m->o.max_steps)
		m->o.max_steps = 8;
	if (!m->o.verify_set)
		m->o.verify = DWS_VERIFY_STATE; /* remote buckets: payload, below */
	m->bucket_uri = dws_xstrdup(o->bucket);
	m->base = o->base ? dws_xstrdup(o->base) : NULL;
	m->tmpdir = o->tmpdir ? dws_xstrdup(o->tmpdir) : NULL;
	m->on_swap = o->on_swap ? dws_xstrdup(o->on_swap) : NULL;
	m->mountpoint = o->mountpoint ? dws_xstrdup(o->mountpoint) : NULL;
	m->maps = dws_xcalloc(o->nmaps ? o->nmaps : 1, sizeof(*m->maps));
	for (size_t i = 0; i < o->nmaps; i++)
		m->maps[i] = (dws_prefix_map){dws_xstrdup(o->maps[i].from), dws_xstrdup(o->maps[i].to)};
	m->cache = dws_xcalloc(m->o.max_steps, sizeof(*m->cache));
	pthread_mutex_init(&m->lock, NULL);
	pthread_mutex_init(&m->build_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&m->cond, &ca);
	pthread_cond_init(&m->compact_cond, &ca);
	pthread_condattr_destroy(&ca);

	dws_catalog *c = NULL;
	int rc = dws_bucket_open_opts(m->bucket_uri, o->bucket_opts, &m->bucket, err);
	if (!rc) {
		m->remote = dws_bucket_is_remote(m->bucket);
		if (!o->poll_ms && m->remote)
			m->o.poll_ms = 6000; /* see the README's quota arithmetic */
		/* a state checksum reads the whole model: remote, that is a full
		 * download per step, so it is opt-in there */
		if (!o->verify_set && m->remote)
			m->o.verify = DWS_VERIFY_PAYLOAD;
		rc = dws_catalog_load(m->bucket, NULL, &c, err);
	}
	if (!rc && dws_catalog_count(c) == 0)
		rc = dws_fail(err, DWS_ENOENT, "%s: the bucket holds no steps (anchors/ and deltas/ are empty)", m->bucket_uri);
	if (!rc) {
		dws_build_opts bo = {.base = m->base, .bucket_opts = o->bucket_opts, .maps = m->maps, .nmaps = o->nmaps, .tmpdir = m->tmpdir,
				     .verify = m->o.verify >= DWS_VERIFY_PAYLOAD};
		rc = dws_builder_new(c, &bo, &m->bl, err);
	}
	if (rc) {
		dws_catalog_free(c);
		dws_mount_close(m);
		return rc;
	}
	set_catalog_locked(m, c);
	dws_error first = {0};
	m->root = build_newest(m, 0, false, &first, true);
	m->root_since_ns = wall_ns();
	if (!m->root) {
		rc = dws_fail(err, first.code ? first.code : DWS_EFORMAT, "no step of %s can be served: %s", m->bucket_uri,
			      first.code ? first.msg : "none builds");
		dws_mount_close(m);
		return rc;
	}
	m->root_activity = now_ms() - m->o.swap_idle_ms;
	m->next_info = now_ms() + m->o.info_poll_ms;
	m->next_relist = now_ms() + m->o.relist_ms;
	if (m->remote) {
		dws_error pe = {0};
		m->has_probe = dws_bucket_probe(m->bucket, m->info_token, sizeof(m->info_token), &pe) != DWS_EUNSUP;
	}
	m->last_poll_wall = (int64_t)time(NULL);
	*out = m;
	return DWS_OK;
}

int dws_mount_start(dws_mount *m, dws_error *err)
{
	int e = pthread_create(&m->thread, NULL, sync_main, m);
	if (e)
		return dws_fail(err, DWS_EIO, "cannot start the sync thread: %s", strerror(e));
	m->started = true;
	m->compactor_started = pthread_create(&m->compactor, NULL, compact_main, m) == 0;
	pthread_mutex_lock(&m->lock);
	m->compact_wanted = true; /* the first step may carry a long chain */
	pthread_cond_signal(&m->compact_cond);
	pthread_mutex_unlock(&m->lock);
	return DWS_OK;
}

void dws_mount_close(dws_mount *m)
{
	if (!m)
		return;
	if (m->started) {
		atomic_store(&m->stopping, true);
		atomic_store(&m->mat_stop, true);
		pthread_mutex_lock(&m->lock);
		m->stop = true;
		pthread_cond_signal(&m->cond);
		pthread_cond_signal(&m->compact_cond);
		pthread_mutex_unlock(&m->lock);
		pthread_join(m->thread, NULL);
		if (m->compactor_started)
			pthread_join(m->compactor, NULL);
	}
	dws_step_unref(m->root);
	dws_step_unref(m->ready);
	for (size_t i = 0; i < m->ncache; i++)
		dws_step_unref(m->cache[i].step);
	free(m->cache);
	dws_builder_free(m->bl);
	dws_catalog_free(m->cat);
	dws_bucket_close(m->bucket);
	for (size_t i = 0; i < m->o.nmaps; i++) {
		free((char *)m->maps[i].from);
		free((char *)m->maps[i].to);
	}
	free(m->maps);
	free(m->table);
	free(m->failed);
	dws_objects_free(m->found, m->nfound);
	free(m->bucket_uri);
	free(m->base);
	close_fds(m->mat_fd, m->mat_n);
	free(m->mat_dir);
	free(m->tmpdir);
	free(m->on_swap);
	free(m->mountpoint);
	pthread_mutex_destroy(&m->lock);
	pthread_mutex_destroy(&m->build_lock);
	pthread_cond_destroy(&m->cond);
	pthread_cond_destroy(&m->compact_cond);
	free(m);
}
