/* The step builder: base model or anchor layout, then the chain of files of
 * the current run applied in order into a new immutable dws_step.
 *
 * Step N = the latest complete anchor A <= N (or the base model alone when the
 * run has no anchor yet), then every file with A < step <= N: dense files
 * replace the tensors they hold, sparse files merge into the patch index. */
#include "builder_int.h"
#include "format.h"
#include "xorapply.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* A sparse step file whole in bl->scratch (grown as needed; its pages stay
 * faulted in from one delta to the next), no bigger than a delta of the
 * step's model can be (dws_delta_size); a .zst is decompressed straight into
 * it, header first. */
static int read_into_scratch(dws_builder *bl, const dws_step *s, const dws_stepfile *f,
			     dws_blob *raw, size_t *len, dws_error *err)
{
	uint64_t size;
	int rc = dws_delta_size(raw, f->compressed, dws_layout_patchable(dws_step_layout(s)), bl->o.max_delta_bytes, &size, err);
	if (rc)
		return rc;
	if (size > bl->scratch_cap) {
		free(bl->scratch);
		bl->scratch_cap = (size_t)size;
		bl->scratch = dws_xmalloc(bl->scratch_cap);
	}
	*len = (size_t)size;
	return f->compressed ? dws_zstd_st_read(raw, bl->scratch, size, err) : dws_blob_read(raw, 0, bl->scratch, (size_t)size, err);
}

#define DEFAULT_MAX_DELTA (64ULL << 30)

/* ---- blobs ---- */

/* A source blob for a step file: decompressed when it is .zst, its tensors
 * no bigger than model_bytes. Kept while a step reads it (prune_blobs), so a
 * chain reuses what it decompressed. */
static int stepfile_blob(dws_builder *bl, const dws_stepfile *f, uint64_t model_bytes,
			 dws_blob **out, dws_error *err)
{
	char *key = dws_xasprintf("%s\n%s", f->obj.key, f->obj.ident);
	for (size_t i = 0; i < bl->nblobs; i++)
		if (strcmp(bl->blobs[i].key, key) == 0) {
			free(key);
			*out = dws_blob_ref(bl->blobs[i].blob);
			return DWS_OK;
		}
	dws_blob *raw = NULL, *b = NULL;
	int rc = dws_bucket_open_blob(dws_catalog_bucket(bl->cat), &f->obj, &raw, err);
	if (!rc && f->compressed) {
		uint64_t max;
		if (!dws_mul_ok(bl->o.max_delta_bytes, 64, &max))
			max = UINT64_MAX;
		rc = dws_dense_zstd(raw, bl->o.tmpdir, model_bytes, max, &b, err);
		dws_blob_unref(raw);
	} else {
		b = raw;
	}
	if (rc) {
		free(key);
		return rc;
	}
	bl->blobs = dws_xrealloc(bl->blobs, (bl->nblobs + 1) * sizeof(*bl->blobs));
	bl->blobs[bl->nblobs++] = (struct cached_blob){key, dws_blob_ref(b)};
	*out = b;
	return DWS_OK;
}

/* Keep a blob only while a step reads it: the newest step (its chain, where
 * the next build most likely starts) or any other step still held (a build
 * of it again reuses what was decompressed). Steps hold their own
 * references, so a blob (an fd, a decompressed copy) goes with the last step
 * that reads it, or at the next build if the cache was the last to hold it.
 * A blob only the cache holds cannot gain a reference meanwhile: nobody
 * else has it. */
static void prune_blobs(dws_builder *bl)
{
	size_t k = 0;
	for (size_t i = 0; i < bl->nblobs; i++) {
		if (dws_blob_shared(bl->blobs[i].blob)) {
			bl->blobs[k++] = bl->blobs[i];
			continue;
		}
		free(bl->blobs[i].key);
		dws_blob_unref(bl->blobs[i].blob);
	}
	bl->nblobs = k;
}

/* ---- names ---- */

static char *unmap_name(const dws_builder *bl, const char *out);

/* dws_layout_add_file's: the trainer's name of a checkpoint tensor */
static char *trainer_of(void *ctx, const char *name) { return unmap_name(ctx, name); }

static char *map_name(const dws_builder *bl, const char *trainer)
{
	for (size_t i = 0; i < bl->o.nmaps; i++) {
		size_t fl = strlen(bl->maps[i].from);
		if (strncmp(trainer, bl->maps[i].from, fl) == 0)
			return dws_xasprintf("%s%s", bl->maps[i].to, trainer + fl);
	}
	return dws_xstrdup(trainer);
}

static char *unmap_name(const dws_builder *bl, const char *out)
{
	for (size_t i = 0; i < bl->o.nmaps; i++) {
		size_t tl = strlen(bl->maps[i].to);
		if (strncmp(out, bl->maps[i].to, tl) == 0)
			return dws_xasprintf("%s%s", bl->maps[i].from, out + tl);
	}
	return dws_xstrdup(out);
}

static bool is_safetensors_name(const char *p)
{
	size_t n = strlen(p);
	return n > 12 && strcmp(p + n - 12, ".safetensors") == 0;
}

static int layout_from_base(dws_builder *bl, dws_error *err)
{
	dws_bucket *b = bl->base_bucket ? bl->base_bucket : dws_catalog_bucket(bl->cat);
	dws_object *objs = NULL;
	size_t n = 0;
	int rc = dws_bucket_list(b, bl->base_prefix, &objs, &n, err);
	if (rc)
		return rc;
	size_t pl = strlen(bl->base_prefix);
	dws_layout *L = dws_layout_new();
	for (size_t i = 0; i < n && !rc; i++) {
		const char *path = objs[i].key + (pl ? pl + 1 : 0);
		/* a Hub cache or git checkout keeps bookkeeping that is no model file */
		if (path[0] == '.')
			continue;
		dws_blob *blob = NULL;
		dws_st_file *st = NULL;
		rc = dws_bucket_open_blob(b, &objs[i], &blob, err);
		if (!rc && is_safetensors_name(path))
			rc = dws_st_read_blob(blob, dws_blob_name(blob), &st, err);
		if (!rc)
			rc = dws_layout_add_file(L, path, blob, st, trainer_of, bl, err);
		dws_st_free(st);
		dws_blob_unref(blob);
	}
	dws_objects_free(objs, n);
	if (!rc && L->nfiles == 0)
		rc = dws_fail(err, DWS_ENOENT, "%s%s%s: the base model folder is empty", dws_bucket_uri(b), pl ? "/" : "", bl->base_prefix);
	if (rc) {
		dws_layout_unref(L);
		return rc;
	}
	dws_layout_seal(L);
	bl->base_layout = L;
	return DWS_OK;
}

/* ---- steps ---- */


void dws_bl_ensure_seen(dws_builder *bl, size_t n)
{
	if (bl->nseen < n) {
		bl->seen = dws_xrealloc(bl->seen, n * sizeof(*bl->seen));
		memset(bl->seen + bl->nseen, 0, (n - bl->nseen) * sizeof(*bl->seen));
		bl->nseen = n;
	}
}

int dws_bl_resolve(void *ctx, const char *name, size_t *slot, uint64_t *numel)
{
	struct resolve_ctx *rc = ctx;
	char *out = map_name(rc->bl, name);
	bool ok = dws_strmap_get(&dws_step_layout(rc->s)->by_name, out, slot);
	free(out);
	if (!ok)
		return -1;
	if (rc->bl->seen[*slot] == rc->bl->stamp)
		rc->dup = true; /* two names of one file land on one tensor */
	rc->bl->seen[*slot] = rc->bl->stamp;
	*numel = dws_step_layout(rc->s)->slots[*slot].numel;
	return 0;
}

/* The producer's payload checksum against h, the XXH3-64 of the data section. */
static int payload_is(const char *want, uint64_t h, const char *what, dws_error *err)
{
	char got[17];
	snprintf(got, sizeof(got), "%016llx", (unsigned long long)h);
	if (strcmp(got, want) != 0)
		return dws_fail(err, DWS_EVERIFY, "%s: checksum mismatch: payload xxh3 is %s, the producer wrote %.32s", what, got, want);
	return DWS_OK;
}

static int check_payload(dws_builder *bl, dws_blob *b, const dws_st_file *st,
			 const char *what, dws_error *err)
{
	const char *want = dws_st_meta_get(st, "dwsfs.payload_xxh3");
	if (!bl->o.verify || !want)
		return DWS_OK;
	uint64_t h, ds = dws_st_data_start(st);
	int rc = dws_blob_xxh3(b, ds, dws_blob_size(b) - ds, &h, err);
	return rc ? rc : payload_is(want, h, what, err);
}

/* The same for a file held in memory. */
int dws_bl_check_payload_mem(dws_builder *bl, const dws_st_file *st, const unsigned char *data,
			     size_t len, const char *what, dws_error *err)
{
	const char *want = dws_st_meta_get(st, "dwsfs.payload_xxh3");
	if (!bl->o.verify || !want)
		return DWS_OK;
	uint64_t ds = dws_st_data_start(st);
	return payload_is(want, dws_xxh3(data + ds, len - ds), what, err);
}

/* What a sparse file's params may patch: one tensor each, a float one. */
int dws_bl_check_patchable(const dws_step *s, const dws_delta_param *ps, size_t np, bool dup,
			   const char *what, dws_error *err)
{
	if (dup)
		return dws_fail(err, DWS_EFORMAT, "%s: two parameters map onto one tensor", what);
	for (size_t i = 0; i < np; i++) {
		const dws_slot *sl = &dws_step_layout(s)->slots[ps[i].slot];
		if (!dws_dtype_is_float(sl->dtype))
			return dws_fail(err, DWS_EUNSUP, "%s: cannot patch '%s': the model stores it as %s", what, sl->name,
					dws_dtype_name(sl->dtype));
	}
	return DWS_OK;
}

/* Dense file: each tensor it holds replaces the step's source for it. */
static int apply_dense(dws_builder *bl, dws_step *s, const dws_stepfile *f,
		       dws_error *err)
{
	dws_blob *b = NULL;
	dws_st_file *st = NULL;
	int rc = stepfile_blob(bl, f, dws_layout_tensor_bytes(dws_step_layout(s)), &b, err);
	if (rc)
		return rc;
	const char *what = dws_blob_name(b);
	rc = dws_st_read_blob(b, what, &st, err);
	if (!rc)
		rc = check_payload(bl, b, st, what, err);
	dws_bl_ensure_seen(bl, dws_step_layout(s)->nslots);
	bl->stamp++;
	struct resolve_ctx ctx = {bl, s, what, err, false};
	for (size_t i = 0; !rc && i < dws_st_count(st); i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		size_t slot;
		uint64_t numel;
		if (dws_bl_resolve(&ctx, t->name, &slot, &numel) != 0) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: unknown tensor '%s': the model has no such parameter (trainer names that differ by a prefix need --map-prefix)", what, t->name);
			break;
		}
		const dws_slot *sl = &dws_step_layout(s)->slots[slot];
		if (ctx.dup) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: two tensors map onto '%s'", what, sl->name);
			break;
		}
		if (numel != t->numel) {
			rc = dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' size mismatch: %llu elements, the model's '%s' has %llu", what, t->name,
				      (unsigned long long)t->numel, sl->name, (unsigned long long)numel);
			break;
		}
		if (t->dtype != sl->dtype && !(t->dtype == DWS_DT_BF16 && (sl->dtype == DWS_DT_F32 || sl->dtype == DWS_DT_F16))) {
			rc = dws_fail(err, DWS_EUNSUP, "%s: tensor '%s' is %s; cannot convert it into the model's %s", what, t->name,
				      dws_dtype_name(t->dtype), dws_dtype_name(sl->dtype));
			break;
		}
		dws_src src = {b, dws_st_data_start(st) + t->begin, t->dtype};
		dws_step_set_source(s, slot, &src, dws_dtype_is_float(t->dtype));
		if (slot < bl->nown)
			bl->own[slot] = NULL;
	}
	dws_st_free(st);
	dws_blob_unref(b);
	return rc;
}

/* The decoded params of one sparse file, added to the step's tensors. */
struct param_work {
	dws_builder *bl;
	dws_step *s;
	dws_arena *arena;
	const dws_delta_param *ps;
	const uint64_t *first; /* per param: its entries' place in the pool */
	uint16_t *val_pool;
	size_t np;
	atomic_size_t next;
};

static void *param_main(void *v)
{
	struct param_work *w = v;
	dws_builder *bl = w->bl;
	dws_step *s = w->s;
	for (size_t i; (i = atomic_fetch_add(&w->next, 1)) < w->np;) {
		const dws_delta_param *p = &w->ps[i];
		size_t slot = p->slot;
		if (!p->count)
			continue;
		/* the decoded indices become the run; the values are copied out of
		 * the file buffer, which goes away, next to them in the arena */
		uint16_t *val = w->val_pool + w->first[i];
		memcpy(val, p->val, p->count * sizeof(uint16_t));
		dws_patch *run = dws_patch_new_in(w->arena, p->idx, val, (uint32_t)p->count);
		uint64_t numel = dws_step_layout(s)->slots[slot].numel;
		dws_patchset *old = dws_step_patch(s, slot);
		dws_patchset *next = bl->folding && slot < bl->nown ? dws_patchset_add_build(old, run, numel, &bl->own[slot])
								    : dws_patchset_add(old, run, numel);
		dws_step_set_patch(s, slot, next);
	}
	return NULL;
}

/* fn(arg) on this thread and one more, if one can be started */
static void on_two_threads(void *(*fn)(void *), void *arg)
{
	pthread_t t;
	bool two = pthread_create(&t, NULL, fn, arg) == 0;
	fn(arg);
	if (two)
		pthread_join(t, NULL);
}

struct flush_work {
	dws_builder *bl;
	dws_step *s;
	atomic_size_t next;
};

static void *flush_main(void *v)
{
	struct flush_work *w = v;
	size_t n = dws_step_layout(w->s)->nslots < w->bl->nown ? dws_step_layout(w->s)->nslots : w->bl->nown;
	for (size_t i; (i = atomic_fetch_add(&w->next, 1)) < n;) {
		dws_patchset *ps = dws_patchset_fold_build(dws_step_patch(w->s, i), w->bl->own[i]);
		if (ps)
			dws_step_set_patch(w->s, i, ps);
	}
	return NULL;
}

/* Sparse file: decoded into sorted (index, value) lists merged per tensor. */
static int apply_sparse(dws_builder *bl, dws_step *s, const dws_stepfile *f,
			dws_error *err)
{
	dws_blob *raw = NULL;
	unsigned char *data = NULL;
	size_t len = 0;
	dws_st_file *st = NULL;
	dws_delta_param *ps = NULL;
	size_t np = 0;
	dws_arena *arena = NULL;
	int rc = dws_bucket_open_blob(dws_catalog_bucket(bl->cat), &f->obj, &raw, err);
	if (rc)
		return rc;
	char *what = dws_xstrdup(dws_blob_name(raw));
	rc = read_into_scratch(bl, s, f, raw, &len, err);
	if (rc)
		goto out;
	data = bl->scratch;
	rc = dws_st_parse(data, len, len, what, &st, NULL, err);
	if (!rc)
		rc = dws_delta_check(st, dws_layout_patchable(dws_step_layout(s)), what, err);
	if (rc)
		goto out;
	rc = dws_bl_check_payload_mem(bl, st, data, len, what, err);
	if (rc)
		goto out;
	dws_bl_ensure_seen(bl, dws_step_layout(s)->nslots);
	bl->stamp++;
	struct resolve_ctx ctx = {bl, s, what, err, false};
	uint64_t ds = dws_st_data_start(st);
	/* one allocation for every run of this file: indices, then values (the
	 * count is bounded by the file's size, which the parser checked) */
	uint64_t total = f->variant == DWS_VAR_NVCOMP ? 0 : dws_delta_value_count(st, f->variant);
	arena = dws_arena_new((size_t)total * (sizeof(uint32_t) + sizeof(uint16_t)));
	uint32_t *idx_pool = arena->mem;
	uint16_t *val_pool = (uint16_t *)(void *)(idx_pool + total);
	rc = dws_delta_decode_pool(st, data + ds, len - ds, f->variant, what, dws_bl_resolve, &ctx, idx_pool, &ps, &np, err);
	if (!rc)
		rc = dws_bl_check_patchable(s, ps, np, ctx.dup, what, err);
	if (rc)
		goto out;
	uint64_t *first = dws_xcalloc(np ? np : 1, sizeof(*first));
	for (size_t i = 1; i < np; i++)
		first[i] = first[i - 1] + ps[i - 1].count; /* the pool holds params in decode order */
	struct param_work w = {.bl = bl, .s = s, .arena = arena, .ps = ps, .first = first, .val_pool = val_pool, .np = np};
	atomic_init(&w.next, 0);
	/* a build folding many files: the tensors' folds on both cores (a
	 * file names each tensor once) */
	if (bl->folding && np > 1)
		on_two_threads(param_main, &w);
	else
		param_main(&w);
	dws_arena_written(arena);
	free(first);
out:
	dws_arena_unref(arena); /* the runs keep their own references */
	dws_delta_free(ps, np);
	dws_st_free(st);
	free(what);
	dws_blob_unref(raw);
	return rc;
}

/* ---- SkyRL and miles versions (xorapply.c) ---- */

struct xput {
	dws_builder *bl;
	dws_step *s;
};

/* A tensor's result: its run joins the slot's patch (folded when the build
 * takes several versions at once), or the whole new tensor is its source. */
static void xor_put(void *ctx, size_t slot, dws_patch *run, dws_blob *whole)
{
	struct xput *x = ctx;
	dws_builder *bl = x->bl;
	if (whole) {
		dws_src src = {whole, 0, dws_step_layout(x->s)->slots[slot].dtype};
		dws_step_set_source(x->s, slot, &src, true);
		dws_blob_unref(whole);
		if (slot < bl->nown)
			bl->own[slot] = NULL;
		return;
	}
	uint64_t numel = dws_step_layout(x->s)->slots[slot].numel;
	dws_patchset *old = dws_step_patch(x->s, slot);
	dws_patchset *next = bl->folding && slot < bl->nown ? dws_patchset_add_build(old, run, numel, &bl->own[slot])
							    : dws_patchset_add(old, run, numel);
	dws_step_set_patch(x->s, slot, next);
}

static int apply_version(dws_builder *bl, dws_step *s, const dws_stepfile *f, dws_error *err)
{
	if (!bl->base_layout)
		return dws_fail(err, DWS_ENOENT, "%s: %s versions apply to a base model: give it with -o base= (dwsctl --base) or put it under base/",
				dws_bucket_uri(dws_catalog_bucket(bl->cat)), dws_format_name(dws_catalog_format(bl->cat)));
	dws_bl_ensure_seen(bl, dws_step_layout(s)->nslots);
	bl->stamp++;
	struct resolve_ctx rctx = {bl, s, f->obj.key, err, false};
	struct xput put = {bl, s};
	dws_xapply a = {.s = s, .bucket = dws_catalog_bucket(bl->cat), .xv = f->xv, .verify = bl->o.verify,
			.resolve = dws_bl_resolve, .rctx = &rctx, .put = xor_put, .pctx = &put};
	return f->xv->full ? dws_xver_apply_full(&a, err) : dws_xver_apply(&a, err);
}

static int apply_file(dws_builder *bl, dws_step *s, const dws_stepfile *f,
		      dws_error *err)
{
	if (f->error[0])
		return dws_fail(err, f->error_code, "%s", f->error);
	int rc = f->xv ? apply_version(bl, s, f, err)
		 : f->variant == DWS_VAR_DENSE ? apply_dense(bl, s, f, err) : apply_sparse(bl, s, f, err);
	if (rc)
		return rc;
	uint64_t at = dws_step_number(s), anchor = dws_step_anchor(s);
	size_t chain = dws_step_chain_length(s);
	if (bl->o.verify && f->parent_step >= 0 && chain + (anchor ? 1 : 0) > 0 && (uint64_t)f->parent_step != at)
		return dws_fail(err, DWS_EVERIFY, "%s/%s: chain broken: its parent is step %lld but the previous step in the bucket is %llu (a step is missing)",
				dws_bucket_uri(dws_catalog_bucket(bl->cat)), f->obj.key, (long long)f->parent_step, (unsigned long long)at);
	dws_step_place(s, f->step, anchor, chain + 1);
	return DWS_OK;
}

/* The first step of a chain: the anchor's tensors over the base, or the
 * anchor alone. */
static int chain_start(dws_builder *bl, const dws_stepfile *a, dws_step **out,
		       dws_error *err)
{
	int rc;
	dws_step *s;
	if (a && a->xv) {
		s = bl->base_layout ? dws_step_new(bl->base_layout) : NULL;
		rc = apply_version(bl, s, a, err); /* a full version: on the base's layout */
		if (rc) {
			dws_step_unref(s);
			return rc;
		}
	} else if (bl->base_layout) {
		s = dws_step_new(bl->base_layout);
		if (a) {
			rc = apply_dense(bl, s, a, err);
			if (rc) {
				dws_step_unref(s);
				return rc;
			}
		} else {
			/* no anchor: the base is the trainer's starting point */
			dws_step_train_floats(s);
		}
	} else {
		if (a->error[0])
			return dws_fail(err, a->error_code, "%s", a->error);
		dws_blob *b = NULL;
		dws_st_file *st = NULL;
		rc = stepfile_blob(bl, a, UINT64_MAX, &b, err); /* it makes the model */
		if (rc)
			return rc;
		rc = dws_st_read_blob(b, dws_blob_name(b), &st, err);
		if (!rc)
			rc = check_payload(bl, b, st, dws_blob_name(b), err);
		dws_layout *L = NULL;
		if (!rc) {
			L = dws_layout_new();
			rc = dws_layout_add_file(L, "model.safetensors", b, st, trainer_of, bl, err);
		}
		dws_st_free(st);
		dws_blob_unref(b);
		if (rc) {
			dws_layout_unref(L);
			return rc;
		}
		dws_layout_seal(L);
		s = dws_step_new(L);
		dws_layout_unref(L);
		dws_step_train_floats(s);
	}
	dws_step_place(s, a ? a->step : 0, a ? a->step : 0, 0);
	*out = s;
	return DWS_OK;
}

int dws_builder_build(dws_builder *bl, uint64_t step, dws_step **out,
		      dws_error *err)
{
	*out = NULL;
	const dws_catalog *c = bl->cat;
	const dws_stepfile *target = dws_catalog_find(c, step);
	if (!target) {
		for (size_t i = 0; i < dws_catalog_stale_count(c); i++)
			if (dws_catalog_stale_at(c, i)->step == step)
				return dws_fail(err, DWS_ENOENT, "%s: step %llu belongs to an earlier trainer run that was restarted; it is not served",
						dws_bucket_uri(dws_catalog_bucket(c)), (unsigned long long)step);
		return dws_fail(err, DWS_ENOENT, "%s: no step %llu in the bucket", dws_bucket_uri(dws_catalog_bucket(c)), (unsigned long long)step);
	}
	if (target->error[0])
		return dws_fail(err, target->error_code, "%s", target->error);
	const dws_stepfile *a = dws_catalog_anchor_for(c, step);
	if (!a && !bl->base_layout)
		return dws_fail(err, DWS_ENOENT, "%s: step %llu has no complete anchor at or before it and there is no base model",
				dws_bucket_uri(dws_catalog_bucket(c)), (unsigned long long)step);
	uint64_t astep = a ? a->step : 0;

	dws_step *s = NULL;
	int rc;
	if (bl->prev && dws_step_anchor(bl->prev) == astep && dws_step_number(bl->prev) <= step) {
		s = dws_step_clone(bl->prev);
	} else {
		rc = chain_start(bl, a, &s, err);
		if (rc)
			return rc;
	}
	/* several files at once (a mount starting on a long chain, catching
	 * up): dense tensors are folded as the files come, so the build never
	 * holds every file's runs side by side. One file: appended, merged
	 * off the build path. */
	uint64_t from = dws_step_number(s); /* files after it, up to step, are applied */
	size_t nfiles = 0;
	for (size_t i = 0; i < dws_catalog_count(c); i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		nfiles += f->step > from && !(a && f->step <= astep) && f->step <= step;
	}
	bl->folding = nfiles >= 2;
	if (bl->folding) {
		if (bl->nown < dws_step_layout(s)->nslots) {
			free(bl->own);
			bl->nown = dws_step_layout(s)->nslots;
			bl->own = dws_xcalloc(bl->nown, sizeof(*bl->own));
		}
		memset(bl->own, 0, bl->nown * sizeof(*bl->own));
	}
	rc = DWS_OK;
	for (size_t i = 0; i < dws_catalog_count(c) && !rc; i++) {
		const dws_stepfile *f = dws_catalog_at(c, i);
		if (f->step <= from || (a && f->step <= astep))
			continue;
		if (f->step > step)
			break;
		rc = apply_file(bl, s, f, err);
	}
	if (!rc && bl->folding) {
		/* the runs still pending fold now: a step starts with one run
		 * per dense tensor */
		struct flush_work w = {.bl = bl, .s = s};
		atomic_init(&w.next, 0);
		on_two_threads(flush_main, &w);
	}
	/* what the build made is s's now, shared from here on: never again
	 * changed in place */
	bl->folding = false;
	if (bl->nown)
		memset(bl->own, 0, bl->nown * sizeof(*bl->own));
	if (rc) {
		dws_step_unref(s);
		prune_blobs(bl);
		return rc;
	}
	dws_step_set_id(s, dws_catalog_step_id(c, step));
	dws_step_unref(bl->prev);
	bl->prev = dws_step_ref(s);
	prune_blobs(bl);
	*out = s;
	return DWS_OK;
}

dws_catalog *dws_builder_catalog(dws_builder *bl) { return bl->cat; }
dws_step *dws_builder_newest(dws_builder *bl) { return bl->prev; }

void dws_builder_set_catalog(dws_builder *bl, dws_catalog *c)
{
	bl->cat = c;
	/* keep the previous build only if its chain is unchanged */
	if (bl->prev && dws_catalog_step_id(c, dws_step_number(bl->prev)) != dws_step_id(bl->prev)) {
		dws_step_unref(bl->prev);
		bl->prev = NULL;
		prune_blobs(bl);
	}
}

void dws_build_opts_init(dws_build_opts *o)
{
	*o = (dws_build_opts){.size = sizeof(*o), .max_delta_bytes = DEFAULT_MAX_DELTA};
}

int dws_builder_new(dws_catalog *c, const dws_build_opts *opts,
		    dws_builder **out, dws_error *err)
{
	*out = NULL;
	if (opts && dws_opts_size(opts->size, sizeof(*opts), "dws_build_opts", err))
		return DWS_EINVAL;
	dws_builder *bl = dws_xcalloc(1, sizeof(*bl));
	bl->cat = c;
	if (opts)
		bl->o = *opts;
	else
		dws_build_opts_init(&bl->o);
	bl->maps = dws_xcalloc(bl->o.nmaps ? bl->o.nmaps : 1, sizeof(*bl->maps));
	for (size_t i = 0; i < bl->o.nmaps; i++) {
		bl->maps[i].from = dws_xstrdup(opts->maps[i].from);
		bl->maps[i].to = dws_xstrdup(opts->maps[i].to);
	}
	bl->o.maps = bl->maps;
	bl->o.base = NULL; /* not kept: the caller's string */
	int rc = DWS_OK;
	if (opts && opts->base) {
		dws_error be = {0};
		rc = dws_bucket_open_opts(opts->base, opts->bucket_opts, &bl->base_bucket, &be);
		if (rc) /* "the base model", not "the bucket" */
			dws_fail(err, rc, "base model %s", be.msg);
		else /* its reads are the mount's too */
			dws_bucket_count_into(bl->base_bucket, dws_catalog_bucket(c));
		bl->base_prefix = dws_xstrdup("");
	} else if (dws_catalog_has_base(c)) {
		bl->base_prefix = dws_xstrdup("base");
	}
	if (!rc && bl->base_prefix)
		rc = layout_from_base(bl, err);
	if (rc) {
		dws_builder_free(bl);
		return rc;
	}
	*out = bl;
	return DWS_OK;
}

void dws_builder_free(dws_builder *bl)
{
	if (!bl)
		return;
	dws_step_unref(bl->prev);
	dws_layout_unref(bl->base_layout);
	for (size_t i = 0; i < bl->nblobs; i++) {
		free(bl->blobs[i].key);
		dws_blob_unref(bl->blobs[i].blob);
	}
	for (size_t i = 0; i < bl->o.nmaps; i++) {
		free((char *)bl->maps[i].from);
		free((char *)bl->maps[i].to);
	}
	free(bl->maps);
	free(bl->blobs);
	free(bl->seen);
	free(bl->scratch);
	free(bl->own);
	free(bl->base_prefix);
	dws_bucket_close(bl->base_bucket);
	free(bl);
}
