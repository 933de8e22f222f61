/* The mount engine's own shared state (mount.c, mount_sync.c): private to
 * those two files. */
#ifndef DWSFS_MOUNT_INT_H
#define DWSFS_MOUNT_INT_H

#include "engine.h"
#include "compactor.h"
#include "failures.h"
#include "histogram.h"
#include "hook.h"
#include "materializer.h"
#include "patchcache.h"
#include "poller.h"
#include "stepcache.h"

#include <pthread.h>

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
	uint64_t opened_id;       /* the step a file was last opened of (any view) */
	int64_t root_activity;
	char last_error[768];
	int64_t last_poll_wall;
	uint64_t swaps, view_hits, view_misses;
	dws_histogram builds;     /* each step built: build + verify */
	uint64_t build_failures[2]; /* may pass (dws_code_transient), for good */
	uint64_t poll_failures_total;
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

static inline int64_t now_ms(const dws_mount *m) { return m->clock.mono_ms(m->clock.ctx); }


/* mount_sync.c: build and verify the newest step newer than `after` (with
 * have_root) and the ready one; NULL if none (last: the first failure). */
dws_step *mount_build_newest(dws_mount *m, uint64_t after, bool have_root, dws_error *last, bool quiet);
/* Build step n (content id `id`) and verify it; a failure is remembered
 * against the id and logged (unless quiet). NULL on failure. */
dws_step *mount_build_verified(dws_mount *m, uint64_t n, uint64_t id, bool quiet, dws_error *err);
/* The sync thread. */
void *mount_sync_main(void *arg);

/* mount.c: the catalog c as the table of steps (under lock). */
void mount_set_catalog_locked(dws_mount *m, dws_catalog *c);

#endif
