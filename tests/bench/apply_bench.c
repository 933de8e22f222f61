/* apply_bench: how fast dwsfs turns a chain of sparse deltas into patches.
 *
 *   apply_bench BUCKET [--reps N]
 *
 * Loads the catalog, the header of the anchor that the last step builds on,
 * and every sparse delta after that anchor into memory (not timed). Then,
 * N times (default 3), times two figures:
 *
 *   decode_merge: for each delta in order, dws_st_parse + dws_delta_decode
 *     (resolving names to the anchor's tensors) and dws_patchset_add of each
 *     param into that tensor's patch, as the step builder does. Rate: changed
 *     elements of the chain (sum over deltas) per second.
 *   scatter: the final merged patches applied to a dense BF16 buffer per
 *     tensor (dst[idx[k]] = val[k]), as the read path does. Rate: merged
 *     patch entries per second (and also chain elements per second).
 *
 * Diagnostics (where the decode+merge time goes): the same pass without the
 * merge (decode only), the entries appended to patch runs in total (its
 * output sizes: the accumulated patch is rewritten by every delta), and the
 * page faults and user/system CPU of the decode+merge passes.
 *
 * Prints key=value lines (medians over the reps, plus min and max).
 */
#include "delta.h"
#include "step.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct delta_file {
	uint64_t step;
	char *what;
	unsigned char *data;
	size_t len;
	dws_variant variant;
} delta_file;

typedef struct tensor_ref {
	const char *name;
	uint64_t numel;
} tensor_ref;

typedef struct resolver {
	dws_strmap by_name;
	const tensor_ref *t;
} resolver;

static int resolve(void *ctx, const char *name, size_t *slot, uint64_t *numel)
{
	const resolver *r = ctx;
	if (!dws_strmap_get(&r->by_name, name, slot))
		return -1;
	*numel = r->t[*slot].numel;
	return 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void die(const char *what, const dws_error *err)
{
	fprintf(stderr, "apply_bench: %s: %s\n", what, err->msg);
	exit(1);
}

/* One timed pass of decode + merge over the chain; fills patch[] (one per
 * tensor, NULL when untouched) and returns the chain's changed elements. */
static uint64_t decode_merge(const delta_file *df, size_t nd, resolver *r,
			     dws_patchset **patch, uint64_t *written)
{
	uint64_t elems = 0;
	for (size_t d = 0; d < nd; d++) {
		dws_error err = {0};
		dws_st_file *st = NULL;
		uint64_t need = 0;
		int rc = dws_st_parse(df[d].data, df[d].len, df[d].len, df[d].what, &st, &need, &err);
		if (rc)
			die(df[d].what, &err);
		dws_delta_param *ps = NULL;
		size_t np = 0;
		uint64_t ds = dws_st_data_start(st);
		/* as the step builder does: one arena per file for its runs */
		uint64_t total = dws_delta_value_count(st, df[d].variant);
		dws_arena *arena = patch ? dws_arena_new((size_t)total * 6) : NULL;
		uint32_t *idx_pool = arena ? arena->mem : NULL;
		uint16_t *val_pool = arena ? (uint16_t *)(void *)(idx_pool + total) : NULL;
		rc = dws_delta_decode_pool(st, df[d].data + ds, df[d].len - ds, df[d].variant, df[d].what, resolve, r, idx_pool,
					   &ps, &np, &err);
		if (rc)
			die(df[d].what, &err);
		uint64_t at = 0;
		for (size_t i = 0; i < np; i++) {
			uint64_t first = at;
			at += ps[i].count;
			if (!ps[i].count)
				continue;
			elems += ps[i].count;
			if (!patch)
				continue; /* decode only */
			/* the decoded run is appended, its values beside its indices */
			uint16_t *val = val_pool + first;
			memcpy(val, ps[i].val, ps[i].count * sizeof(uint16_t));
			dws_patch *run = dws_patch_new_in(arena, ps[i].idx, val, (uint32_t)ps[i].count);
			dws_patchset *m = dws_patchset_add(patch[ps[i].slot], run, r->t[ps[i].slot].numel);
			dws_patchset_unref(patch[ps[i].slot]);
			patch[ps[i].slot] = m;
			*written += ps[i].count;
		}
		dws_arena_unref(arena);
		dws_delta_free(ps, np);
		dws_st_free(st);
	}
	return elems;
}

int main(int argc, char **argv)
{
	const char *uri = NULL;
	int reps = 3;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--reps") && i + 1 < argc)
			reps = atoi(argv[++i]);
		else if (argv[i][0] != '-' && !uri)
			uri = argv[i];
		else {
			fprintf(stderr, "usage: apply_bench BUCKET [--reps N]\n");
			return 2;
		}
	}
	if (!uri || reps < 1) {
		fprintf(stderr, "usage: apply_bench BUCKET [--reps N]\n");
		return 2;
	}

	/* ---- untimed: catalog, anchor header, delta bytes ---- */
	dws_error err = {0};
	dws_bucket *b = NULL;
	dws_catalog *cat = NULL;
	if (dws_bucket_open(uri, &b, &err) || dws_catalog_load(b, NULL, &cat, &err))
		die(uri, &err);
	size_t nc = dws_catalog_count(cat);
	if (!nc) {
		fprintf(stderr, "apply_bench: %s: no steps\n", uri);
		return 1;
	}
	uint64_t last = dws_catalog_at(cat, nc - 1)->step;
	const dws_stepfile *anchor = dws_catalog_anchor_for(cat, last);
	if (!anchor) {
		fprintf(stderr, "apply_bench: %s: no complete anchor before step %llu\n", uri, (unsigned long long)last);
		return 1;
	}
	dws_blob *ab = NULL;
	dws_st_file *ast = NULL;
	if (dws_bucket_open_blob(b, &anchor->obj, &ab, &err) || dws_st_read_blob(ab, anchor->obj.key, &ast, &err))
		die(anchor->obj.key, &err);
	size_t nt = dws_st_count(ast);
	tensor_ref *tr = dws_xcalloc(nt, sizeof(*tr));
	resolver r = {.t = tr};
	dws_strmap_init(&r.by_name);
	uint64_t anchor_elems = 0;
	for (size_t i = 0; i < nt; i++) {
		const dws_st_tensor *t = dws_st_at(ast, i);
		if (t->dtype != DWS_DT_BF16) {
			fprintf(stderr, "apply_bench: %s: tensor %s is %s, this bench wants BF16\n", anchor->obj.key, t->name,
				dws_dtype_name(t->dtype));
			return 1;
		}
		tr[i] = (tensor_ref){t->name, t->numel};
		dws_strmap_put(&r.by_name, t->name, i);
		anchor_elems += t->numel;
	}

	delta_file *df = dws_xcalloc(nc, sizeof(*df));
	size_t nd = 0;
	uint64_t delta_bytes = 0;
	for (size_t i = 0; i < nc; i++) {
		const dws_stepfile *f = dws_catalog_at(cat, i);
		if (f->step <= anchor->step)
			continue;
		if (f->variant == DWS_VAR_DENSE || f->compressed || f->error[0]) {
			fprintf(stderr, "apply_bench: %s: only plain sparse deltas after the anchor are supported%s%s\n", f->obj.key,
				f->error[0] ? ": " : "", f->error);
			return 1;
		}
		dws_blob *db = NULL;
		void *data = NULL;
		size_t len = 0;
		if (dws_bucket_open_blob(b, &f->obj, &db, &err) || dws_blob_slurp(db, UINT64_MAX, &data, &len, &err))
			die(f->obj.key, &err);
		dws_blob_unref(db);
		df[nd++] = (delta_file){f->step, dws_xstrdup(f->obj.key), data, len, f->variant};
		delta_bytes += len;
	}
	if (!nd) {
		fprintf(stderr, "apply_bench: %s: no deltas after the anchor at step %llu\n", uri, (unsigned long long)anchor->step);
		return 1;
	}

	/* dense targets for the scatter, faulted in before timing */
	uint16_t **dense = dws_xcalloc(nt, sizeof(*dense));
	for (size_t i = 0; i < nt; i++) {
		dense[i] = dws_xmalloc(tr[i].numel * 2 + 2);
		memset(dense[i], 0, tr[i].numel * 2 + 2);
	}

	/* one untimed warm-up pass (allocator, page faults of the patch arrays) */
	dws_patchset **patch = dws_xcalloc(nt, sizeof(*patch));
	uint64_t written = 0;
	decode_merge(df, nd, &r, patch, &written);
	for (size_t i = 0; i < nt; i++) {
		dws_patchset_unref(patch[i]);
		patch[i] = NULL;
	}

	double *t_dm = dws_xcalloc((size_t)reps, sizeof(double));
	double *t_sc = dws_xcalloc((size_t)reps, sizeof(double));
	double *t_dec = dws_xcalloc((size_t)reps, sizeof(double));
	uint64_t chain = 0, merged = 0, sum = 0;
	long minflt = 0;
	double utime = 0, stime = 0;
	for (int rep = 0; rep < reps; rep++) {
		double td = now();
		decode_merge(df, nd, &r, NULL, NULL);
		t_dec[rep] = now() - td;
		struct rusage ru0, ru1;
		getrusage(RUSAGE_SELF, &ru0);
		written = 0;
		double t0 = now();
		chain = decode_merge(df, nd, &r, patch, &written);
		double t1 = now();
		getrusage(RUSAGE_SELF, &ru1);
		minflt += ru1.ru_minflt - ru0.ru_minflt;
		utime += (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + 1e-6 * (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec);
		stime += (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + 1e-6 * (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec);
		merged = 0;
		for (size_t i = 0; i < nt; i++) {
			const dws_patchset *p = patch[i];
			if (!p)
				continue;
			dws_patchset_apply_bf16(p, 0, tr[i].numel, dense[i]);
			merged += p->entries;
		}
		double t2 = now();
		t_dm[rep] = t1 - t0;
		t_sc[rep] = t2 - t1;
		/* untimed: keep the stores observable, free the patches */
		for (size_t i = 0; i < nt; i++) {
			if (patch[i] && patch[i]->runs[0]->n)
				sum += dense[i][patch[i]->runs[0]->idx[patch[i]->runs[0]->n / 2]];
			dws_patchset_unref(patch[i]);
			patch[i] = NULL;
		}
	}

	double dm_min = t_dm[0], dm_max = t_dm[0], sc_min = t_sc[0], sc_max = t_sc[0];
	for (int i = 1; i < reps; i++) {
		dm_min = t_dm[i] < dm_min ? t_dm[i] : dm_min;
		dm_max = t_dm[i] > dm_max ? t_dm[i] : dm_max;
		sc_min = t_sc[i] < sc_min ? t_sc[i] : sc_min;
		sc_max = t_sc[i] > sc_max ? t_sc[i] : sc_max;
	}
	double dm = median(t_dm, reps), sc = median(t_sc, reps), dec = median(t_dec, reps);
	printf("apply_bucket=%s\n", uri);
	printf("apply_anchor_step=%llu\n", (unsigned long long)anchor->step);
	printf("apply_deltas=%zu\n", nd);
	printf("apply_delta_bytes=%llu\n", (unsigned long long)delta_bytes);
	printf("apply_anchor_elems=%llu\n", (unsigned long long)anchor_elems);
	printf("apply_chain_elems=%llu\n", (unsigned long long)chain);
	printf("apply_merged_elems=%llu\n", (unsigned long long)merged);
	printf("apply_reps=%d\n", reps);
	printf("apply_decode_merge_seconds=%.6f\n", dm);
	printf("apply_decode_merge_seconds_min=%.6f\n", dm_min);
	printf("apply_decode_merge_seconds_max=%.6f\n", dm_max);
	printf("apply_decode_merge_elems_per_s=%.0f\n", (double)chain / dm);
	printf("apply_scatter_seconds=%.6f\n", sc);
	printf("apply_scatter_seconds_min=%.6f\n", sc_min);
	printf("apply_scatter_seconds_max=%.6f\n", sc_max);
	printf("apply_scatter_elems_per_s=%.0f\n", (double)merged / sc);
	printf("apply_total_chain_elems_per_s=%.0f\n", (double)chain / (dm + sc));
	printf("apply_decode_only_seconds=%.6f\n", dec);
	printf("apply_decode_only_elems_per_s=%.0f\n", (double)chain / dec);
	printf("apply_merge_entries_written=%llu\n", (unsigned long long)written);
	printf("apply_merge_write_amplification=%.2f\n", (double)written / (double)chain);
	printf("apply_decode_merge_minflt_per_rep=%ld\n", minflt / reps);
	printf("apply_decode_merge_user_seconds_per_rep=%.3f\n", utime / reps);
	printf("apply_decode_merge_sys_seconds_per_rep=%.3f\n", stime / reps);
	printf("apply_checksum=%llu\n", (unsigned long long)sum);

	for (size_t i = 0; i < nd; i++) {
		free(df[i].data);
		free(df[i].what);
	}
	for (size_t i = 0; i < nt; i++)
		free(dense[i]);
	free(dense);
	free(patch);
	free(t_dm);
	free(t_sc);
	free(t_dec);
	free(df);
	dws_strmap_free(&r.by_name);
	free(tr);
	dws_st_free(ast);
	dws_blob_unref(ab);
	dws_catalog_free(cat);
	dws_bucket_close(b);
	return 0;
}
