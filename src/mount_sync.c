/* The mount engine's sync thread: poll the bucket, build and verify the
 * newest step, swap it in when the swap policy says (see mount.c for the
 * whole and its locks). */
#include "mount_int.h"
#include "log.h"
#include "patchfile.h"
#include "step.h"
#include "swap.h"

#include <stdlib.h>
#include <string.h>

/* ---- the catalog's steps ---- */

/* The table of steps and ids of catalog c (under lock). */
void mount_set_catalog_locked(dws_mount *m, dws_catalog *c)
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
	pthread_mutex_lock(&m->lock);
	dws_step *root = dws_step_ref(m->root);
	pthread_mutex_unlock(&m->lock);
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
dws_step *mount_build_verified(dws_mount *m, uint64_t n, uint64_t id, bool quiet, dws_error *err)
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
	int64_t built = now_ms(m) - t0;
	if (rc) {
		if (!err->code)
			dws_fail(err, rc, "step %llu: %s", (unsigned long long)n, dws_code_name(rc));
		again = dws_failures_note(m->failed, id, err, now_ms(m));
		m->build_failures[dws_code_transient(err->code) ? 0 : 1]++;
		snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	} else {
		dws_failures_forget(m->failed, id);
		dws_histogram_observe(&m->builds, (double)built / 1000);
	}
	pthread_mutex_unlock(&m->lock);
	if (!rc) {
		int64_t pms = patch_ahead(m, s);
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
dws_step *mount_build_newest(dws_mount *m, uint64_t after, bool have_root, dws_error *last, bool quiet)
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
		got = mount_build_verified(m, t[i].step, t[i].id, quiet, &err);
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

/* ---- polling ---- */

static void poll_failed(dws_mount *m, const dws_error *err)
{
	dws_log_warn("poll failed: %s", err->msg);
	pthread_mutex_lock(&m->lock);
	snprintf(m->last_error, sizeof(m->last_error), "%s", err->msg);
	m->last_poll_wall = m->clock.wall_ns(m->clock.ctx) / 1000000000;
	m->poll_failures_total++;
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
	mount_set_catalog_locked(m, c);
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
	dws_catalog_opts co;
	dws_catalog_opts_init(&co);
	co.prev = m->cat;
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
	dws_step *s = mount_build_newest(m, root_step, true, NULL, false);
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

/* Under lock: whether a step newer than `step` failed (and is still in the
 * bucket as it failed): its error stays in last_error while the root is
 * behind it. */
static bool newer_failed_locked(const dws_mount *m, uint64_t step)
{
	for (size_t i = 0; i < m->ntable; i++)
		if (m->table[i].step > step && dws_failures_get(m->failed, m->table[i].id))
			return true;
	return false;
}

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
	if (!newer_failed_locked(m, dws_step_number(m->root)))
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

void *mount_sync_main(void *arg)
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

