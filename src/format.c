/* The formats dwsfs reads (see format.h): their names, which one a listing
 * holds, and the versions of an XOR format's listing in order. */
#include "format.h"

#include <stdlib.h>
#include <string.h>

static const char *const format_names[] = {"trl", "skyrl", "miles"};

bool dws_format_parse(const char *s, dws_format *out)
{
	if (s && !strcmp(s, "auto")) {
		*out = DWS_FORMAT_AUTO;
		return true;
	}
	for (size_t i = 0; s && i < DWS_ARRAY_LEN(format_names); i++)
		if (!strcmp(s, format_names[i])) {
			*out = (dws_format)i;
			return true;
		}
	return false;
}

const char *dws_format_name(dws_format f)
{
	return f >= 0 && (size_t)f < DWS_ARRAY_LEN(format_names) ? format_names[f] : "auto";
}

const struct dws_format_ops *dws_format_ops_of(dws_format f)
{
	return f == DWS_FORMAT_SKYRL ? &dws_fmt_skyrl : f == DWS_FORMAT_MILES ? &dws_fmt_miles : NULL;
}

/* TRL's step files: anchors/ or deltas/ directly. */
static bool is_trl_key(const char *key)
{
	uint64_t step;
	bool zst;
	for (int d = 0; d < 2; d++) {
		const char *dir = d ? "deltas/" : "anchors/";
		size_t n = strlen(dir);
		if (!strncmp(key, dir, n) && !strchr(key + n, '/') && dws_parse_step_name(key + n, &step, &zst))
			return true;
	}
	return false;
}

int dws_format_detect(const char *uri, const dws_object *objs, size_t n, dws_format *out, dws_error *err)
{
	const struct dws_format_ops *xf[] = {&dws_fmt_skyrl, &dws_fmt_miles};
	const char *seen[3] = {NULL, NULL, NULL}; /* a key of each format */
	for (size_t i = 0; i < n; i++) {
		uint64_t v;
		if (!seen[0] && is_trl_key(objs[i].key))
			seen[0] = objs[i].key;
		for (size_t k = 0; k < DWS_ARRAY_LEN(xf); k++)
			if (!seen[k + 1] && xf[k]->is_index(objs[i].key, &v))
				seen[k + 1] = objs[i].key;
	}
	*out = DWS_FORMAT_TRL;
	int found = -1;
	for (int k = 0; k < 3; k++) {
		if (!seen[k])
			continue;
		if (found >= 0)
			return dws_fail(err, DWS_EINVAL, "%s: holds both %s files ('%s') and %s files ('%s'): say which with -o format= (dwsctl --format)",
					uri, format_names[found], seen[found], format_names[k], seen[k]);
		found = k;
	}
	if (found > 0)
		*out = (dws_format)found;
	return DWS_OK;
}


/* ---- the versions of a listing ---- */

struct idx_ref {
	uint64_t version;
	const dws_object *obj;
};

static int cmp_idx(const void *a, const void *b)
{
	const struct idx_ref *x = a, *y = b;
	return x->version < y->version ? -1 : x->version > y->version;
}

/* Version found (OK or BAD) as a catalog entry. */
static dws_stepfile as_stepfile(const dws_xfound *fd)
{
	dws_stepfile f = {0};
	f.step = fd->version;
	f.obj = fd->index;
	f.obj.key = dws_xstrdup(fd->index.key);
	f.parent_step = -1;
	f.xv = fd->v;
	if (fd->state != DWS_XV_OK) {
		snprintf(f.error, sizeof(f.error), "%s", fd->error);
		f.error_code = fd->code ? fd->code : DWS_EFORMAT;
		f.variant = DWS_VAR_XOR;
		return f;
	}
	const dws_xver *v = fd->v;
	f.variant = v->full ? DWS_VAR_DENSE : v->nrecs && v->recs[0].enc == DWS_XENC_OVERWRITE ? DWS_VAR_OVERWRITE : DWS_VAR_XOR;
	f.complete = v->full;
	f.in_anchors = v->full;
	f.nparams = v->nrecs;
	for (size_t i = 0; i < v->nrecs; i++)
		f.changed += v->recs[i].nbytes;
	return f;
}

int dws_xversions(const struct dws_format_ops *fo, const dws_xload *ld, dws_stepfile **out, size_t *nout,
		  dws_error *err)
{
	(void)err;
	struct idx_ref *ix = dws_xcalloc(ld->nobjs ? ld->nobjs : 1, sizeof(*ix));
	size_t n = 0;
	for (size_t i = 0; i < ld->nobjs; i++)
		if (fo->is_index(ld->objs[i].key, &ix[n].version))
			ix[n++].obj = &ld->objs[i];
	if (n)
		qsort(ix, n, sizeof(*ix), cmp_idx);
	dws_stepfile *v = NULL;
	size_t nv = 0;
	/* a chain starts at version 1 (on the base) or at a full version; a
	 * gap or a version not complete yet ends it, up to the next full one */
	bool ok = true;
	uint64_t expect = 1;
	for (size_t i = 0; i < n; i++) {
		if (ix[i].version != expect)
			ok = false;
		expect = ix[i].version + 1;
		if (!ok && fo->id == DWS_FORMAT_SKYRL)
			break; /* nothing after a gap: SkyRL has no full versions */
		dws_xfound fd = {.version = ix[i].version, .index = *ix[i].obj};
		fd.v = ld->prev_find ? ld->prev_find(ld->prev_ctx, ix[i].obj, ix[i].version) : NULL;
		if (fd.v)
			fd.state = DWS_XV_OK;
		else
			fo->read(ld, ix[i].obj, ix[i].version, &fd);
		if (fd.state == DWS_XV_OK && fd.v->full)
			ok = true;
		if (fd.state == DWS_XV_INCOMPLETE)
			ok = false;
		if (!ok || fd.state == DWS_XV_INCOMPLETE) {
			dws_xver_unref(fd.v);
			continue;
		}
		v = dws_xrealloc(v, (nv + 1) * sizeof(*v));
		v[nv++] = as_stepfile(&fd);
	}
	free(ix);
	*out = v;
	*nout = nv;
	return DWS_OK;
}
