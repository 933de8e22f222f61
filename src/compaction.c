/* Compaction: merging a step's patch runs off the build path (a mount does
 * it on its compaction thread). A plan picks, from the step's table as it is
 * now, the runs worth merging per tensor (dws_patchset_pick); running it
 * merges them without any lock, in slices; applying splices the merged runs
 * into every step given that still holds the runs they came from, as a new
 * table swapped in behind the step's handle: the same bytes, fewer runs,
 * and whoever holds the step reads them from then on. */
#include "step_int.h"

#include <stdlib.h>

struct cjob {
	size_t slot;
	uint32_t j, k;      /* runs [j, j+k) of the tensor's patch */
	dws_patch *merged;  /* once run, until applied */
};

struct dws_compaction {
	dws_step *target;
	dws_steptab *snap;  /* the table the pending jobs' runs come from */
	struct cjob *jobs;
	size_t n, next;     /* jobs run so far */
};

/* Whether slot i is worth a job, and which runs. */
static bool pick(const dws_layout *L, const dws_steptab *t, size_t i, uint32_t *j, uint32_t *k)
{
	uint64_t numel = L->slots[i].numel;
	if (dws_patchset_pick(t->patch[i], numel, j, k))
		return true;
	/* a dense run (a build folded the tensor into it) whose source is
	 * local now: the whole tensor in memory costs less (2 bytes an
	 * element, not 2 and a bit) and reads skip the source */
	const dws_patchset *ps = t->patch[i];
	const dws_src *src = &t->src[i];
	if (!ps || !ps->nruns || !ps->runs[0]->bits || ps->runs[0]->full || L->slots[i].dtype != DWS_DT_BF16 ||
	    src->dtype != DWS_DT_BF16 || !src->blob || !dws_blob_local(src->blob, src->off, numel * 2))
		return false;
	*j = 0;
	*k = ps->nruns;
	return true;
}

dws_compaction *dws_compaction_plan(dws_step *s)
{
	if (!s)
		return NULL;
	dws_steptab *t = dws_step_tab(s);
	dws_compaction *c = NULL;
	for (size_t i = 0; i < t->n; i++) {
		uint32_t j, k;
		if (!pick(s->layout, t, i, &j, &k))
			continue;
		if (!c) {
			c = dws_xcalloc(1, sizeof(*c));
			c->target = dws_step_ref(s);
			c->snap = t;
			atomic_fetch_add(&t->refs, 1);
		}
		c->jobs = dws_xrealloc(c->jobs, (c->n + 1) * sizeof(*c->jobs));
		c->jobs[c->n++] = (struct cjob){i, j, k, NULL};
	}
	dws_steptab_put(t);
	return c;
}

bool dws_compaction_run(dws_compaction *c, uint64_t budget, const atomic_bool *stop)
{
	const dws_layout *L = c->target->layout;
	uint64_t done = 0;
	while (c->next < c->n && done < budget && !(stop && atomic_load(stop))) {
		struct cjob *jb = &c->jobs[c->next++];
		const dws_slot *sl = &L->slots[jb->slot];
		/* merging from the oldest run: the source can be folded in */
		const dws_src *src = jb->j == 0 && sl->dtype == DWS_DT_BF16 ? &c->snap->src[jb->slot] : NULL;
		jb->merged = dws_patch_compact(c->snap->patch[jb->slot]->runs + jb->j, jb->k, sl->numel, src);
		done += jb->merged->bits ? sl->numel * 2 : (uint64_t)jb->merged->n * 6;
	}
	return c->next < c->n;
}

/* A copy of table cur with the merged runs spliced in wherever it still
 * holds the runs they came from, or NULL if it holds none of them. */
static dws_steptab *splice(const dws_steptab *cur, const dws_compaction *c)
{
	dws_steptab *nt = NULL;
	for (size_t i = 0; i < c->n; i++) {
		const struct cjob *jb = &c->jobs[i];
		const dws_patchset *was = c->snap->patch[jb->slot], *now = cur->patch[jb->slot];
		if (!jb->merged || !now || now->nruns < jb->j + jb->k)
			continue;
		bool same = true;
		for (uint32_t r = jb->j; r < jb->j + jb->k && same; r++)
			same = now->runs[r] == was->runs[r];
		if (!same)
			continue; /* rebuilt meanwhile */
		if (!nt)
			nt = dws_steptab_copy(cur);
		dws_patchset *np = dws_patchset_splice(now, jb->j, jb->k, jb->merged);
		dws_patchset_unref(nt->patch[jb->slot]);
		nt->patch[jb->slot] = np;
	}
	return nt;
}

/* s's table with the merged runs, swapped in; true if it changed. */
static bool apply_to(dws_step *s, const dws_compaction *c)
{
	if (!s || s->layout != c->target->layout)
		return false;
	dws_steptab *cur = dws_step_tab(s);
	dws_steptab *nt = splice(cur, c);
	dws_steptab_put(cur);
	if (!nt)
		return false;
	dws_step_swap_tab(s, nt);
	return true;
}

void dws_compaction_apply(dws_compaction *c, dws_step *also)
{
	apply_to(c->target, c);
	if (also != c->target)
		apply_to(also, c);
	/* applied: what is left to run takes its runs from the new table (the
	 * same, for those tensors) */
	for (size_t i = 0; i < c->n; i++) {
		dws_patch_unref(c->jobs[i].merged);
		c->jobs[i].merged = NULL;
	}
	dws_steptab_put(c->snap);
	c->snap = dws_step_tab(c->target);
}

size_t dws_compaction_count(const dws_compaction *c) { return c->n; }
dws_step *dws_compaction_target(const dws_compaction *c) { return c->target; }

void dws_compaction_free(dws_compaction *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++)
		dws_patch_unref(c->jobs[i].merged);
	free(c->jobs);
	dws_steptab_put(c->snap);
	dws_step_unref(c->target);
	free(c);
}
