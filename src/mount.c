/* The mount engine: what the FUSE layer serves, without FUSE. This file:
 * its life cycle, its steps by id (the root, the ready step, steps/N), the
 * views other threads get, patches and the status; mount_sync.c: the sync
 * thread.
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
#include "mount_int.h"
#include "compactor.h"
#include "failures.h"
#include "hook.h"
#include "log.h"
#include "materializer.h"
#include "patchcache.h"
#include "patchmem.h"
#include "patchfile.h"
#include "poller.h"
#include "status.h"
#include "step.h"
#include "stepcache.h"
#include "swap.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

void dws_mount_opts_init(dws_mount_opts *o)
{
	*o = (dws_mount_opts){
		.size = sizeof(*o),
		.poll_ms = -1,
		.info_poll_ms = 60000,
		.relist_ms = 600000,
		.swap_idle_ms = 1000,
		.swap_max_delay_ms = 30000,
		.max_steps = 8,
		.verify = DWS_VERIFY_AUTO,
		.on_swap_timeout_ms = 600000,
		.patch_ahead = -1,
		.format = DWS_FORMAT_AUTO,
		.patch_mem = -1,
	};
}

/* ---- the catalog's steps ---- */

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
	s = mount_build_verified(m, n, id, false, err);
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

/* step_id of a step that did not fail to build (a patch from it may be made
 * from the deltas after it alone), else 0. */
static uint64_t good_step_id(dws_mount *m, uint64_t n)
{
	uint64_t id = step_id(m, n);
	pthread_mutex_lock(&m->lock);
	if (id && dws_failures_get(m->failed, id))
		id = 0;
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

void dws_mount_step_opened(dws_mount *m, uint64_t id)
{
	pthread_mutex_lock(&m->lock);
	m->opened_id = id;
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

static bool mat_opened(void *ctx, uint64_t id)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	bool yes = m->opened_id == id;
	pthread_mutex_unlock(&m->lock);
	return yes;
}

static bool mat_busy(void *ctx)
{
	dws_mount *m = ctx;
	pthread_mutex_lock(&m->lock);
	dws_compactor *c = m->compactor;
	pthread_mutex_unlock(&m->lock);
	return !c || dws_compactor_busy(c); /* not started: its first merge is to come */
}

/* The patch from step `from` to `to` when both are in one chain: to bring a
 * materialized copy forward in place. */
static int mat_patch(void *ctx, uint64_t from, uint64_t to, dws_patchfile **out, dws_error *err)
{
	dws_mount *m = ctx;
	dws_step *t = NULL;
	uint64_t from_id = good_step_id(m, from);
	int rc = from_id ? dws_mount_get_step(m, to, &t, err)
			 : dws_fail(err, DWS_ENOENT, "%s: no good step %llu", m->bucket_uri, (unsigned long long)from);
	/* from the deltas between alone: building the copy's old step would
	 * hold a second patch set (the step cache kept it) */
	if (!rc)
		rc = dws_patchcache_get_chain(m->patches, m->bl, from, from_id, t, false, out, err);
	dws_step_unref(t);
	return rc;
}

void dws_mount_materialize(dws_mount *m, const char *dir, uint64_t max_bytes)
{
	pthread_mutex_lock(&m->lock);
	bool first = !m->mat && dir;
	pthread_mutex_unlock(&m->lock);
	if (!first)
		return;
	dws_materializer_ops ops = {mat_root, mat_busy, mat_patch, mat_opened, m};
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

void dws_mount_materialized_put(dws_mount *m, uint64_t id)
{
	if (m->mat)
		dws_materializer_put(m->mat, id);
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
	/* within one chain, from the deltas between alone: the old step is
	 * not built (nor kept in the step cache) */
	dws_step *f = NULL, *t = NULL;
	uint64_t from_id = good_step_id(m, from);
	int rc = dws_mount_get_step(m, to, &t, err);
	if (!rc)
		rc = from_id ? dws_patchcache_get_chain(m->patches, m->bl, from, from_id, t, true, out, err) : DWS_EUNSUP;
	if (rc == DWS_EUNSUP) {
		if (err)
			err->code = 0, err->msg[0] = 0;
		rc = dws_mount_get_step(m, from, &f, err);
		if (!rc)
			rc = dws_patchcache_get(m->patches, m->bl, f, t, false, true, out, err);
	}
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
	dws_pmem_counts pc;
	dws_pmem_get(&pc);
	st->patch_mem_cap = pc.cap;
	st->patch_bytes_memory = pc.memory;
	st->patch_bytes_disk = pc.disk;
	st->patch_spill_failures = pc.spill_failures;
}

static void status_io(dws_mount *m, dws_status *st)
{
	dws_bucket_stats bs;
	dws_bucket_stats_get(m->bucket, &bs);
	st->io = bs;
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

void dws_mount_status(dws_mount *m, dws_status *st)
{
	*st = (dws_status){0};
	pthread_mutex_lock(&m->lock);
	status_steps_locked(m, st);
	status_io(m, st);
	st->builds = m->builds;
	memcpy(st->build_failures, m->build_failures, sizeof(st->build_failures));
	st->poll_failures = m->poll_failures_total;
	uint64_t root_id = m->ready ? 0 : dws_step_id(m->root);
	pthread_mutex_unlock(&m->lock);
	st->merging = mat_busy(m);
	if (m->mat) {
		st->materializing = dws_materializer_pending(m->mat, root_id);
		st->has_materialized = dws_materializer_done(m->mat, &st->materialized_step, &st->materialized_bytes);
		dws_materializer_note(m->mat, st->materialize_note, sizeof(st->materialize_note),
				      &st->materialized_in_place, &st->materialized_whole);
	}
	if (m->hook) {
		st->has_hook = true;
		dws_hook_stats_get(m->hook, &st->hook);
	}
}

char *dws_mount_status_json(dws_mount *m, const dws_status_field *extra, size_t nextra)
{
	dws_status st;
	dws_mount_status(m, &st);
	char last_error[sizeof(m->last_error)];
	pthread_mutex_lock(&m->lock);
	snprintf(last_error, sizeof(last_error), "%s", m->last_error);
	pthread_mutex_unlock(&m->lock);
	st.last_error = last_error;
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
	dws_catalog_opts co;
	dws_catalog_opts_init(&co);
	co.format = m->o.format;
	int rc = dws_catalog_load(m->bucket, &co, &c, err);
	if (!rc && dws_catalog_count(c) == 0)
		rc = dws_fail(err, DWS_ENOENT, dws_catalog_format(c) == DWS_FORMAT_TRL
			      ? "%s: the bucket holds no steps (anchors/ and deltas/ are empty)"
			      : "%s: the folder holds no complete %s version yet", m->bucket_uri, dws_format_name(dws_catalog_format(c)));
	if (!rc) {
		dws_build_opts bo;
		dws_build_opts_init(&bo);
		bo.base = m->base;
		bo.bucket_opts = m->o.bucket_opts;
		bo.maps = m->maps;
		bo.nmaps = m->o.nmaps;
		bo.tmpdir = m->tmpdir;
		bo.verify = m->o.verify >= DWS_VERIFY_PAYLOAD;
		rc = dws_builder_new(c, &bo, &m->bl, err);
	}
	if (rc) {
		dws_catalog_free(c);
		return rc;
	}
	mount_set_catalog_locked(m, c);
	return DWS_OK;
}

int dws_mount_open_env(const dws_mount_opts *o, const dws_mount_env *env, dws_mount **out, dws_error *err)
{
	*out = NULL;
	if (dws_opts_size(o->size, sizeof(*o), "dws_mount_opts", err))
		return DWS_EINVAL;
	dws_mount *m = dws_xcalloc(1, sizeof(*m));
	copy_opts(m, o);
	dws_pmem_configure(o->patch_mem >= 0 ? (uint64_t)o->patch_mem : dws_pmem_default_cap(), o->tmpdir);
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
	if (!rc && !(m->root = mount_build_newest(m, 0, false, &first, true)))
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
	int e = pthread_create(&m->thread, NULL, mount_sync_main, m);
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
