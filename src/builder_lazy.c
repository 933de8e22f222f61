/* Chains left undecoded: the files of a step's chain parsed and checked,
 * their indices still encoded, for the streaming extract and for catch-up
 * patches (dws_builder_span). */
#include "builder_int.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

void dws_lazy_chain_free(dws_lazy_chain *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->nfiles; i++) {
		dws_lazy_file *f = &c->files[i];
		dws_delta_free(f->ps, f->np);
		dws_st_free(f->st);
		if (f->mapped)
			munmap(f->data, f->len);
		else
			free(f->data);
		free(f->what);
	}
	free(c->files);
	dws_step_unref(c->first);
	free(c);
}

/* A sparse file of the chain in memory (mapped when it is a local file),
 * checked as apply_sparse checks it, its indices left as they are. */
static int lazy_file(dws_builder *bl, dws_step *s, const dws_stepfile *f,
		     dws_lazy_file *lf, dws_error *err)
{
	dws_blob *raw = NULL, *b = NULL;
	int rc = dws_bucket_open_blob(dws_catalog_bucket(bl->cat), &f->obj, &raw, err);
	if (rc)
		return rc;
	lf->what = dws_xstrdup(dws_blob_name(raw));
	uint64_t size;
	uint64_t patchable = dws_layout_patchable(dws_step_layout(s));
	rc = dws_delta_size(raw, f->compressed, patchable, bl->o.max_delta_bytes, &size, err);
	if (!rc && f->compressed) /* exactly that size, into a file mapped below */
		rc = dws_zstd_st_file(raw, bl->o.tmpdir, size, &b, err);
	else if (!rc)
		b = dws_blob_ref(raw);
	dws_blob_unref(raw);
	if (rc)
		return rc;
	if (dws_blob_fd(b) >= 0 && size) {
		void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, dws_blob_fd(b), 0);
		if (m != MAP_FAILED) {
			lf->data = m;
			lf->len = (size_t)size;
			lf->mapped = true;
			dws_blob_count_fetched(b, size);
		}
	}
	if (!rc && !lf->data)
		rc = dws_blob_slurp(b, bl->o.max_delta_bytes, &lf->data, &lf->len, err);
	dws_blob_unref(b);
	if (rc)
		return rc;
	const unsigned char *data = lf->data;
	rc = dws_st_parse(data, lf->len, lf->len, lf->what, &lf->st, NULL, err);
	if (!rc)
		rc = dws_delta_check(lf->st, patchable, lf->what, err);
	if (rc)
		return rc;
	rc = dws_bl_check_payload_mem(bl, lf->st, data, lf->len, lf->what, err);
	if (rc)
		return rc;
	uint64_t ds = dws_st_data_start(lf->st);
	dws_bl_ensure_seen(bl, dws_step_layout(s)->nslots);
	bl->stamp++;
	struct resolve_ctx ctx = {bl, s, lf->what, err, false};
	rc = dws_delta_scan(lf->st, data + ds, lf->len - ds, f->variant, lf->what, dws_bl_resolve, &ctx, &lf->ps, &lf->np, err);
	return rc ? rc : dws_bl_check_patchable(s, lf->ps, lf->np, ctx.dup, lf->what, err);
}

/* File f of the chain, parsed against s's layout, appended to lc. */
static int lazy_add(dws_builder *bl, dws_lazy_chain *lc, dws_step *s, const dws_stepfile *f, dws_error *err)
{
	lc->files = dws_xrealloc(lc->files, (lc->nfiles + 1) * sizeof(*lc->files));
	dws_lazy_file *lf = &lc->files[lc->nfiles++];
	memset(lf, 0, sizeof(*lf));
	return lazy_file(bl, s, f, lf, err);
}

int dws_builder_lazy_chain(dws_builder *bl, uint64_t step, dws_lazy_chain **out,
			   dws_error *err)
{
	*out = NULL;
	const dws_catalog *c = bl->cat;
	const dws_stepfile *target = dws_catalog_find(c, step);
	const dws_stepfile *a = dws_catalog_anchor_for(c, step);
	if (!target || target->error[0] || !a || a->step == step)
		return DWS_OK;
	for (size_t i = 0; i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step > a->step && f->step <= step && (f->error[0] || f->variant == DWS_VAR_DENSE || f->xv))
			return DWS_OK;
	}
	dws_lazy_chain *lc = dws_xcalloc(1, sizeof(*lc));
	int rc = dws_builder_build(bl, a->step, &lc->first, err);
	uint64_t at = a->step;
	for (size_t i = 0; !rc && i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step <= a->step)
			continue;
		if (f->step > step)
			break;
		rc = lazy_add(bl, lc, lc->first, f, err);
		if (!rc && bl->o.verify && f->parent_step >= 0 && (uint64_t)f->parent_step != at)
			rc = dws_fail(err, DWS_EVERIFY, "%s/%s: chain broken: its parent is step %lld but the previous step in the bucket is %llu (a step is missing)",
				      dws_bucket_uri(dws_catalog_bucket(c)), f->obj.key, (long long)f->parent_step, (unsigned long long)at);
		at = f->step;
	}
	if (rc) {
		dws_lazy_chain_free(lc);
		return rc;
	}
	*out = lc;
	return DWS_OK;
}

int dws_builder_span(dws_builder *bl, dws_step *to, uint64_t from, dws_lazy_chain **out, dws_error *err)
{
	*out = NULL;
	const dws_catalog *c = bl->cat;
	uint64_t step = dws_step_number(to);
	const dws_stepfile *a = dws_catalog_anchor_for(c, step);
	uint64_t astep = a ? a->step : 0;
	if (from < astep || from >= step)
		return DWS_OK; /* another chain */
	for (size_t i = 0; i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step > from && f->step <= step && (f->error[0] || f->variant == DWS_VAR_DENSE || f->xv))
			return DWS_OK;
	}
	dws_lazy_chain *lc = dws_xcalloc(1, sizeof(*lc));
	lc->first = dws_step_ref(to);
	int rc = DWS_OK;
	for (size_t i = 0; !rc && i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step <= from)
			continue;
		if (f->step > step)
			break;
		rc = lazy_add(bl, lc, to, f, err);
	}
	if (rc) {
		dws_lazy_chain_free(lc);
		return rc;
	}
	*out = lc;
	return DWS_OK;
}

