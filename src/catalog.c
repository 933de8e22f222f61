/* The step catalog: which steps a bucket holds, what kind each file is, and
 * which files belong to the current trainer run.
 *
 * A restarted trainer rewrites low-numbered files and leaves the old run's
 * higher-numbered ones. Upload times are the only clue in a trainer's bucket:
 * walking the steps in ascending order, a file older than a lower-numbered
 * file already kept (by more than a tolerance for uploads finishing out of
 * order) is from an earlier run. Files written by `dwsctl publish` carry a run
 * id, which decides exactly. */
#include "bucket.h"
#include "format.h"

#include <jansson.h>
#include <xxhash.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

struct dws_catalog {
	dws_bucket *bucket;
	dws_stepfile *v;      /* current run, ascending */
	size_t n;
	dws_stepfile *stale;  /* files of earlier runs, and losers of a tie */
	size_t nstale;
	bool has_base;
	dws_format format;
	dws_object *listing;  /* SkyRL, miles: the whole listing (reused by a poll) */
	size_t nlisting;
};

const char *dws_variant_name(dws_variant v)
{
	switch (v) {
	case DWS_VAR_DENSE: return "dense";
	case DWS_VAR_V1: return "v1";
	case DWS_VAR_RAW: return "raw";
	case DWS_VAR_GAP_DELTA: return "gap_delta";
	case DWS_VAR_NVCOMP: return "nvcomp_cascaded";
	case DWS_VAR_XOR: return "xor";
	case DWS_VAR_OVERWRITE: return "overwrite";
	}
	return "?";
}

void dws_catalog_free(dws_catalog *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++) {
		free(c->v[i].obj.key);
		dws_xver_unref(c->v[i].xv);
	}
	for (size_t i = 0; i < c->nstale; i++)
		free(c->stale[i].obj.key);
	dws_objects_free(c->listing, c->nlisting);
	free(c->v);
	free(c->stale);
	free(c);
}

size_t dws_catalog_count(const dws_catalog *c) { return c->n; }
const dws_stepfile *dws_catalog_at(const dws_catalog *c, size_t i) { return &c->v[i]; }
size_t dws_catalog_stale_count(const dws_catalog *c) { return c->nstale; }
const dws_stepfile *dws_catalog_stale_at(const dws_catalog *c, size_t i) { return &c->stale[i]; }
bool dws_catalog_has_base(const dws_catalog *c) { return c->has_base; }
dws_format dws_catalog_format(const dws_catalog *c) { return c->format; }
dws_bucket *dws_catalog_bucket(const dws_catalog *c) { return c->bucket; }

const dws_stepfile *dws_catalog_find(const dws_catalog *c, uint64_t step)
{
	size_t lo = 0, hi = c->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (c->v[mid].step < step)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < c->n && c->v[lo].step == step ? &c->v[lo] : NULL;
}

const dws_stepfile *dws_catalog_anchor_for(const dws_catalog *c, uint64_t step)
{
	const dws_stepfile *best = NULL;
	for (size_t i = 0; i < c->n && c->v[i].step <= step; i++)
		if (c->v[i].variant == DWS_VAR_DENSE && c->v[i].complete && !c->v[i].error[0])
			best = &c->v[i];
	return best;
}

/* Read the header of a step file and classify it. Problems go into f->error:
 * a bad file makes its step invalid, not the whole catalog. */
static void sniff(dws_bucket *b, dws_stepfile *f)
{
	dws_error err = {0};
	dws_blob *blob = NULL;
	dws_st_file *st = NULL;
	void *buf = NULL;
	/* an anchor's header is no reason to fetch whole blocks of it; a delta
	 * is fetched whole anyway, so its first block goes to the cache */
	const dws_read_hint hint = {f->in_anchors ? DWS_READ_DIRECT : DWS_READ_NORMAL, UINT64_MAX};
	int rc = dws_bucket_open_blob(b, &f->obj, &blob, &err);
	if (rc)
		goto out;
	const char *what = dws_blob_name(blob);
	if (f->compressed) {
		size_t got = 0;
		uint64_t need = 0, size;
		rc = dws_zstd_prefix_hint(blob, 4096, &hint, &buf, &got, &err);
		if (rc)
			goto out;
		/* the frame header gives the size; without it the real check waits
		 * until the step is built from the whole decompressed file */
		unsigned char fh[32];
		size_t fl = dws_blob_size(blob) < sizeof(fh) ? (size_t)dws_blob_size(blob) : sizeof(fh);
		rc = dws_blob_read_hint(blob, 0, fh, fl, &hint, &err);
		if (rc)
			goto out;
		unsigned long long cs = ZSTD_getFrameContentSize(fh, fl);
		size = (cs == ZSTD_CONTENTSIZE_UNKNOWN || cs == ZSTD_CONTENTSIZE_ERROR) ? DWS_ST_SIZE_UNKNOWN : cs;
		rc = dws_st_parse(buf, got, size < got ? got : size, what, &st, &need, &err);
		if (rc == 1) {
			free(buf);
			buf = NULL;
			rc = dws_zstd_prefix_hint(blob, (size_t)need, &hint, &buf, &got, &err);
			if (!rc)
				rc = dws_st_parse(buf, got, size, what, &st, NULL, &err);
		}
	} else {
		rc = dws_st_read_blob_hint(blob, what, &hint, &st, &err);
	}
	if (rc)
		goto out;

	const char *sparse = dws_st_meta_get(st, "sparse");
	const char *enc = dws_st_meta_get(st, "encoding");
	const char *tot = dws_st_meta_get(st, "total_elements");
	const char *run = dws_st_meta_get(st, "dwsfs.run_id");
	const char *parent = dws_st_meta_get(st, "dwsfs.parent_step");
	if (tot && !dws_parse_u64(tot, &f->total_elements)) {
		rc = dws_fail(&err, DWS_EFORMAT, "%s: metadata total_elements '%.32s' is not a number", what, tot);
		goto out;
	}
	const char *sx = dws_st_meta_get(st, "dwsfs.state_xxh3");
	if (run)
		snprintf(f->run_id, sizeof(f->run_id), "%s", run);
	if (sx)
		snprintf(f->state_xxh3, sizeof(f->state_xxh3), "%s", sx);
	if (parent) {
		uint64_t p;
		if (!dws_parse_u64(parent, &p) || p > INT64_MAX) {
			rc = dws_fail(&err, DWS_EFORMAT, "%s: metadata dwsfs.parent_step '%.32s' is not a step", what, parent);
			goto out;
		}
		f->parent_step = (int64_t)p;
	}
	bool is_sparse;
	if (!sparse || strcmp(sparse, "False") == 0 || strcmp(sparse, "false") == 0) {
		is_sparse = false; /* a plain safetensors file is a dense file */
	} else if (strcmp(sparse, "True") == 0 || strcmp(sparse, "true") == 0) {
		is_sparse = true;
	} else {
		rc = dws_fail(&err, DWS_EFORMAT, "%s: metadata sparse='%.32s' is neither True nor False", what, sparse);
		goto out;
	}
	size_t n = dws_st_count(st);
	if (!is_sparse) {
		f->variant = DWS_VAR_DENSE;
		f->nparams = n;
		for (size_t i = 0; i < n; i++)
			f->changed += dws_st_at(st, i)->numel;
		goto out;
	}
	if (enc) {
		if (strcmp(enc, "raw") == 0)
			f->variant = DWS_VAR_RAW;
		else if (strcmp(enc, "gap_delta") == 0)
			f->variant = DWS_VAR_GAP_DELTA;
		else if (strcmp(enc, "nvcomp_cascaded") == 0)
			f->variant = DWS_VAR_NVCOMP;
		else {
			rc = dws_fail(&err, DWS_EUNSUP, "%s: unknown sparse encoding '%.32s'", what, enc);
			goto out;
		}
	} else if (dws_st_meta_get(st, "changed_params")) {
		f->variant = DWS_VAR_V1;
	} else {
		rc = dws_fail(&err, DWS_EFORMAT, "%s: sparse file with neither 'encoding' nor 'changed_params' metadata", what);
		goto out;
	}
	const char *vsuf = f->variant == DWS_VAR_V1 ? ".values" : ".val";
	size_t vl = strlen(vsuf);
	for (size_t i = 0; i < n; i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		size_t nl = strlen(t->name);
		if (nl > vl && strcmp(t->name + nl - vl, vsuf) == 0) {
			f->nparams++;
			f->changed += t->numel;
		}
	}
out:
	if (rc) {
		snprintf(f->error, sizeof(f->error), "%s", err.msg);
		f->error_code = dws_code_of(&err, rc);
	}
	free(buf);
	dws_st_free(st);
	dws_blob_unref(blob);
}

static int cmp_step_mtime(const void *a, const void *b)
{
	const dws_stepfile *x = a, *y = b;
	if (x->step != y->step)
		return x->step < y->step ? -1 : 1;
	if (x->obj.mtime_ns != y->obj.mtime_ns)
		return x->obj.mtime_ns < y->obj.mtime_ns ? -1 : 1;
	return strcmp(x->obj.key, y->obj.key);
}

static void push(dws_stepfile **v, size_t *n, const dws_stepfile *f)
{
	*v = dws_xrealloc(*v, (*n + 1) * sizeof(**v));
	(*v)[(*n)++] = *f;
}

static void select_run(dws_catalog *c, dws_stepfile *all, size_t n, int64_t tol)
{
	/* the run of the newest file carrying a run id wins; files of other runs
	 * are stale whatever their numbers */
	const char *run = NULL;
	int64_t newest = INT64_MIN;
	for (size_t i = 0; i < n; i++)
		if (all[i].run_id[0] && all[i].obj.mtime_ns >= newest) {
			newest = all[i].obj.mtime_ns;
			run = all[i].run_id;
		}
	char runbuf[64] = "";
	if (run)
		snprintf(runbuf, sizeof(runbuf), "%s", run);

	if (n)
		qsort(all, n, sizeof(*all), cmp_step_mtime);
	int64_t kept_max = INT64_MIN;
	for (size_t i = 0; i < n;) {
		size_t j = i;
		while (j < n && all[j].step == all[i].step)
			j++;
		/* candidates for this step: the group [i, j), oldest first */
		dws_stepfile *pick = NULL;
		for (size_t k = i; k < j; k++) {
			dws_stepfile *f = &all[k];
			bool ok = !(runbuf[0] && f->run_id[0] && strcmp(f->run_id, runbuf) != 0);
			if (ok && kept_max != INT64_MIN && f->obj.mtime_ns < kept_max - tol)
				ok = false;
			if (!ok)
				continue;
			/* among files of one step, a complete dense one shortens the
			 * chain; otherwise the newest wins */
			bool fa = f->variant == DWS_VAR_DENSE && f->complete && !f->error[0];
			bool pa = pick && pick->variant == DWS_VAR_DENSE && pick->complete && !pick->error[0];
			if (!pick || (fa && !pa) || (fa == pa && f->obj.mtime_ns >= pick->obj.mtime_ns - tol))
				pick = f;
		}
		for (size_t k = i; k < j; k++) {
			if (&all[k] == pick) {
				push(&c->v, &c->n, &all[k]);
				if (all[k].obj.mtime_ns > kept_max)
					kept_max = all[k].obj.mtime_ns;
			} else {
				push(&c->stale, &c->nstale, &all[k]);
			}
		}
		i = j;
	}
}

/* A dense file is complete when it holds every parameter: its element count
 * equals the metadata total_elements, or, without that metadata, the largest
 * element count of any dense file of the run. */
static void mark_complete(dws_stepfile *v, size_t n)
{
	uint64_t maxel = 0;
	for (size_t i = 0; i < n; i++)
		if (v[i].variant == DWS_VAR_DENSE && !v[i].error[0] && v[i].changed > maxel)
			maxel = v[i].changed;
	for (size_t i = 0; i < n; i++) {
		dws_stepfile *f = &v[i];
		if (f->variant != DWS_VAR_DENSE || f->error[0])
			continue;
		f->complete = f->total_elements ? f->changed == f->total_elements : f->changed == maxel;
	}
}

static uint64_t id_mix(uint64_t seed, const dws_stepfile *f)
{
	XXH3_state_t *st = XXH3_createState();
	XXH3_64bits_reset_withSeed(st, seed);
	XXH3_64bits_update(st, &f->step, sizeof(f->step));
	XXH3_64bits_update(st, f->obj.key, strlen(f->obj.key) + 1);
	XXH3_64bits_update(st, f->obj.ident, strlen(f->obj.ident) + 1);
	/* a version is its manifest and every payload it names */
	for (size_t i = 1; f->xv && i < f->xv->nobjs; i++) {
		XXH3_64bits_update(st, f->xv->objs[i].key, strlen(f->xv->objs[i].key) + 1);
		XXH3_64bits_update(st, f->xv->objs[i].ident, strlen(f->xv->objs[i].ident) + 1);
	}
	uint64_t h = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	return h;
}

size_t dws_catalog_next_keys(const dws_catalog *c, char **keys, size_t n)
{
	uint64_t next = c->n ? c->v[c->n - 1].step + 1 : 1;
	const struct dws_format_ops *fo = dws_format_ops_of(c->format);
	if (fo) { /* the next versions' manifests or indexes */
		size_t k = 0;
		for (; k < n && next + k <= INT64_MAX; k++)
			keys[k] = fo->index_key(next + k);
		return k;
	}
	bool zst = false;
	uint64_t a_last = 0, a_every = 0;
	for (size_t i = 0; i < c->n; i++) {
		zst = c->v[i].compressed;
		if (c->v[i].in_anchors) {
			if (a_last && c->v[i].step > a_last)
				a_every = c->v[i].step - a_last;
			a_last = c->v[i].step;
		}
	}
	size_t k = 0;
	for (; k < n && next + k <= INT64_MAX; k++) {
		uint64_t s = next + k;
		bool anchor = a_every && s > a_last && (s - a_last) % a_every == 0;
		keys[k] = dws_step_key(s, anchor, zst);
	}
	return k;
}

uint64_t dws_catalog_step_id(const dws_catalog *c, uint64_t step)
{
	const dws_stepfile *t = dws_catalog_find(c, step);
	if (!t)
		return 0;
	const dws_stepfile *a = dws_catalog_anchor_for(c, step);
	uint64_t id = a ? id_mix(0x616e63686f72ULL, a) : 0x62617365ULL;
	for (size_t i = 0; i < c->n && c->v[i].step <= step; i++)
		if (!a || c->v[i].step > a->step)
			id = id_mix(id, &c->v[i]);
	return id ? id : 1;
}

/* The header facts of an unchanged object, from the previous catalog; a
 * header that could not be read for a passing reason is read again. */
static bool reuse(const dws_catalog *prev, bool reread_failed, dws_stepfile *f)
{
	if (!prev)
		return false;
	for (int pass = 0; pass < 2; pass++) {
		const dws_stepfile *v = pass ? prev->stale : prev->v;
		size_t n = pass ? prev->nstale : prev->n;
		for (size_t i = 0; i < n; i++)
			if (strcmp(v[i].obj.key, f->obj.key) == 0 && strcmp(v[i].obj.ident, f->obj.ident) == 0) {
				if (reread_failed && v[i].error[0] && dws_code_transient(v[i].error_code))
					return false;
				char *key = f->obj.key;
				*f = v[i];
				f->obj.key = key;
				return true;
			}
	}
	return false;
}

void dws_catalog_opts_init(dws_catalog_opts *o)
{
	*o = (dws_catalog_opts){.size = sizeof(*o), .run_tolerance_ns = 60LL * 1000000000, .format = DWS_FORMAT_AUTO};
}

/* ---- SkyRL and miles: versions from the whole listing (format.c) ---- */

/* A version of the previous catalog whose objects are all listed unchanged. */
static dws_xver *prev_version(void *ctx, const dws_object *index, uint64_t version)
{
	const dws_catalog *p = ((const dws_catalog *const *)ctx)[0], *now = ((const dws_catalog *const *)ctx)[1];
	const dws_stepfile *f = dws_catalog_find(p, version);
	if (!f || !f->xv || strcmp(f->obj.key, index->key) || strcmp(f->obj.ident, index->ident))
		return NULL;
	for (size_t i = 1; i < f->xv->nobjs; i++) {
		const dws_object *o = dws_xload_find(now->listing, now->nlisting, f->xv->objs[i].key);
		if (!o || strcmp(o->ident, f->xv->objs[i].ident) || o->size != f->xv->objs[i].size)
			return NULL;
	}
	return dws_xver_ref(f->xv);
}

/* The listing: the bucket's whole, or (reuse_listing) the previous one with
 * the objects a poll found in place of theirs. */
static int xor_listing(dws_catalog *c, const dws_catalog_opts *o, dws_error *err)
{
	const dws_catalog *prev = o ? o->prev : NULL;
	if (!(o && o->reuse_listing && prev))
		return dws_bucket_list(c->bucket, "", &c->listing, &c->nlisting, err);
	size_t n = 0;
	dws_object *v = dws_xcalloc(prev->nlisting + o->nextra + 1, sizeof(*v));
	for (size_t k = 0; k < o->nextra; k++) {
		v[n] = o->extra[k];
		v[n++].key = dws_xstrdup(o->extra[k].key);
	}
	for (size_t k = 0; k < prev->nlisting; k++) {
		bool dup = false;
		for (size_t x = 0; x < o->nextra && !dup; x++)
			dup = !strcmp(o->extra[x].key, prev->listing[k].key);
		if (dup)
			continue;
		v[n] = prev->listing[k];
		v[n++].key = dws_xstrdup(prev->listing[k].key);
	}
	dws_objects_sort(v, n);
	c->listing = v;
	c->nlisting = n;
	return DWS_OK;
}

static int load_xor(dws_catalog *c, const dws_catalog_opts *o, dws_error *err)
{
	int rc = xor_listing(c, o, err);
	if (rc)
		return rc;
	const dws_catalog *ctx[2] = {o ? o->prev : NULL, c};
	dws_xload ld = {.bucket = c->bucket, .objs = c->listing, .nobjs = c->nlisting,
			.head_missing = o && o->reuse_listing && o->prev, .prev_find = ctx[0] ? prev_version : NULL,
			.prev_ctx = ctx};
	rc = dws_xversions(dws_format_ops_of(c->format), &ld, &c->v, &c->n, err);
	for (size_t i = 0; i < c->nlisting && !c->has_base; i++)
		c->has_base = !strncmp(c->listing[i].key, "base/", 5);
	return rc;
}

/* The format of the bucket: the one asked for, the previous catalog's, or
 * what its root's listing shows. */
static int pick_format(dws_bucket *b, const dws_catalog_opts *o, dws_format *out, dws_error *err)
{
	*out = o ? o->format : DWS_FORMAT_AUTO;
	if (*out != DWS_FORMAT_AUTO)
		return DWS_OK;
	if (o && o->prev) {
		*out = o->prev->format;
		return DWS_OK;
	}
	dws_object *objs = NULL;
	size_t n = 0;
	int rc = dws_bucket_list(b, "", &objs, &n, err);
	if (!rc)
		rc = dws_format_detect(dws_bucket_uri(b), objs, n, out, err);
	dws_objects_free(objs, n);
	return rc;
}

int dws_catalog_load(dws_bucket *b, const dws_catalog_opts *opts,
		     dws_catalog **out, dws_error *err)
{
	static const char *const dirs[] = {"anchors", "deltas"};
	*out = NULL;
	if (opts && dws_opts_size(opts->size, sizeof(*opts), "dws_catalog_opts", err))
		return DWS_EINVAL;
	dws_format fmt;
	int frc = pick_format(b, opts, &fmt, err);
	if (frc)
		return frc;
	if (dws_format_ops_of(fmt)) {
		dws_catalog *c = dws_xcalloc(1, sizeof(*c));
		c->bucket = b;
		c->format = fmt;
		frc = load_xor(c, opts, err);
		if (frc) {
			dws_catalog_free(c);
			return frc;
		}
		*out = c;
		return DWS_OK;
	}
	int64_t tol = opts ? opts->run_tolerance_ns : 60LL * 1000000000;
	dws_stepfile *all = NULL;
	size_t nall = 0;
	const dws_catalog *prev = opts ? opts->prev : NULL;
	bool reuse_listing = opts && opts->reuse_listing && prev;
	for (size_t d = 0; d < DWS_ARRAY_LEN(dirs); d++) {
		dws_object *objs = NULL;
		size_t nobj = 0;
		if (reuse_listing) {
			/* the previous listing, with discovered objects replacing theirs */
			objs = dws_xcalloc(prev->n + prev->nstale + opts->nextra + 1, sizeof(*objs));
			for (size_t k = 0; k < opts->nextra; k++) {
				objs[nobj] = opts->extra[k];
				objs[nobj++].key = dws_xstrdup(opts->extra[k].key);
			}
			for (int pass = 0; pass < 2; pass++) {
				const dws_stepfile *v = pass ? prev->stale : prev->v;
				size_t n = pass ? prev->nstale : prev->n;
				for (size_t k = 0; k < n; k++) {
					bool dup = false;
					for (size_t x = 0; x < opts->nextra; x++)
						dup |= !strcmp(opts->extra[x].key, v[k].obj.key);
					if (dup)
						continue;
					objs[nobj] = v[k].obj;
					objs[nobj++].key = dws_xstrdup(v[k].obj.key);
				}
			}
		} else {
			int rc = dws_bucket_list(b, dirs[d], &objs, &nobj, err);
			if (rc) {
				for (size_t i = 0; i < nall; i++)
					free(all[i].obj.key);
				free(all);
				return rc;
			}
		}
		size_t dl = strlen(dirs[d]);
		for (size_t i = 0; i < nobj; i++) {
			const char *key = objs[i].key;
			uint64_t step;
			bool zst;
			if (strncmp(key, dirs[d], dl) != 0 || key[dl] != '/' || strchr(key + dl + 1, '/') ||
			    !dws_parse_step_name(key + dl + 1, &step, &zst))
				continue; /* not a step file: ignored */
			dws_stepfile f = {0};
			f.step = step;
			f.obj = objs[i];
			f.obj.key = dws_xstrdup(key);
			f.compressed = zst;
			f.in_anchors = d == 0;
			f.parent_step = -1;
			if (!reuse(prev, opts && opts->reread_failed, &f))
				sniff(b, &f);
			push(&all, &nall, &f);
		}
		dws_objects_free(objs, nobj);
	}
	dws_catalog *c = dws_xcalloc(1, sizeof(*c));
	c->bucket = b;
	c->format = DWS_FORMAT_TRL;
	/* completeness first (it decides ties), then again within the run */
	mark_complete(all, nall);
	select_run(c, all, nall, tol);
	free(all);
	mark_complete(c->v, c->n);

	dws_object *bo = NULL;
	size_t nb = 0;
	if (reuse_listing) {
		c->has_base = prev->has_base;
	} else if (dws_bucket_list(b, "base", &bo, &nb, err) == DWS_OK) {
		c->has_base = nb > 0;
		dws_objects_free(bo, nb);
	} else {
		dws_catalog_free(c);
		return dws_code_of(err, DWS_EIO);
	}
	*out = c;
	return DWS_OK;
}
