/* Steps: a step is a handle (number, anchor, id, layout) over a table of
 * what each tensor reads (source and patch). Built once, then immutable in
 * its bytes; a merge swaps the table for one with the same bytes and fewer
 * runs (compaction.c), behind the handle, so nobody who holds the step has
 * to move to another object. Reading: stepread.c. */
#include "step_int.h"
#include "digest.h"

#include <stdlib.h>
#include <string.h>

/* ---- tables ---- */

static dws_steptab *tab_new(size_t n)
{
	dws_steptab *t = dws_xcalloc(1, sizeof(*t));
	atomic_init(&t->refs, 1);
	t->n = n;
	t->src = dws_xcalloc(n ? n : 1, sizeof(*t->src));
	t->patch = dws_xcalloc(n ? n : 1, sizeof(*t->patch));
	t->trained = dws_xcalloc(n ? n : 1, 1);
	return t;
}

dws_steptab *dws_steptab_copy(const dws_steptab *p)
{
	dws_steptab *t = tab_new(p->n);
	for (size_t i = 0; i < p->n; i++) {
		t->src[i] = p->src[i];
		dws_blob_ref(t->src[i].blob);
		t->patch[i] = p->patch[i];
		if (t->patch[i])
			atomic_fetch_add(&t->patch[i]->refs, 1);
	}
	memcpy(t->trained, p->trained, p->n);
	return t;
}

void dws_steptab_put(dws_steptab *t)
{
	if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
		return;
	for (size_t i = 0; i < t->n; i++) {
		dws_blob_unref(t->src[i].blob);
		dws_patchset_unref(t->patch[i]);
	}
	free(t->src);
	free(t->patch);
	free(t->trained);
	free(t);
}

dws_steptab *dws_step_tab(dws_step *s)
{
	pthread_mutex_lock(&s->lock);
	dws_steptab *t = s->tab;
	atomic_fetch_add(&t->refs, 1);
	pthread_mutex_unlock(&s->lock);
	return t;
}

void dws_step_swap_tab(dws_step *s, dws_steptab *t)
{
	pthread_mutex_lock(&s->lock);
	dws_steptab *old = s->tab;
	s->tab = t;
	pthread_mutex_unlock(&s->lock);
	dws_steptab_put(old);
}

/* ---- building (the builder's, on a step nobody else holds yet) ---- */

static dws_step *step_over(dws_layout *L, dws_steptab *t)
{
	dws_step *s = dws_xcalloc(1, sizeof(*s));
	atomic_init(&s->refs, 1);
	s->layout = dws_layout_ref(L);
	s->tab = t;
	pthread_mutex_init(&s->lock, NULL);
	return s;
}

dws_step *dws_step_new(dws_layout *L)
{
	dws_steptab *t = tab_new(L->nslots);
	for (size_t i = 0; i < L->nslots; i++) {
		const dws_slot *sl = &L->slots[i];
		t->src[i] = (dws_src){dws_blob_ref(L->files[sl->file].blob), sl->off, sl->dtype};
	}
	return step_over(L, t);
}

dws_step *dws_step_clone(dws_step *p)
{
	dws_steptab *pt = dws_step_tab(p);
	dws_step *s = step_over(p->layout, dws_steptab_copy(pt));
	dws_steptab_put(pt);
	s->step = p->step;
	s->anchor = p->anchor;
	s->chain = p->chain;
	return s;
}

void dws_step_set_source(dws_step *s, size_t slot, const dws_src *src, bool trained)
{
	dws_steptab *t = s->tab;
	dws_blob_ref(src->blob);
	dws_blob_unref(t->src[slot].blob);
	t->src[slot] = *src;
	dws_patchset_unref(t->patch[slot]);
	t->patch[slot] = NULL;
	t->trained[slot] = trained;
}

dws_patchset *dws_step_patch(dws_step *s, size_t slot) { return s->tab->patch[slot]; }

void dws_step_set_patch(dws_step *s, size_t slot, dws_patchset *ps)
{
	dws_steptab *t = s->tab;
	dws_patchset_unref(t->patch[slot]);
	t->patch[slot] = ps;
	t->trained[slot] = 1;
}

void dws_step_train_floats(dws_step *s)
{
	for (size_t i = 0; i < s->layout->nslots; i++)
		s->tab->trained[i] = dws_dtype_is_float(s->layout->slots[i].dtype);
}

void dws_step_place(dws_step *s, uint64_t step, uint64_t anchor, size_t chain)
{
	s->step = step;
	s->anchor = anchor;
	s->chain = chain;
}

void dws_step_set_id(dws_step *s, uint64_t id) { s->id = id; }

/* ---- the handle ---- */

dws_step *dws_step_ref(dws_step *s)
{
	if (s)
		atomic_fetch_add(&s->refs, 1);
	return s;
}

void dws_step_unref(dws_step *s)
{
	if (!s || atomic_fetch_sub(&s->refs, 1) != 1)
		return;
	dws_steptab_put(s->tab);
	dws_layout_unref(s->layout);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

uint64_t dws_step_number(const dws_step *s) { return s->step; }
uint64_t dws_step_anchor(const dws_step *s) { return s->anchor; }
uint64_t dws_step_id(const dws_step *s) { return s->id; }
size_t dws_step_chain_length(const dws_step *s) { return s->chain; }
const dws_layout *dws_step_layout(const dws_step *s) { return s->layout; }
size_t dws_step_file_count(const dws_step *s) { return s->layout->nfiles; }
const dws_file_info *dws_step_file(const dws_step *s, size_t i) { return &s->layout->files[i].info; }
size_t dws_step_node_count(const dws_step *s) { return s->layout->nnodes; }
const dws_node *dws_step_node(const dws_step *s, size_t i) { return &s->layout->nodes[i]; }

uint32_t dws_step_node_lookup(const dws_step *s, uint32_t dir, const char *name)
{
	return dws_layout_node_lookup(s->layout, dir, name);
}

int dws_step_file_lookup(const dws_step *s, const char *path)
{
	size_t i;
	return dws_strmap_get(&s->layout->by_path, path, &i) ? (int)i : -1;
}

bool dws_step_trained(dws_step *s, size_t slot)
{
	dws_steptab *t = dws_step_tab(s);
	bool yes = t->trained[slot];
	dws_steptab_put(t);
	return yes;
}

uint64_t dws_step_patch_entries(dws_step *s)
{
	dws_steptab *t = dws_step_tab(s);
	uint64_t n = 0;
	for (size_t i = 0; i < t->n; i++)
		if (t->patch[i])
			n += t->patch[i]->entries;
	dws_steptab_put(t);
	return n;
}

size_t dws_step_whole_tensors(dws_step *s, uint64_t *bytes)
{
	dws_steptab *t = dws_step_tab(s);
	size_t n = 0;
	uint64_t b = 0;
	for (size_t i = 0; i < t->n; i++) {
		const dws_patchset *ps = t->patch[i];
		if (ps && ps->nruns && ps->runs[0]->full) {
			n++;
			b += s->layout->slots[i].numel * 2;
		}
	}
	dws_steptab_put(t);
	*bytes = b;
	return n;
}

/* ---- state digest (digest.h) ---- */

/* Elements [e0, e0+n) of slot's tensor as the trainer sees them: BF16. */
static int step_bf16(void *ctx, size_t slot, uint64_t e0, uint64_t n, uint16_t *out,
		     void *scratch, dws_error *err)
{
	const dws_steptab *t = ctx;
	const dws_src *src = &t->src[slot];
	size_t ssz = dws_dtype_size(src->dtype);
	void *raw = src->dtype == DWS_DT_BF16 ? (void *)out : scratch;
	int rc = dws_blob_read(src->blob, src->off + e0 * ssz, raw, n * ssz, err);
	if (rc)
		return rc;
	dws_to_bf16(src->dtype, raw, n, out);
	dws_pmem_trim(n * 2); /* spilled patches' pages read before leave the process */
	dws_patchset_apply_bf16(t->patch[slot], e0, n, out);
	return DWS_OK;
}

int dws_step_state_digest(dws_step *s, uint64_t *out, dws_error *err)
{
	dws_steptab *t = dws_step_tab(s);
	const dws_layout *L = s->layout;
	dws_digest_item *items = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(*items));
	size_t n = 0;
	for (size_t i = 0; i < L->nslots; i++)
		if (t->trained[i])
			items[n++] = (dws_digest_item){L->slots[i].trainer, L->slots[i].numel, i};
	int rc = dws_state_digest(items, n, step_bf16, t, out, err);
	free(items);
	dws_steptab_put(t);
	return rc;
}

/* step_bf16, counting what was read for a progress callback. */
struct counted {
	dws_steptab *t;
	const dws_progress *pr;
	uint64_t done, total;
};

static int counted_bf16(void *ctx, size_t slot, uint64_t e0, uint64_t n, uint16_t *out, void *scratch,
			dws_error *err)
{
	struct counted *c = ctx;
	int rc = step_bf16(c->t, slot, e0, n, out, scratch, err);
	c->done += n * 2;
	c->pr->fn(c->pr->ctx, "state checksum", c->done, c->total);
	return rc;
}

int dws_step_check_state_progress(dws_step *s, const char *want, const char *what, const dws_progress *pr,
				  dws_error *err)
{
	if (!want || !want[0])
		return DWS_OK;
	uint64_t h;
	int rc;
	if (!pr || !pr->fn) {
		rc = dws_step_state_digest(s, &h, err);
	} else {
		dws_steptab *t = dws_step_tab(s);
		const dws_layout *L = s->layout;
		dws_digest_item *items = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(*items));
		struct counted c = {t, pr, 0, 0};
		size_t n = 0;
		for (size_t i = 0; i < L->nslots; i++)
			if (t->trained[i]) {
				items[n++] = (dws_digest_item){L->slots[i].trainer, L->slots[i].numel, i};
				c.total += L->slots[i].numel * 2;
			}
		rc = dws_state_digest(items, n, counted_bf16, &c, &h, err);
		free(items);
		dws_steptab_put(t);
	}
	return rc ? rc : dws_state_check(h, want, what, s->step, err);
}

int dws_step_check_state(dws_step *s, const char *want, const char *what, dws_error *err)
{
	return dws_step_check_state_progress(s, want, what, NULL, err);
}
