/* The mount engine: what the FUSE layer serves, without FUSE.
 *
 * A sync thread polls the bucket, builds the newest step that builds and
 * verifies, holds it as `ready`, and swaps it in as the root when the swap
 * policy says (swap.c). Steps are immutable values: a swap is one pointer
 * store, open handles keep the step they opened. A step that fails is never
 * served; the root stays where it is and the error shows in the status.
 * Around it, each on its own thread: the compactor (merges patch runs), the
 * materializer (writes the root whole for passthrough) and the on_swap hook.
 *
 * Locks: build_lock serializes the builder (slow); lock guards the rest and
 * is never held while building or reading bytes. Order: build_lock, then
 * lock; the modules' own locks are taken holding neither, or only lock. */
#include "engine.h"
#include "compactor.h"
#include "failures.h"
#include "hook.h"
#include "log.h"
#include "materializer.h"
#include "patchcache.h"
#include "patchfile.h"
#include "poller.h"
#include "status.h"
#include "step.h"
#include "stepcache.h"
#include "swap.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum { POLL_BACKOFF_CAP_MS = 60000, ROOT_HISTORY = 8, PATCHES_KEPT = 4 };

struct step_entry {
	uint64_t step, id;
};

struct dws_mount {
	dws_mount_opts o;
	char *bucket_uri, *base, *tmpdir, *on_swap, *mountpoint;
	dws_prefix_map *maps;
	dws_clock clock;
	dws_bucket *bucket;
	bool remote;

	pthread_mutex_t build_lock;
	dws_builder *bl;

	pthread_mutex_t lock;
	pthread_cond_t cond;      /* wakes the sync thread */
	dws_catalog *cat;
	struct step_entry *table; /* the catalog's steps and their ids */
	size_t ntable;
	dws_failures *failed;
	dws_step *root, *ready;
	int64_t ready_since;      /* the root has been behind since */
	int64_t last_build_ms;    /* build + verify of the newest step built */
	int64_t root_since_ns;    /* wall time when the root took its step */
	int root_open;
	int64_t root_activity;
	char last_error[768];
	int64_t last_poll_wall;
	uint64_t swaps, view_hits, view_misses;
	bool stop;

	/* the sync thread's own */
	int64_t next_poll;
	unsigned poll_failures;   /* in a row: the next poll waits longer */
	dws_poller *poller;       /* remote buckets */

	dws_stepcache *views;     /* steps/N */
	uint64_t history[ROOT_HISTORY]; /* the root's last steps, newest last */
	size_t nhistory;
	dws_patchcache *patches;
	dws_compactor *compactor;
	dws_materializer *mat;    /* once dws_mount_materialize */
	dws_hook *hook;
	pthread_t thread;
	bool started;
};

static int64_t now_ms(const dws_mount *m) { return m->clock.mono_ms(m->clock.ctx); }

void dws_mount_opts_init(dws_mount_opts *o)
{
	*o = (dws_mount_opts){
		.poll_ms = -1,
		.info_poll_ms = 60000,
		.relist_ms = 600000,
		.swap_idle_ms = 1000,
		.swap_max_delay_ms = 30000,
		.max_steps = 8,
		.verify = DWS_VERIFY_AUTO,
		.on_swap_timeout_ms = 600000,
		.patch_ahead = -1,
	};
}

/* ---- the catalog's steps ---- */

static void set_catalog_locked(dws_mount *m, dws_catalog *c)
{
	size_t n = dws_catalog_count(c);
	struct step_entry *t = dws_xcalloc(n ? n : 1, sizeof(*t));
	uint64_t *ids = dws_xcalloc(n ? n : 1, sizeof(*ids));
	for (size_t i = 0; i < n; i++) {
		t[i].step = dws_catalog_at(c, i)->step;
		ids[i] = t[i].id = dws_catalog_step_id(c, t[i].step);
	}
	free(m->table);
	m->table = t;
	m->ntable = n;
	m->cat = c;
	dws_failures_keep(m->failed, ids, n); /* gone from the bucket for good */
	free(ids);
}

static bool step_of_id_locked(const dws_mount *m, uint64_t id, uint64_t *step)
{
	for (size_t i = 0; i < m->ntable; i++)
		if (m->table[i].id == id) {
			*step = m->table[i].step;
			return true;
		}
	return false;
}

size_t dws_mount_steps(dws_mount *m, uint64_t **out)
{
	pthread_mutex_lock(&m->lock);
	uint64_t *v = dws_xcalloc(m->ntable ? m->ntable : 1, sizeof(*v));
	size_t n = 0;
	for (size_t i = 0; i < m->ntable; i++)
		if (!dws_failures_bad(m->failed, m->table[i].id)) /* a bad step is not listed */
			v[n++] = m->table[i].step;
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

/* ---- building and verifying ---- */

static int verify_state(dws_mount *m, dws_step *s, dws_error *err)
{
	if (m->o.verify < DWS_VERIFY_STATE)
		return DWS_OK;
	char want[17];
	dws_mount_step_checksum(m, dws_step_number(s), want);
	return dws_step_check_state(s, want, m->bucket_uri, err);
}

/* The patch from the root to s, made before s is ready when patches are
 * wanted, so a server reads it the moment s is: within a chain only (across
 * an anchor it compares whole tensors: left to a reader who asks). Its ms,
 * or -1 when none was made. */
static int64_t patch_ahead(dws_mount *m, dws_step *s)
{
	if (!m->o.patch_ahead || (m->o.patch_ahead < 0 && !dws_patchcache_read_any(m->patches)))
		return -1;
	dws_step *root = dws_mount_root(m);
	int64_t ms = -1;
	if (root && dws_step_number(root) < dws_step_number(s)) {
		int64_t t0 = now_ms(m);
		dws_patchfile *p = NULL;
		dws_error err = {0};
		int rc = dws_patchcache_get(m->patches, m->bl, root, s, true, false, &p, &err);
		if (rc && rc != DWS_EUNSUP)
			dws_log_warn("patch %llu-%llu not made ahead: %s", (unsigned long long)dws_step_number(root),
				     (unsigned long long)dws_step_number(s), err.msg);
		ms = rc ? -1 : now_ms(m) - t0;
		dws_patchfile_unref(p);
	}
	dws_step_unref(root);
	return ms;
}

/* Build step n and verify it; a failure is remembered against its id and
 * logged (not at start-up: quiet, the caller reports it). NULL on failure. */
static dws_step *build_verified(dws_mount *m, uint64_t n, uint64_t id, bool quiet, dws_error *err)
{
	int64_t t0 = now_ms(m);
	dws_step *s = NULL;
	pthread_mutex_lock(&m->build_lock);
	int rc = dws_builder_build(m->bl, n, &s, err);
	pthread_mutex_unlock(&m->build_lock);
	if (!rc)
		rc = verify_state(m, s, err);
	pthread_mutex_lock(&m->lock);
	int64_t again = 0;
	if (rc) {
		if (!err->code)
			dws_fail(err, rc, "step %llu: %s", (unsigned long long)n, dws_code_name(rc));
		again = dws_failures_note(m->failed, id, err, now_ms(m));
		snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	} else {
		dws_failures_forget(m->failed, id);
	}
	pthread_mutex_unlock(&m->lock);
	if (!rc) {
		int64_t built = now_ms(m) - t0, pms = patch_ahead(m, s);
		char ahead[64] = "";
		if (pms >= 0)
			snprintf(ahead, sizeof(ahead), ", patch from the root made in %lld ms", (long long)pms);
		dws_log_info("step %llu ready: anchor %llu, %zu files since, %llu patched elements, built in %lld ms%s",
			     (unsigned long long)n, (unsigned long long)dws_step_anchor(s), dws_step_chain_length(s),
			     (unsigned long long)dws_step_patch_entries(s), (long long)built, ahead);
		return s;
	}
	dws_step_unref(s);
	if (quiet)
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
 * whose next try is still to come, are skipped. NULL if none. */
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
		bool skip = dws_failures_hold(m->failed, t[i].id, now_ms(m));
		pthread_mutex_unlock(&m->lock);
		if (skip)
			continue;
		pthread_mutex_lock(&m->lock);
		dws_materializer *mt = m->mat;
		pthread_mutex_unlock(&m->lock);
		if (mt) /* the build never shares the machine with a write */
			dws_materializer_cancel(mt);
		dws_error err = {0};
		int64_t t0 = now_ms(m);
		got = build_verified(m, t[i].step, t[i].id, quiet, &err);
		if (!got) {
			if (last && !last->code)
				*last = err;
			continue;
		}
		pthread_mutex_lock(&m->lock);
		m->last_build_ms = now_ms(m) - t0;
		pthread_mutex_unlock(&m->lock);
		if (m->compactor)
			dws_compactor_kick(m->compactor);
	}
	free(t);
	return got;
}

/* ---- steps by id: the root, the ready step, steps/N ---- */

static dws_step *held_locked(dws_mount *m, uint64_t id)
{
	if (m->root && dws_step_id(m->root) == id)
		return dws_step_ref(m->root);
	if (m->ready && dws_step_id(m->ready) == id)
		return dws_step_ref(m->ready);
	return NULL;
}

int dws_mount_get_step_by_id(dws_mount *m, uint64_t id, dws_step **out, dws_error *err)
{
	pthread_mutex_lock(&m->lock);
	dws_step *s = held_locked(m, id);
	if (!s)
		s = dws_stepcache_get(m->views, id);
	if (!s && m->hook) /* steps/N of a hook's step stays that step */
		s = dws_hook_step(m->hook, id);
	uint64_t n = 0;
	bool known = !s && step_of_id_locked(m, id, &n);
	*(s ? &m->view_hits : &m->view_misses) += 1;
	/* a step that failed is served nowhere: not rebuilt until it may pass */
	const dws_error *f = dws_failures_get(m->failed, id);
	int frc = !s && f && dws_failures_hold(m->failed, id, now_ms(m)) ? dws_fail(err, f->code, "%s", f->msg) : DWS_OK;
	pthread_mutex_unlock(&m->lock);
	if (s || frc) {
		*out = s;
		return frc;
	}
	if (!known)
		return dws_fail(err, DWS_ENOENT, "%s: that step is no longer in the bucket", m->bucket_uri);
	s = build_verified(m, n, id, false, err);
	if (!s)
		return dws_code_of(err, DWS_EIO);
	if (dws_step_id(s) != id) { /* the catalog moved on while we built */
		dws_step_unref(s);
		return dws_fail(err, DWS_ENOENT, "%s: step %llu changed in the bucket", m->bucket_uri, (unsigned long long)n);
	}
	dws_stepcache_put(m->views, s);
	*out = s;
	return DWS_OK;
}

/* The content id of step n of the catalog, 0 if none. */
static uint64_t step_id(dws_mount *m, uint64_t n)
{
	uint64_t id = 0;
	pthread_mutex_lock(&m->lock);
	for (size_t i = 0; i < m->ntable; i++)
		if (m->table[i].step == n)
			id = m->table[i].id;
	pthread_mutex_unlock(&m->lock);
	return id;
}

int dws_mount_get_step(dws_mount *m, uint64_t step, dws_step **out, dws_error *err)
{
	uint64_t id = step_id(m, step);
	if (!id)
		return dws_fail(err, DWS_ENOENT, "%s: no step %llu", m->bucket_uri, (unsigned long long)step);
	return dws_mount_get_step_by_id(m, id, out, err);
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
	m->root_activity = now_ms(m);
	pthread_mutex_unlock(&m->lock);
	return s;
}

void dws_mount_root_opened(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->root_open++;
	m->root_activity = now_ms(m);
	pthread_mutex_unlock(&m->lock);
}

void dws_mount_root_released(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->root_open--;
	m->root_activity = now_ms(m);
	pthread_cond_signal(&m->cond);
	pthread_mutex_unlock(&m->lock);
}

/* ---- the compactor's and the materializer's view of the engine ---- */

static dws_step *compact_target(void *ctx)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	dws_step *s = dws_step_ref(m->ready ? m->ready : m->root); /* served next, else served */
	pthread_mutex_unlock(&m->lock);
	return s;
}

/* The merged runs into the planned step and into the builder's newest, which
 * may share them: the same handles, new tables. */
static void compact_apply(void *ctx, dws_compaction *c)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->build_lock);
	dws_compaction_apply(c, dws_builder_newest(m->bl));
	pthread_mutex_unlock(&m->build_lock);
}

static void compact_idle(void *ctx)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	dws_materializer *mt = m->mat;
	pthread_mutex_unlock(&m->lock);
	if (mt)
		dws_materializer_kick(mt);
}

static dws_step *mat_root(void *ctx)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	dws_step *s = m->ready || m->stop ? NULL : dws_step_ref(m->root);
	pthread_mutex_unlock(&m->lock);
	return s;
}

static bool mat_busy(void *ctx)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	dws_compactor *c = m->compactor;
	pthread_mutex_unlock(&m->lock);
	return !c || dws_compactor_busy(c); /* not started: its first merge is to come */
}

void dws_mount_materialize(dws_mount *m, const char *dir, uint64_t max_bytes)
{
	pthread_mutex_lock(&m->lock);
	bool first = !m->mat && dir;
	pthread_mutex_unlock(&m->lock);
	if (!first)
		return;
	dws_materializer_ops ops = {mat_root, mat_busy, m};
	dws_materializer *mt = NULL;
	dws_error err = {0};
	if (dws_materializer_start(dir, max_bytes, &ops, &mt, &err)) {
		dws_log_warn("passthrough off: %s", err.msg);
		return;
	}
	pthread_mutex_lock(&m->lock);
	if (m->mat) { /* a second call won the race */
		pthread_mutex_unlock(&m->lock);
		dws_materializer_stop(mt);
		return;
	}
	m->mat = mt;
	pthread_mutex_unlock(&m->lock);
}

int dws_mount_materialized_fd(dws_mount *m, uint64_t id, size_t file)
{
	return m->mat ? dws_materializer_fd(m->mat, id, file) : -1;
}

bool dws_mount_is_materialized(dws_mount *m, uint64_t id)
{
	return m->mat && dws_materializer_has(m->mat, id);
}

/* ---- catch-up patches (patchfile.h) ---- */

int dws_mount_patch(dws_mount *m, uint64_t from, uint64_t to, dws_patchfile **out, dws_error *err)
{
	*out = NULL;
	if (from >= to)
		return dws_fail(err, DWS_EINVAL, "patch from step %llu to step %llu: the first must come before the second",
				(unsigned long long)from, (unsigned long long)to);
	/* a kept one needs neither step built (the old root is often gone) */
	*out = dws_patchcache_find(m->patches, step_id(m, from), step_id(m, to), true);
	if (*out)
		return DWS_OK;
	dws_step *f = NULL, *t = NULL;
	int rc = dws_mount_get_step(m, from, &f, err);
	if (!rc)
		rc = dws_mount_get_step(m, to, &t, err);
	if (!rc)
		rc = dws_patchcache_get(m->patches, m->bl, f, t, false, true, out, err);
	dws_step_unref(f);
	dws_step_unref(t);
	return rc;
}

size_t dws_mount_patch_list(dws_mount *m, uint64_t *from, size_t max, uint64_t *to)
{
	pthread_mutex_lock(&m->lock);
	*to = dws_step_number(m->root);
	size_t n = 0;
	for (size_t i = m->nhistory; i-- > 0 && n < max;) {
		bool seen = false;
		for (size_t k = 0; k < n && !seen; k++)
			seen = from[k] == m->history[i];
		if (!seen && m->history[i] < *to)
			from[n++] = m->history[i];
	}
	pthread_mutex_unlock(&m->lock);
	return n;
}

/* ---- polling ---- */

static void poll_failed(dws_mount *m, const dws_error *err)
{
	dws_log_warn("poll failed: %s", err->msg);
	pthread_mutex_lock(&m->lock);
	snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	m->last_poll_wall = m->clock.wall_ns(m->clock.ctx) / 1000000000;
	pthread_mutex_unlock(&m->lock);
	m->poll_failures++;
}

static void poll_ok(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->last_poll_wall = m->clock.wall_ns(m->clock.ctx) / 1000000000;
	pthread_mutex_unlock(&m->lock);
	if (m->poll_failures)
		dws_log_info("poll recovered after %u failures", m->poll_failures);
	m->poll_failures = 0;
}

/* After n failed polls in a row the next waits poll * 2^n, at most 60 s
 * (or the poll interval, if longer). */
static int64_t poll_delay(const dws_mount *m)
{
	int64_t cap = m->o.poll_ms > POLL_BACKOFF_CAP_MS ? m->o.poll_ms : POLL_BACKOFF_CAP_MS, d = m->o.poll_ms;
	for (unsigned i = 0; i < m->poll_failures && d < cap; i++)
		d *= 2;
	return d < cap ? d : cap;
}

/* A remote bucket: whether the catalog is to be loaded again, and how (co):
 * when the probe or the HEADs found something, or a step that failed for a
 * passing reason is due for another try (with the listing it had, its
 * headers read again where they failed). */
static bool remote_wants_catalog(dws_mount *m, dws_catalog_opts *co, bool *relist)
{
	dws_error err = {0};
	bool changed = dws_poller_poll(m->poller, m->cat, now_ms(m), relist, &err);
	if (err.code) {
		poll_failed(m, &err);
		if (!changed)
			return false;
	}
	if (!*relist && !changed && !co->reread_failed) {
		if (!err.code)
			poll_ok(m);
		return false;
	}
	co->reuse_listing = !*relist;
	co->extra = dws_poller_found(m->poller, &co->nextra);
	return true;
}

/* The new catalog in place; a ready step the bucket no longer holds as it
 * was is dropped (never served). Returns the root's step. */
static uint64_t switch_catalog(dws_mount *m, dws_catalog *c)
{
	pthread_mutex_lock(&m->build_lock);
	pthread_mutex_lock(&m->lock);
	dws_catalog *old = m->cat;
	set_catalog_locked(m, c);
	dws_builder_set_catalog(m->bl, c);
	uint64_t root_step = dws_step_number(m->root);
	dws_step *gone = NULL;
	if (m->ready && dws_catalog_step_id(c, dws_step_number(m->ready)) != dws_step_id(m->ready)) {
		gone = m->ready;
		m->ready = NULL;
	}
	pthread_mutex_unlock(&m->lock);
	pthread_mutex_unlock(&m->build_lock);
	dws_catalog_free(old);
	dws_step_unref(gone);
	return root_step;
}

static void poll_once(dws_mount *m)
{
	dws_catalog_opts co = {.prev = m->cat};
	pthread_mutex_lock(&m->lock);
	co.reread_failed = dws_failures_due(m->failed, now_ms(m));
	pthread_mutex_unlock(&m->lock);
	bool relist = true;
	if (m->poller && !remote_wants_catalog(m, &co, &relist))
		return;
	dws_catalog *c = NULL;
	dws_error err = {0};
	int rc = dws_catalog_load(m->bucket, &co, &c, &err);
	if (rc) {
		poll_failed(m, &err);
		return;
	}
	if (m->poller && relist)
		dws_poller_listed(m->poller, now_ms(m)); /* the listing has them now */
	poll_ok(m);
	uint64_t root_step = switch_catalog(m, c);
	dws_step *s = build_newest(m, root_step, true, NULL, false);
	if (!s)
		return;
	pthread_mutex_lock(&m->lock);
	/* a newer ready step replaces an older one that never got served; the
	 * root has been behind since the first of them became ready, and
	 * swap_max_delay counts from then whatever arrives meanwhile */
	dws_step *drop = m->ready;
	if (!drop)
		m->ready_since = now_ms(m);
	m->ready = s;
	pthread_mutex_unlock(&m->lock);
	dws_step_unref(drop);
}

/* ---- swapping ---- */

/* Under lock, which it releases: the ready step becomes the root. */
static void swap_unlock(dws_mount *m, dws_swap_verdict v)
{
	dws_step *old = m->root;
	m->root = m->ready;
	m->ready = NULL;
	m->swaps++;
	if (m->nhistory == ROOT_HISTORY)
		memmove(m->history, m->history + 1, (ROOT_HISTORY - 1) * sizeof(*m->history));
	m->history[m->nhistory < ROOT_HISTORY ? m->nhistory++ : ROOT_HISTORY - 1] = dws_step_number(old);
	m->root_since_ns = m->clock.wall_ns(m->clock.ctx);
	m->last_error[0] = 0;
	dws_step *now_root = dws_step_ref(m->root);
	dws_materializer *mt = m->mat;
	pthread_mutex_unlock(&m->lock);
	if (mt) { /* the old root's write is not wanted; the new one's is */
		dws_materializer_cancel(mt);
		dws_materializer_kick(mt);
	}
	dws_log_info("root now serves step %llu (was %llu)%s", (unsigned long long)dws_step_number(now_root),
		     (unsigned long long)dws_step_number(old),
		     v == DWS_SWAP_FORCED ? " after swap_max_delay, with the root in use" : "");
	if (m->o.swapped)
		m->o.swapped(m->o.ctx, old, now_root);
	if (m->hook)
		dws_hook_fire(m->hook, now_root);
	dws_step_unref(old);
	dws_step_unref(now_root);
}

int64_t dws_mount_sync_once(dws_mount *m)
{
	if (now_ms(m) >= m->next_poll) {
		poll_once(m);
		m->next_poll = now_ms(m) + poll_delay(m);
	}
	dws_swap_policy p = {m->o.swap_idle_ms, m->o.swap_max_delay_ms, m->o.swap_max_delay_ms < 0};
	pthread_mutex_lock(&m->lock);
	dws_swap_state st = {m->ready != NULL, m->ready_since, m->root_open, m->root_activity};
	int64_t wake;
	dws_swap_verdict v = dws_swap_decide(&p, &st, now_ms(m), &wake);
	if (v != DWS_SWAP_WAIT) {
		swap_unlock(m, v);
		return now_ms(m); /* look again at once */
	}
	pthread_mutex_unlock(&m->lock);
	return wake < m->next_poll ? wake : m->next_poll;
}

static void *sync_main(void *arg)
{
	dws_mount *m = arg;
	pthread_mutex_lock(&m->lock);
	while (!m->stop) {
		pthread_mutex_unlock(&m->lock);
		int64_t wake = dws_mount_sync_once(m);
		pthread_mutex_lock(&m->lock);
		int64_t ms = wake - now_ms(m);
		if (ms > 0 && !m->stop) {
			struct timespec ts = dws_deadline_in(ms);
			pthread_cond_timedwait(&m->cond, &m->lock, &ts);
		}
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* ---- status ---- */

static void status_steps_locked(dws_mount *m, dws_status *st)
{
	st->step = dws_step_number(m->root);
	st->anchor = dws_step_anchor(m->root);
	st->chain_length = dws_step_chain_length(m->root);
	st->bucket = m->bucket_uri;
	st->last_poll_wall = m->last_poll_wall;
	st->latest_step = m->ntable ? m->table[m->ntable - 1].step : 0;
	for (size_t i = 0; i < m->ntable; i++)
		st->lag_steps += m->table[i].step > st->step;
	st->steps = m->ntable;
	st->has_pending = m->ready != NULL;
	st->pending_step = m->ready ? dws_step_number(m->ready) : 0;
	st->swaps = m->swaps;
	st->root_since_ns = m->root_since_ns;
	st->last_build_ms = m->last_build_ms;
	st->root_open_handles = m->root_open;
	st->patched_elements = dws_step_patch_entries(m->root);
	st->whole_tensors = dws_step_whole_tensors(m->root, &st->whole_tensor_bytes);
	st->patch_bytes = dws_patch_memory();
}

static void status_io(dws_mount *m, dws_status *st)
{
	dws_bucket_stats bs;
	dws_bucket_stats_get(m->bucket, &bs);
	st->remote = m->remote;
	st->bytes_fetched = bs.bytes_fetched;
	if (!m->remote) {
		st->cache_hits = m->view_hits;
		st->cache_misses = m->view_misses;
		return;
	}
	memcpy(st->requests, bs.requests, sizeof(st->requests));
	st->cache = bs.cache;
	st->cache_hits = st->cache.hits;
	st->cache_misses = st->cache.misses;
}

char *dws_mount_status_json(dws_mount *m, const dws_status_field *extra, size_t nextra)
{
	dws_status st = {0};
	pthread_mutex_lock(&m->lock);
	status_steps_locked(m, &st);
	status_io(m, &st);
	uint64_t root_id = m->ready ? 0 : dws_step_id(m->root);
	char last_error[sizeof(m->last_error)];
	snprintf(last_error, sizeof(last_error), "%s", m->last_error);
	st.last_error = last_error;
	pthread_mutex_unlock(&m->lock);
	st.merging = mat_busy(m);
	if (m->mat) {
		st.materializing = dws_materializer_pending(m->mat, root_id);
		st.has_materialized = dws_materializer_done(m->mat, &st.materialized_step, &st.materialized_bytes);
	}
	if (m->hook) {
		st.has_hook = true;
		dws_hook_stats_get(m->hook, &st.hook);
	}
	return dws_status_json(&st, extra, nextra);
}

/* ---- life cycle ---- */

static void copy_opts(dws_mount *m, const dws_mount_opts *o)
{
	m->o = *o;
	m->bucket_uri = dws_xstrdup(o->bucket);
	m->base = o->base ? dws_xstrdup(o->base) : NULL;
	m->tmpdir = o->tmpdir ? dws_xstrdup(o->tmpdir) : NULL;
	m->on_swap = o->on_swap ? dws_xstrdup(o->on_swap) : NULL;
	m->mountpoint = o->mountpoint ? dws_xstrdup(o->mountpoint) : NULL;
	m->maps = dws_xcalloc(o->nmaps ? o->nmaps : 1, sizeof(*m->maps));
	for (size_t i = 0; i < o->nmaps; i++)
		m->maps[i] = (dws_prefix_map){dws_xstrdup(o->maps[i].from), dws_xstrdup(o->maps[i].to)};
	m->o.maps = m->maps;
}

/* The bucket's defaults for what was left to them. */
static void settle_opts(dws_mount *m)
{
	if (m->o.poll_ms < 0)
		m->o.poll_ms = m->remote ? 6000 : 1000; /* see docs/remote.md's quota arithmetic */
	if (m->o.verify == DWS_VERIFY_AUTO)
		m->o.verify = m->remote ? DWS_VERIFY_PAYLOAD : DWS_VERIFY_STATE;
	if (m->o.max_steps == 0)
		m->o.max_steps = 1;
}

static int open_catalog(dws_mount *m, dws_error *err)
{
	dws_catalog *c = NULL;
	int rc = dws_catalog_load(m->bucket, NULL, &c, err);
	if (!rc && dws_catalog_count(c) == 0)
		rc = dws_fail(err, DWS_ENOENT, "%s: the bucket holds no steps (anchors/ and deltas/ are empty)", m->bucket_uri);
	if (!rc) {
		dws_build_opts bo = {.base = m->base, .bucket_opts = m->o.bucket_opts, .maps = m->maps, .nmaps = m->o.nmaps,
				     .tmpdir = m->tmpdir, .verify = m->o.verify >= DWS_VERIFY_PAYLOAD};
		rc = dws_builder_new(c, &bo, &m->bl, err);
	}
	if (rc) {
		dws_catalog_free(c);
		return rc;
	}
	set_catalog_locked(m, c);
	return DWS_OK;
}

int dws_mount_open_env(const dws_mount_opts *o, const dws_mount_env *env, dws_mount **out, dws_error *err)
{
	dws_mount *m = dws_xcalloc(1, sizeof(*m));
	copy_opts(m, o);
	m->clock = env && env->clock ? *env->clock : dws_real_clock;
	m->failed = dws_failures_new();
	pthread_mutex_init(&m->lock, NULL);
	pthread_mutex_init(&m->build_lock, NULL);
	m->patches = dws_patchcache_new(PATCHES_KEPT, m->tmpdir, &m->build_lock);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&m->cond, &ca);
	pthread_condattr_destroy(&ca);
	int rc = DWS_OK;
	if (env && env->bucket)
		m->bucket = env->bucket;
	else
		rc = dws_bucket_open_opts(m->bucket_uri, o->bucket_opts, &m->bucket, err);
	if (!rc) {
		m->remote = dws_bucket_is_remote(m->bucket);
		settle_opts(m);
		m->views = dws_stepcache_new(m->o.max_steps);
		rc = open_catalog(m, err);
	}
	dws_error first = {0};
	if (!rc && !(m->root = build_newest(m, 0, false, &first, true)))
		rc = dws_fail(err, first.code ? first.code : DWS_EFORMAT, "no step of %s can be served: %s", m->bucket_uri,
			      first.code ? first.msg : "none builds");
	if (rc) {
		dws_mount_close(m);
		return rc;
	}
	m->root_since_ns = m->clock.wall_ns(m->clock.ctx);
	m->root_activity = now_ms(m) - m->o.swap_idle_ms;
	m->next_poll = now_ms(m) + m->o.poll_ms;
	if (m->remote)
		m->poller = dws_poller_new(m->bucket, (unsigned)m->o.info_poll_ms, (unsigned)m->o.relist_ms, now_ms(m));
	m->last_poll_wall = m->clock.wall_ns(m->clock.ctx) / 1000000000;
	*out = m;
	return DWS_OK;
}

int dws_mount_open(const dws_mount_opts *o, dws_mount **out, dws_error *err)
{
	return dws_mount_open_env(o, NULL, out, err);
}

int dws_mount_start(dws_mount *m, dws_error *err)
{
	dws_compactor_ops cops = {compact_target, compact_apply, compact_idle, m};
	dws_compactor *c = NULL;
	int rc = dws_compactor_start(&cops, &c, err);
	pthread_mutex_lock(&m->lock);
	m->compactor = c;
	pthread_mutex_unlock(&m->lock);
	if (!rc && m->on_swap) {
		dws_hook_opts ho = {m->on_swap, m->mountpoint, (unsigned)m->o.on_swap_timeout_ms, m->o.on_swap_keep_secrets,
				    dws_step_number(m->root)};
		rc = dws_hook_start(&ho, &m->hook, err);
	}
	if (rc)
		return rc;
	int e = pthread_create(&m->thread, NULL, sync_main, m);
	if (e)
		return dws_fail(err, DWS_EIO, "cannot start the sync thread: %s", strerror(e));
	m->started = true;
	return DWS_OK;
}

static void stop_threads(dws_mount *m)
{
	pthread_mutex_lock(&m->lock);
	m->stop = true;
	pthread_cond_signal(&m->cond);
	dws_materializer *mt = m->mat;
	pthread_mutex_unlock(&m->lock);
	if (m->started)
		pthread_join(m->thread, NULL);
	dws_hook_stop(m->hook);
	dws_materializer_stop(mt);
	dws_compactor_stop(m->compactor);
}

void dws_mount_close(dws_mount *m)
{
	if (!m)
		return;
	stop_threads(m);
	dws_step_unref(m->root);
	dws_step_unref(m->ready);
	dws_stepcache_free(m->views);
	dws_poller_free(m->poller);
	dws_builder_free(m->bl);
	dws_catalog_free(m->cat);
	dws_bucket_close(m->bucket);
	dws_failures_free(m->failed);
	for (size_t i = 0; i < m->o.nmaps; i++) {
		free((char *)m->maps[i].from);
		free((char *)m->maps[i].to);
	}
	free(m->maps);
	free(m->table);
	free(m->bucket_uri);
	free(m->base);
	free(m->tmpdir);
	free(m->on_swap);
	free(m->mountpoint);
	dws_patchcache_free(m->patches);
	pthread_mutex_destroy(&m->lock);
	pthread_mutex_destroy(&m->build_lock);
	pthread_cond_destroy(&m->cond);
	free(m);
}
