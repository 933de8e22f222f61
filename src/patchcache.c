/* Kept catch-up patches (see patchcache.h). */
#include "patchcache.h"
#include "clock.h"
#include "log.h"
#include "patchfile.h"
#include "step.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct kept {
	uint64_t from_id, to_id; /* the steps' content ids */
	dws_patchfile *p;
};

struct dws_patchcache {
	pthread_mutex_t make_lock; /* one made at a time: the same one once */
	pthread_mutex_t lock;      /* kept[] */
	pthread_mutex_t *build_lock;
	char *tmpdir;
	struct kept *kept;         /* newest last */
	size_t n, keep;
	atomic_bool read_any;
};

dws_patchcache *dws_patchcache_new(size_t keep, const char *tmpdir, pthread_mutex_t *build_lock)
{
	dws_patchcache *pc = dws_xcalloc(1, sizeof(*pc));
	pthread_mutex_init(&pc->make_lock, NULL);
	pthread_mutex_init(&pc->lock, NULL);
	pc->build_lock = build_lock;
	pc->tmpdir = tmpdir ? dws_xstrdup(tmpdir) : NULL;
	pc->keep = keep ? keep : 1;
	pc->kept = dws_xcalloc(pc->keep, sizeof(*pc->kept));
	return pc;
}

void dws_patchcache_free(dws_patchcache *pc)
{
	if (!pc)
		return;
	for (size_t i = 0; i < pc->n; i++)
		dws_patchfile_unref(pc->kept[i].p);
	free(pc->kept);
	free(pc->tmpdir);
	pthread_mutex_destroy(&pc->make_lock);
	pthread_mutex_destroy(&pc->lock);
	free(pc);
}

static dws_patchfile *find(dws_patchcache *pc, uint64_t from_id, uint64_t to_id)
{
	dws_patchfile *p = NULL;
	pthread_mutex_lock(&pc->lock);
	for (size_t i = 0; i < pc->n && !p; i++)
		if (pc->kept[i].from_id == from_id && pc->kept[i].to_id == to_id)
			p = dws_patchfile_ref(pc->kept[i].p);
	pthread_mutex_unlock(&pc->lock);
	return p;
}

dws_patchfile *dws_patchcache_find(dws_patchcache *pc, uint64_t from_id, uint64_t to_id, bool for_reader)
{
	dws_patchfile *p = from_id && to_id ? find(pc, from_id, to_id) : NULL;
	if (p && for_reader)
		atomic_store(&pc->read_any, true);
	return p;
}

static void keep(dws_patchcache *pc, uint64_t from_id, uint64_t to_id, dws_patchfile *p)
{
	dws_patchfile *drop = NULL;
	pthread_mutex_lock(&pc->lock);
	if (pc->n == pc->keep) { /* the oldest goes; open files keep their own */
		drop = pc->kept[0].p;
		memmove(pc->kept, pc->kept + 1, (pc->keep - 1) * sizeof(*pc->kept));
		pc->n--;
	}
	pc->kept[pc->n++] = (struct kept){from_id, to_id, dws_patchfile_ref(p)};
	pthread_mutex_unlock(&pc->lock);
	dws_patchfile_unref(drop);
}

static int64_t ms_now(void) { return dws_real_clock.mono_ms(NULL); }

/* f built, or NULL: the patch from step number fn (content id fid) made
 * from the chain alone. */
static int get(dws_patchcache *pc, dws_builder *bl, dws_step *f, uint64_t fn, uint64_t fid, dws_step *t, bool chain_only,
	       bool for_reader, dws_patchfile **out, dws_error *err)
{
	int rc = DWS_OK;
	pthread_mutex_lock(&pc->make_lock);
	*out = find(pc, fid, dws_step_id(t));
	if (!*out) {
		int64_t t0 = ms_now();
		pthread_mutex_lock(pc->build_lock);
		rc = f ? dws_patchfile_make(bl, f, t, pc->tmpdir, chain_only, out, err)
		       : dws_patchfile_make_chain(bl, fn, t, pc->tmpdir, out, err);
		pthread_mutex_unlock(pc->build_lock);
		if (!rc) {
			keep(pc, fid, dws_step_id(t), *out);
			dws_log_info("patch %llu-%llu: %llu elements, %llu bytes, made in %lld ms", (unsigned long long)fn,
				     (unsigned long long)dws_step_number(t), (unsigned long long)dws_patchfile_changed(*out),
				     (unsigned long long)dws_patchfile_size(*out), (long long)(ms_now() - t0));
		}
	}
	pthread_mutex_unlock(&pc->make_lock);
	if (!rc && for_reader)
		atomic_store(&pc->read_any, true);
	return rc;
}

int dws_patchcache_get(dws_patchcache *pc, dws_builder *bl, dws_step *f, dws_step *t, bool chain_only, bool for_reader,
		       dws_patchfile **out, dws_error *err)
{
	return get(pc, bl, f, dws_step_number(f), dws_step_id(f), t, chain_only, for_reader, out, err);
}

int dws_patchcache_get_chain(dws_patchcache *pc, dws_builder *bl, uint64_t from, uint64_t from_id, dws_step *t,
			     bool for_reader, dws_patchfile **out, dws_error *err)
{
	return get(pc, bl, NULL, from, from_id, t, true, for_reader, out, err);
}

bool dws_patchcache_read_any(dws_patchcache *pc)
{
	return atomic_load(&pc->read_any);
}
