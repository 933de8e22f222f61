/* Unit tests of the core, without a mount. Each check names what it tests;
 * the last line is "N passed, N failed". */
#include "bucket.h"
#include "check.h"
#include "delta.h"
#include "remote.h"
#include "step.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>


/* ---- dtypes ---- */

static void test_dtypes(void)
{
	int bad = 0;
#if defined(__FLT16_MAX__) && !defined(__clang__)
	/* every BF16 value against the compiler's own F32 -> F16 conversion */
	for (uint32_t b = 0; b < 65536; b++) {
		float f = dws_bf16_to_f32((uint16_t)b);
		if (f != f)
			continue; /* NaN payloads may differ; NaN-ness is checked below */
		_Float16 h = (_Float16)f;
		uint16_t want;
		memcpy(&want, &h, 2);
		if (dws_bf16_to_f16((uint16_t)b) != want && bad++ < 3)
			fprintf(stderr, "bf16 %04x: got %04x want %04x\n", b, dws_bf16_to_f16((uint16_t)b), want);
	}
	CHECK(bad == 0, "bf16->f16 matches _Float16 for all finite values (%d bad)", bad);
#endif
	uint16_t nan = dws_bf16_to_f16(0x7fc1);
	CHECK((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff), "NaN stays NaN");
	CHECK(dws_f32_to_bf16(1.0f) == 0x3f80, "f32->bf16 1.0");
	/* 1 + 2^-8 is a tie between 1.0 and 1+2^-7: to even (1.0) */
	CHECK(dws_f32_to_bf16(1.00390625f) == 0x3f80, "f32->bf16 tie to even");
	CHECK(dws_f32_to_bf16(1.01171875f) == 0x3f82, "f32->bf16 tie to even, odd");
	CHECK(dws_dtype_parse("BF16") == DWS_DT_BF16 && dws_dtype_parse("bf16") == DWS_DT_INVALID, "dtype names are exact");
	CHECK(dws_dtype_size(DWS_DT_F64) == 8 && dws_dtype_size(DWS_DT_INVALID) == 0, "dtype sizes");
}

/* ---- names ---- */

static void test_names(void)
{
	uint64_t s;
	bool z;
	CHECK(dws_parse_step_name("step_000123.safetensors", &s, &z) && s == 123 && !z, "six digits");
	CHECK(dws_parse_step_name("step_1000000.safetensors.zst", &s, &z) && s == 1000000 && z, "seven digits, zst");
	CHECK(!dws_parse_step_name("step_12.safetensors", &s, &z), "fewer than six digits");
	CHECK(!dws_parse_step_name("step_0000012.safetensors", &s, &z), "seven digits with a leading zero");
	CHECK(!dws_parse_step_name("step_00001a.safetensors", &s, &z), "non-digit");
	CHECK(!dws_parse_step_name("step_000001.safetensors.tmp", &s, &z), "other suffix");
	CHECK(!dws_parse_step_name("step_99999999999999999999.safetensors", &s, &z), "overflow");
	CHECK(dws_key_is_safe("a/b.json") && dws_key_is_safe("x"), "safe keys");
	CHECK(!dws_key_is_safe("../x") && !dws_key_is_safe("a/../b") && !dws_key_is_safe("/abs") &&
		      !dws_key_is_safe("a//b") && !dws_key_is_safe("a/./b") && !dws_key_is_safe("a/") && !dws_key_is_safe(""),
	      "unsafe keys");
}

/* ---- safetensors ---- */

static size_t mkst(unsigned char *buf, const char *json, size_t data_len)
{
	size_t jl = strlen(json);
	for (int i = 0; i < 8; i++)
		buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
	memcpy(buf + 8, json, jl);
	memset(buf + 8 + jl, 0, data_len);
	return 8 + jl + data_len;
}

static int parse_json(const char *json, size_t data_len, dws_error *e)
{
	unsigned char buf[4096];
	size_t n = mkst(buf, json, data_len);
	dws_st_file *f = NULL;
	memset(e, 0, sizeof(*e));
	int rc = dws_st_parse(buf, n, n, "t.safetensors", &f, NULL, e);
	dws_st_free(f);
	return rc;
}

static void test_safetensors(void)
{
	dws_error e;
	CHECK(parse_json("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},\"__metadata__\":{\"k\":\"v\"}}", 12, &e) == 0,
	      "valid header: %s", e.msg);
	CHECK(parse_json("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}    ", 12, &e) == 0, "space padding");
	struct {
		const char *json, *reason;
		size_t data;
	} bad[] = {
		{"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", "outside", 11},
		{"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,10]}}", "size mismatch", 12},
		{"{\"a\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,1]}}", "unknown dtype", 4},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", "shape", 4},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}", "overlap", 8},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,0]}}", "end before", 8},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", "invalid JSON", 8},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", "overflow", 8},
		{"{\"__metadata__\":{\"k\":1}}", "metadata", 0},
		{"[1,2]", "invalid JSON", 0},
		{"{\"a\":", "invalid JSON", 0},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", "invalid JSON", 1},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", "shape", 1},
		{"{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,99999999999999999999]}}", "invalid JSON", 1},
	};
	for (size_t i = 0; i < DWS_ARRAY_LEN(bad); i++) {
		int rc = parse_json(bad[i].json, bad[i].data, &e);
		CHECK(rc == DWS_EFORMAT && strstr(e.msg, bad[i].reason) && strstr(e.msg, "t.safetensors") && !strchr(e.msg, '\n'),
		      "bad header %zu rejected with '%s': rc=%d msg=%s", i, bad[i].reason, rc, e.msg);
	}
	/* header length past the end, huge, and a short file */
	unsigned char buf[64] = {0};
	dws_st_file *f = NULL;
	buf[0] = 200;
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_parse(buf, 64, 64, "t", &f, NULL, &e) == DWS_EFORMAT && strstr(e.msg, "past the end"), "length past end: %s", e.msg);
	memset(buf, 0xff, 8);
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_parse(buf, 64, 64, "t", &f, NULL, &e) == DWS_EFORMAT && strstr(e.msg, "cap"), "huge length: %s", e.msg);
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_parse(buf, 5, 5, "t", &f, NULL, &e) == DWS_EFORMAT && strstr(e.msg, "truncated"), "short file: %s", e.msg);
	/* a prefix that stops inside the header asks for more */
	unsigned char big[256];
	size_t n = mkst(big, "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2);
	uint64_t need = 0;
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_parse(big, 20, n, "t", &f, &need, &e) == 1 && need == n - 2, "need more: %llu", (unsigned long long)need);

	/* writer -> parser round trip */
	uint64_t sh1[] = {3, 4}, sh2[] = {5};
	dws_st_out_tensor ts[] = {{"w", DWS_DT_F32, 2, sh1, 48}, {"b", DWS_DT_BF16, 1, sh2, 10}};
	dws_st_meta md[] = {{"format", "x"}};
	char *hdr = NULL;
	size_t hl = 0;
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_build_header(ts, 2, md, 1, &hdr, &hl, &e) == 0 && hl % 8 == 0, "writer");
	unsigned char *file = calloc(1, hl + 58);
	memcpy(file, hdr, hl);
	CHECK(dws_st_parse(file, hl + 58, hl + 58, "rt", &f, NULL, &e) == 0, "round trip parses: %s", e.msg);
	if (f) {
		const dws_st_tensor *b = dws_st_find(f, "b");
		CHECK(b && b->begin == 48 && b->end == 58 && b->numel == 5 && dws_st_count(f) == 2, "round trip layout");
		CHECK(dws_st_meta_get(f, "format") && !strcmp(dws_st_meta_get(f, "format"), "x"), "round trip metadata");
		dws_st_free(f);
	}
	free(file);
	free(hdr);
}

/* ---- a file's end: no trailing bytes, .zst read to exactly its declared size ---- */

static dws_blob *zst_blob(const unsigned char *p, size_t n)
{
	size_t cap = ZSTD_compressBound(n);
	void *z = dws_xmalloc(cap);
	size_t zn = ZSTD_compress(z, cap, p, n, 3);
	return dws_blob_from_memory("t.safetensors.zst", z, ZSTD_isError(zn) ? 0 : zn);
}

static void test_file_end(void)
{
	const char *json = "{\"a\":{\"dtype\":\"U8\",\"shape\":[12],\"data_offsets\":[0,12]}}";
	dws_error e;
	CHECK(parse_json(json, 13, &e) == DWS_EFORMAT && strstr(e.msg, "trailing data: 1 bytes"), "a byte past the last tensor: %s", e.msg);
	unsigned char buf[256];
	size_t n = mkst(buf, json, 12);
	dws_st_file *f = NULL;
	memset(&e, 0, sizeof(e));
	CHECK(dws_st_parse(buf, n - 12, DWS_ST_SIZE_UNKNOWN, "t", &f, NULL, &e) == 0 && dws_st_data_end(f) == 12,
	      "a header alone, size unknown: %s", e.msg);
	dws_st_free(f);
	/* exactly n bytes; one more (a zstd bomb's zeros); one less */
	for (int extra = -1; extra <= 1; extra++) {
		memset(buf + n, 0, 4);
		dws_blob *z = zst_blob(buf, n + extra);
		uint64_t size = 0;
		memset(&e, 0, sizeof(e));
		int rc = dws_zstd_st_header(z, &f, &size, &e);
		dws_st_free(f);
		CHECK(rc == 0 && size == n, "header of a .zst: %llu bytes declared: %s", (unsigned long long)size, e.msg);
		unsigned char out[256];
		memset(&e, 0, sizeof(e));
		rc = dws_zstd_st_read(z, out, size, &e);
		const char *want = extra < 0 ? "truncated" : extra > 0 ? "trailing" : NULL;
		CHECK(want ? rc == DWS_EFORMAT && strstr(e.msg, want) && strstr(e.msg, "t.safetensors.zst") : rc == 0 && !memcmp(out, buf, n),
		      "%+d byte: %s", extra, e.msg);
		dws_blob_unref(z);
	}
	/* a decompressed copy's folder is made (private) when missing */
	char tmpl[] = "/tmp/dwsfs-unit-XXXXXX";
	char *dir = mkdtemp(tmpl);
	char *sub = dws_xasprintf("%s/a/b", dir);
	dws_blob *z = zst_blob(buf, n), *out = NULL;
	memset(&e, 0, sizeof(e));
	struct stat st;
	CHECK(dws_zstd_st_file(z, sub, n, &out, &e) == 0 && dws_blob_size(out) == n && stat(sub, &st) == 0 &&
		      (st.st_mode & 0777) == 0700, "temp folder made: %s", e.msg);
	dws_blob_unref(out);
	dws_blob_unref(z);
	rmdir(sub);
	free(sub);
	sub = dws_xasprintf("%s/a", dir);
	rmdir(sub);
	free(sub);
	rmdir(dir);
}

/* ---- patch merge ---- */

static uint32_t rng = 12345;
static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng;
}

/* A run over elements [0, n), each changed with odds 1 in one_in to a random
 * value, which is also recorded in replay[]. */
static dws_patch *random_run(uint32_t n, unsigned one_in, int32_t *replay)
{
	uint32_t *idx = dws_xmalloc(n * sizeof(uint32_t));
	uint16_t *val = dws_xmalloc(n * sizeof(uint16_t));
	uint32_t m = 0;
	for (uint32_t i = 0; i < n; i++)
		if (rnd() % one_in == 0) {
			idx[m] = i;
			val[m] = (uint16_t)rnd();
			replay[i] = val[m++];
		}
	return dws_patch_new_owned(idx, val, m);
}

/* Apply ps to elements [e0, e0+cnt) of an n-element tensor whose other
 * bytes read 0xdead: the elements that differ from the replay want[] (-1:
 * never patched, so 0xdead), inside the window or out of it. */
static int window_bad(const dws_patchset *ps, const int32_t *want, uint16_t *out, uint32_t n, uint64_t e0,
		      uint64_t cnt)
{
	int bad = 0;
	for (uint32_t i = 0; i < n; i++)
		out[i] = 0xdead & 0xffff;
	dws_patchset_apply_bf16(ps, e0, cnt, out + e0);
	for (uint64_t i = 0; i < n; i++) {
		bool in = i >= e0 && i < e0 + cnt;
		if (out[i] != (in && want[i] >= 0 ? (uint16_t)want[i] : 0xdead))
			bad++;
	}
	return bad;
}

/* Runs appended per delta, compacted past DWS_MAX_RUNS: applying the set
 * equals replaying every delta in order, before and after compaction. */
static void test_patchset(void)
{
	enum { N = 4000, ROUNDS = DWS_MAX_RUNS * 2 + 5 };
	static int32_t naive[N];
	static uint16_t got[N];
	for (int i = 0; i < N; i++)
		naive[i] = -1;
	dws_patchset *ps = NULL;
	int bad = 0;
	bool compacted = false;
	for (int round = 0; round < ROUNDS; round++) {
		dws_patchset *next = dws_patchset_add(ps, random_run(N, 23, naive), N);
		dws_patchset_unref(ps);
		ps = next;
		compacted |= ps->nruns == 1 && round > 0;
		if (ps->nruns > DWS_MAX_RUNS)
			bad++;
		for (uint32_t i = 0; i < N; i++)
			got[i] = 0xdead & 0xffff;
		dws_patchset_apply_bf16(ps, 0, N, got);
		for (uint32_t i = 0; i < N; i++)
			if (naive[i] >= 0 && got[i] != (uint16_t)naive[i])
				bad++;
		/* a window in the middle sees the same values */
		dws_patchset_apply_bf16(ps, 1000, 500, got + 1000);
		for (uint32_t i = 1000; i < 1500; i++)
			if (naive[i] >= 0 && got[i] != (uint16_t)naive[i])
				bad++;
	}
	CHECK(bad == 0, "patch set equals naive replay (%d bad)", bad);
	CHECK(compacted, "compaction happened past %d runs", DWS_MAX_RUNS);
	dws_patchset_unref(ps);

	/* background compaction: the tiered pick and the splice keep the same
	 * values and few runs; dense enough, runs turn into bitmaps, applied by
	 * masked stores or the portable path, at any window */
	enum { D = 10007 };
	static int32_t want[D];
	static uint16_t out[D];
	for (int i = 0; i < D; i++)
		want[i] = -1;
	ps = NULL;
	uint32_t most = 0, merges = 0, dense = 0;
	for (int round = 0; round < 100; round++) {
		dws_patchset *next = dws_patchset_add(ps, random_run(D, 53, want), D);
		dws_patchset_unref(ps);
		ps = next;
		uint32_t j, k;
		while (dws_patchset_pick(ps, D, &j, &k)) {
			dws_patch *one = dws_patch_compact(ps->runs + j, k, D, NULL);
			next = dws_patchset_splice(ps, j, k, one);
			dws_patch_unref(one);
			dws_patchset_unref(ps);
			ps = next;
			merges++;
		}
		if (ps->nruns > most)
			most = ps->nruns;
		for (uint32_t r = 0; r < ps->nruns; r++) {
			dense += ps->runs[r]->bits != NULL;
			if (!ps->runs[r]->bits)
				for (uint32_t i = 1; i < ps->runs[r]->n; i++)
					if (ps->runs[r]->idx[i] <= ps->runs[r]->idx[i - 1])
						bad++;
		}
		for (int simd = 0; simd < 2; simd++) {
			dws_patch_simd(simd);
			uint64_t e0 = rnd() % 200, cnt = D - e0 - rnd() % 200;
			bad += window_bad(ps, want, out, D, e0, cnt);
		}
	}
	dws_patch_simd(true);
	CHECK(bad == 0, "tiered compaction keeps the replayed values at any window, SIMD or not (%d bad)", bad);
	CHECK(merges > 10 && most <= 12, "tiered compaction: %u merges, at most %u runs over 100 deltas", merges, most);
	CHECK(dense > 0, "dense runs appeared (%u run-rounds)", dense);
	/* a sparse run from the synchronous compaction above is checked below */
	dws_patchset_unref(ps);
	ps = NULL;
	{
		uint32_t *idx = dws_xmalloc(3 * sizeof(uint32_t));
		uint16_t *val = dws_xmalloc(3 * sizeof(uint16_t));
		idx[0] = 1, idx[1] = 5, idx[2] = 9, val[0] = val[1] = val[2] = 7;
		ps = dws_patchset_add(NULL, dws_patch_new_owned(idx, val, 3), N);
	}
	const dws_patch *one = ps->runs[0];
	for (uint32_t i = 1; i < one->n; i++)
		if (one->idx[i] <= one->idx[i - 1])
			bad++;
	CHECK(bad == 0, "compacted run strictly ascending");
	dws_patchset_unref(ps);
}

/* A build applying many files (dws_patchset_add_build): past a third of the
 * elements the runs become one dense run, later runs are folded into it in
 * batches, the end of the build folds what is pending; values equal the
 * replay at every step, and a set somebody else holds (a published step) is
 * never changed in place. */
static void test_patchset_build(void)
{
	enum { D = 100003, FILES = 60, KEEP_AT = 45 };
	static int32_t want[D], kept_want[D];
	static uint16_t out[D];
	for (int i = 0; i < D; i++)
		want[i] = -1;
	uint64_t mem0 = dws_patch_memory();
	dws_patchset *ps = NULL, *kept = NULL;
	dws_patch *own = NULL;
	int bad = 0, dense_at = -1, folds = 0;
	uint32_t most = 0;
	for (int f = 0; f < FILES; f++) {
		uint32_t before = ps ? ps->nruns : 0;
		dws_patchset *next = dws_patchset_add_build(ps, random_run(D, 100, want), D, &own);
		dws_patchset_unref(ps);
		ps = next;
		if (dense_at < 0 && ps->runs[0]->bits)
			dense_at = f;
		folds += dense_at >= 0 && f > dense_at && ps->nruns == 1 && before > 1;
		if (ps->nruns > most)
			most = ps->nruns;
		if (f == KEEP_AT) {
			/* published: held elsewhere, so the build has to leave it */
			kept = ps;
			atomic_fetch_add(&kept->refs, 1);
			memcpy(kept_want, want, sizeof(want));
		}
		uint64_t e0 = rnd() % 1000, cnt = D - e0 - rnd() % 1000;
		bad += window_bad(ps, want, out, D, e0, cnt);
	}
	CHECK(bad == 0, "build folding keeps the replayed values (%d bad)", bad);
	/* 1% a file: past a third after about 34 files (entries counted with
	 * repeats); from then on one dense run and a few pending ones */
	CHECK(dense_at >= 30 && dense_at <= 40, "dense from file %d", dense_at);
	CHECK(folds >= 1, "pending runs folded in the build (%d folds)", folds);
	CHECK(most <= 34 + 1, "at most %u runs", most);
	/* the set kept at KEEP_AT: not own any more, so later files appended
	 * (new sets) rather than changed it */
	bad += window_bad(kept, kept_want, out, D, 0, D);
	CHECK(bad == 0, "a set held elsewhere is never changed by the build (%d bad)", bad);
	dws_patchset_unref(kept);
	/* the end of a build: pending runs folded, one dense run left */
	dws_patchset *flushed = dws_patchset_fold_build(ps, own);
	if (flushed) {
		dws_patchset_unref(ps);
		ps = flushed;
	}
	CHECK(ps->nruns == 1 && ps->runs[0]->bits && !ps->runs[0]->full, "one dense run after the end of the build (%u runs)",
	      ps->nruns);
	uint64_t set = 0;
	for (uint32_t i = 0; i < D; i++)
		set += want[i] >= 0;
	CHECK(ps->entries == set, "entries: %llu, elements patched %llu", (unsigned long long)ps->entries,
	      (unsigned long long)set);
	bad += window_bad(ps, want, out, D, 0, D);
	CHECK(bad == 0, "values after the end of the build (%d bad)", bad);
	CHECK(dws_patchset_fold_build(ps, own) == NULL, "nothing left to fold");
	dws_patchset_unref(ps);

	/* small tensors stay sparse runs whatever the density */
	enum { S = 1000 };
	static int32_t sw[S];
	ps = NULL;
	own = NULL;
	for (int f = 0; f < 10; f++) {
		dws_patchset *next = dws_patchset_add_build(ps, random_run(S, 2, sw), S, &own);
		dws_patchset_unref(ps);
		ps = next;
	}
	CHECK(!own && ps->nruns == 10 && !ps->runs[0]->bits, "a small tensor keeps its sparse runs");
	CHECK(dws_patch_memory() > mem0, "patch memory counts the runs alive");
	dws_patchset_unref(ps);
	CHECK(dws_patch_memory() == mem0, "patch memory back where it was once every run is gone (%llu, was %llu)",
	      (unsigned long long)dws_patch_memory(), (unsigned long long)mem0);
}

/* ---- delta decoding ---- */

static int resolve_any(void *ctx, const char *name, size_t *slot, uint64_t *numel)
{
	(void)ctx;
	if (strcmp(name, "w") != 0)
		return -1;
	*slot = 7;
	*numel = 100000;
	return 0;
}

static void test_gap_delta(void)
{
	/* U32 gaps: indices 0, 70000, 70001 */
	const char *json = "{\"__metadata__\":{\"sparse\":\"True\",\"encoding\":\"gap_delta\",\"total_changed_elements\":\"3\"},"
			   "\"w.idx\":{\"dtype\":\"U32\",\"shape\":[3],\"data_offsets\":[0,12]},"
			   "\"w.val\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[12,18]}}";
	unsigned char buf[1024];
	size_t n = mkst(buf, json, 18);
	uint32_t gaps[3] = {0, 69999, 0};
	size_t ds = n - 18;
	memcpy(buf + ds, gaps, 12);
	dws_st_file *f = NULL;
	dws_error e = {0};
	CHECK(dws_st_parse(buf, n, n, "g", &f, NULL, &e) == 0, "gap file parses: %s", e.msg);
	dws_delta_param *ps = NULL;
	size_t np = 0;
	int rc = dws_delta_decode(f, buf + ds, 18, DWS_VAR_GAP_DELTA, "g", resolve_any, NULL, &ps, &np, &e);
	CHECK(rc == 0 && np == 1 && ps[0].count == 3 && ps[0].idx[0] == 0 && ps[0].idx[1] == 70000 && ps[0].idx[2] == 70001 && ps[0].slot == 7,
	      "U32 gaps decode: %s", e.msg);
	dws_delta_free(ps, np);
	/* raw wants I32 offsets, not U32 gaps */
	memset(&e, 0, sizeof(e));
	rc = dws_delta_decode(f, buf + ds, 18, DWS_VAR_RAW, "g", resolve_any, NULL, &ps, &np, &e);
	CHECK(rc == DWS_EFORMAT && strstr(e.msg, "expected I32"), "raw: %s", e.msg);
	memset(&e, 0, sizeof(e));
	rc = dws_delta_decode(f, buf + ds, 18, DWS_VAR_NVCOMP, "g", resolve_any, NULL, &ps, &np, &e);
	CHECK(rc == DWS_EUNSUP && strstr(e.msg, "nvcomp"), "nvcomp refused: %s", e.msg);
	dws_st_free(f);
}

/* ---- catalog: run selection and numeric order over a real folder ---- */

static void put_file(const char *dir, const char *rel, const char *json, int64_t mtime_s)
{
	char *path = dws_xasprintf("%s/%s", dir, rel);
	char *d = dws_xstrdup(path);
	*strrchr(d, '/') = 0;
	mkdir(d, 0755);
	unsigned char buf[2048];
	size_t n = mkst(buf, json, 4);
	FILE *fp = fopen(path, "wb");
	fwrite(buf, 1, n, fp);
	fclose(fp);
	struct timespec ts[2] = {{mtime_s, 0}, {mtime_s, 0}};
	utimensat(AT_FDCWD, path, ts, 0);
	free(path);
	free(d);
}

static void test_catalog(void)
{
	char dir[] = "/tmp/dwsfs-unit-XXXXXX";
	if (!mkdtemp(dir)) {
		CHECK(0, "mkdtemp");
		return;
	}
	const char *dense = "{\"__metadata__\":{\"sparse\":\"False\",\"total_elements\":\"2\"},\"w\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}";
	const char *sparse = "{\"__metadata__\":{\"sparse\":\"True\",\"encoding\":\"raw\"},\"w.idx\":{\"dtype\":\"I32\",\"shape\":[0],\"data_offsets\":[0,0]},\"w.val\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[0,0]}}";
	int64_t t0 = 1700000000, restart = t0 + 3600;
	/* old run: 1..8; new run: 1..4 written an hour later */
	for (int s = 1; s <= 8; s++) {
		char rel[64];
		snprintf(rel, sizeof(rel), s == 1 ? "anchors/step_%06d.safetensors" : "deltas/step_%06d.safetensors", s);
		put_file(dir, rel, s == 1 ? dense : sparse, t0 + 10 * s);
	}
	for (int s = 1; s <= 4; s++) {
		char rel[64];
		snprintf(rel, sizeof(rel), s == 1 ? "anchors/step_%06d.safetensors" : "deltas/step_%06d.safetensors", s);
		put_file(dir, rel, s == 1 ? dense : sparse, restart + 10 * s);
	}
	/* past 999999: string order would put 1000000 first */
	put_file(dir, "deltas/step_1000000.safetensors", sparse, restart + 100);
	put_file(dir, "deltas/step_999999.safetensors", sparse, restart + 90);
	put_file(dir, "deltas/notes.txt", sparse, restart);
	dws_bucket *b = NULL;
	dws_catalog *c = NULL;
	dws_error e = {0};
	CHECK(dws_bucket_open(dir, &b, &e) == 0 && dws_catalog_load(b, NULL, &c, &e) == 0, "catalog loads: %s", e.msg);
	if (c) {
		size_t n = dws_catalog_count(c);
		CHECK(n == 6, "current run has 6 steps, got %zu", n);
		CHECK(n == 6 && dws_catalog_at(c, 3)->step == 4 && dws_catalog_at(c, 4)->step == 999999 &&
			      dws_catalog_at(c, 5)->step == 1000000,
		      "numeric order past 999999");
		CHECK(dws_catalog_stale_count(c) == 4, "old run's steps 5..8 are stale, got %zu", dws_catalog_stale_count(c));
		CHECK(!dws_catalog_find(c, 5) && dws_catalog_find(c, 4), "find");
		const dws_stepfile *a = dws_catalog_anchor_for(c, 1000000);
		CHECK(a && a->step == 1 && a->complete, "anchor for the last step");
		dws_catalog_free(c);
	}
	dws_bucket_close(b);
	char *cmd = dws_xasprintf("rm -rf '%s'", dir);
	CHECK(system(cmd) == 0, "cleanup");
	free(cmd);
}

/* A local bucket's statistics: the bytes read from its files, those of a
 * base model folder counted into it, and blobs that outlive the bucket. */
static void test_bucket_stats(void)
{
	char dir[] = "/tmp/dwsfs-unit-XXXXXX";
	if (!mkdtemp(dir)) {
		CHECK(0, "mkdtemp");
		return;
	}
	const char *json = "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}";
	put_file(dir, "main/a.safetensors", json, 1700000000);
	put_file(dir, "base/b.safetensors", json, 1700000000);
	char *mdir = dws_xasprintf("%s/main", dir), *bdir = dws_xasprintf("%s/base", dir);
	dws_bucket *m = NULL, *base = NULL;
	dws_object *mo = NULL, *bo = NULL;
	size_t mn = 0, bn = 0;
	dws_blob *mb = NULL, *bb = NULL;
	dws_error e = {0};
	int rc = dws_bucket_open(mdir, &m, &e);
	rc = rc ? rc : dws_bucket_open(bdir, &base, &e);
	rc = rc ? rc : dws_bucket_list(m, "", &mo, &mn, &e);
	rc = rc ? rc : dws_bucket_list(base, "", &bo, &bn, &e);
	rc = rc ? rc : dws_bucket_open_blob(m, &mo[0], &mb, &e);
	if (!rc)
		dws_bucket_count_into(base, m);
	rc = rc ? rc : dws_bucket_open_blob(base, &bo[0], &bb, &e);
	CHECK(!rc && mn == 1 && bn == 1, "two local buckets, one file each: %s", e.msg);
	if (!rc) {
		char buf[16];
		dws_bucket_stats st;
		dws_bucket_stats_get(m, &st);
		CHECK(st.bytes_fetched == 0, "nothing read yet: %llu", (unsigned long long)st.bytes_fetched);
		CHECK(dws_blob_read(mb, 0, buf, 10, &e) == DWS_OK && dws_blob_read(bb, 2, buf, 6, &e) == DWS_OK, "reads");
		dws_bucket_stats_get(m, &st);
		CHECK(st.bytes_fetched == 16 && !st.requests[0] && !st.cache.hits,
		      "the bucket's reads and its base's: %llu bytes", (unsigned long long)st.bytes_fetched);
		dws_bucket_close(m);
		dws_bucket_close(base);
		m = base = NULL;
		CHECK(dws_blob_read(mb, 0, buf, 8, &e) == DWS_OK && dws_blob_read(bb, 0, buf, 8, &e) == DWS_OK,
		      "blobs read after their buckets closed");
	}
	dws_blob_unref(mb);
	dws_blob_unref(bb);
	dws_objects_free(mo, mn);
	dws_objects_free(bo, bn);
	dws_bucket_close(m);
	dws_bucket_close(base);
	free(mdir);
	free(bdir);
	char *cmd = dws_xasprintf("rm -rf '%s'", dir);
	CHECK(system(cmd) == 0, "cleanup");
	free(cmd);
}

/* A dense merge from the oldest run, given the tensor's local BF16 source,
 * becomes full: the source folded in, reads never touch the source again,
 * and newer runs still apply over it. */
static void test_patch_full(void)
{
	enum { D = 9001 };
	static uint16_t srcv[D], out[D];
	static int32_t want[D];
	for (int i = 0; i < D; i++)
		want[i] = srcv[i] = (uint16_t)rnd();
	char path[] = "/tmp/dwsfs-unit-full.XXXXXX";
	int fd = mkstemp(path);
	CHECK(fd >= 0 && write(fd, "pad!", 4) == 4 && write(fd, srcv, sizeof(srcv)) == (ssize_t)sizeof(srcv), "source file written");
	unlink(path);
	dws_blob *b = dws_blob_from_fd("full-src", fd, 4 + sizeof(srcv));
	dws_src src = {b, 4, DWS_DT_BF16};
	dws_patch *runs[3];
	for (int r = 0; r < 3; r++)
		runs[r] = random_run(D, 3, want);
	dws_patch *full = dws_patch_compact(runs, 2, D, &src);
	CHECK(full->full && full->bits, "a dense merge with a local source is full");
	dws_patchset *ps = dws_patchset_add(NULL, full, D);
	dws_patchset *ps2 = dws_patchset_add(ps, runs[2], D);
	int bad = 0;
	for (int simd = 0; simd < 2; simd++) {
		dws_patch_simd(simd);
		uint64_t e0 = rnd() % 100, cnt = D - e0 - rnd() % 100;
		memset(out, 0, sizeof(out)); /* not the source: the run must hold it */
		dws_patchset_apply_bf16(ps2, e0, cnt, out + e0);
		for (uint64_t i = e0; i < e0 + cnt; i++)
			bad += out[i] != (uint16_t)want[i];
	}
	dws_patch_simd(true);
	CHECK(bad == 0, "full run + a newer run read without the source equal source + every run (%d bad)", bad);
	dws_patch_unref(runs[0]);
	dws_patch_unref(runs[1]);
	dws_patchset_unref(ps);
	dws_patchset_unref(ps2);
	dws_blob_unref(b);
}

/* ---- the block cache: reads, pinned reads, reuse from disk ---- */

struct fake_obj {
	const unsigned char *data;
	atomic_int fetches;
};

static int fake_fetch(void *ctx, uint64_t off, size_t len, void *dst, dws_error *err)
{
	(void)err;
	struct fake_obj *o = ctx;
	atomic_fetch_add(&o->fetches, 1);
	memcpy(dst, o->data + off, len);
	return DWS_OK;
}

/* The end of a block cache test: the cache closed, its folder removed. */
static void cache_test_end(dws_cache *c, const char *dir, unsigned char *data, unsigned char *buf)
{
	dws_cache_close(c);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	CHECK(system(cmd) == 0, "cleanup");
	free(data);
	free(buf);
}

static void test_block_cache(void)
{
	enum { BS = 65536, SIZE = 40 * BS + 1234 };
	char dir[] = "/tmp/dwsfs-unit-cache-XXXXXX";
	CHECK(mkdtemp(dir) != NULL, "mkdtemp");
	unsigned char *data = malloc(SIZE), *buf = malloc(SIZE);
	uint64_t x = 88172645463325252ull;
	for (size_t i = 0; i < SIZE; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		data[i] = (unsigned char)x;
	}
	struct fake_obj obj = {.data = data};
	/* a backlog for the disk as long as the object: every block is kept */
	dws_cache_opts o = {.dir = dir, .block_size = BS, .max_window = 4, .write_backlog = 64};
	dws_cache *c = NULL;
	dws_error err = {0};
	CHECK(dws_cache_open(&o, &c, &err) == DWS_OK, "cache open: %s", err.msg);
	dws_blob *b = dws_remote_blob(c, "obj", "ident-1", SIZE, fake_fetch, &obj, NULL);

	/* a read across blocks, then a sequential scan in 16 KiB pieces taken
	 * by reference: same bytes; once it is a scan, pointed to, not copied */
	CHECK(dws_blob_read(b, BS - 100, buf, 3 * BS, &err) == DWS_OK && !memcmp(buf, data + BS - 100, 3 * BS),
	      "read across blocks");
	size_t refs = 0, copies = 0;
	int bad;
	bool same = true;
	for (uint64_t off = 0; off < SIZE; off += 16384) {
		size_t n = SIZE - off < 16384 ? (size_t)(SIZE - off) : 16384;
		const void *ref = NULL;
		dws_pin pin;
		if (dws_blob_read_ref(b, off, buf, n, &ref, &pin, &err) != DWS_OK) {
			same = false;
			break;
		}
		same &= !memcmp(ref, data + off, n);
		if (ref == buf)
			copies++, same &= pin.release == NULL;
		else
			refs++;
		dws_pin_release(&pin);
		same &= pin.release == NULL;
	}
	CHECK(same, "read_ref: the bytes of the scan (%s)", err.msg);
	CHECK(refs > copies && refs > 0, "read_ref: a scan is served from the hot set (%zu refs, %zu copies)", refs, copies);
	int fetched = atomic_load(&obj.fetches);
	CHECK(fetched <= 41 + 2, "each block fetched once (%d fetches for 41 blocks)", fetched);
	dws_blob_unref(b);
	dws_cache_counts cc;
	dws_cache_stats(c, &cc);
	uint64_t unkept = cc.unkept_blocks;
	dws_cache_close(c); /* the writers drain: every block still in memory goes to disk */

	/* a new cache on the same folder: every block kept comes from disk, the
	 * ones the disk did not take in time (none, unless it fell behind) are
	 * fetched again */
	obj.fetches = 0;
	CHECK(dws_cache_open(&o, &c, &err) == DWS_OK, "cache reopen: %s", err.msg);
	dws_cache_stats(c, &cc);
	CHECK(cc.blocks + unkept == 41, "41 blocks on disk after close, or not kept (%llu + %llu)",
	      (unsigned long long)cc.blocks, (unsigned long long)unkept);
	b = dws_remote_blob(c, "obj", "ident-1", SIZE, fake_fetch, &obj, NULL);
	memset(buf, 0, SIZE);
	same = true;
	for (uint64_t off = 0; off < SIZE; off += 100000) {
		size_t n = SIZE - off < 100000 ? (size_t)(SIZE - off) : 100000;
		const void *ref;
		dws_pin pin;
		same &= dws_blob_read_ref(b, off, buf, n, &ref, &pin, &err) == DWS_OK && !memcmp(ref, data + off, n);
		dws_pin_release(&pin);
	}
	CHECK(same && (uint64_t)atomic_load(&obj.fetches) == unkept, "reopened: same bytes, a fetch per block not kept (%d, %llu)",
	      atomic_load(&obj.fetches), (unsigned long long)unkept);

	/* compaction folds a remote BF16 source into a full run when its blocks
	 * are all cached, and never fetches one that is not */
	enum { D = 300000 };
	static int32_t want[D];
	for (int i = 0; i < D; i++)
		want[i] = (uint16_t)(data[100 + 2 * i] | data[101 + 2 * i] << 8);
	dws_patch *runs[2] = {random_run(D, 3, want), random_run(D, 3, want)};
	dws_src src = {b, 100, DWS_DT_BF16};
	dws_patch *full = dws_patch_compact(runs, 2, D, &src);
	CHECK(full->full, "a dense merge over a cached remote source is full");
	bad = 0;
	for (int i = 0; i < D; i++)
		bad += full->val[i] != (uint16_t)want[i];
	CHECK(bad == 0 && atomic_load(&obj.fetches) == 0, "its values: source + runs (%d bad), no fetch", bad);
	dws_patch_unref(full);
	dws_blob *u = dws_remote_blob(c, "obj2", "ident-2", SIZE, fake_fetch, &obj, NULL);
	src.blob = u;
	full = dws_patch_compact(runs, 2, D, &src);
	CHECK(!full->full && full->bits && atomic_load(&obj.fetches) == 0,
	      "over an uncached remote source: dense, not full, nothing fetched (%d)", atomic_load(&obj.fetches));
	dws_patch_unref(full);
	dws_patch_unref(runs[0]);
	dws_patch_unref(runs[1]);
	dws_blob_unref(u);
	dws_blob_unref(b);
	cache_test_end(c, dir, data, buf);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A disk slower than the network never holds a read back: blocks it did
 * not take in time are served from memory and not kept (counted), and a
 * reopened cache fetches exactly those again. */
static void test_block_cache_slow_disk(void)
{
	enum { BS = 65536, NBLK = 40, SIZE = NBLK * BS, DELAY_MS = 100 };
	char dir[] = "/tmp/dwsfs-unit-slow-XXXXXX";
	CHECK(mkdtemp(dir) != NULL, "mkdtemp");
	unsigned char *data = malloc(SIZE), *buf = malloc(SIZE);
	for (size_t i = 0; i < SIZE; i++)
		data[i] = (unsigned char)(i * 2654435761u >> 13);
	struct fake_obj obj = {.data = data};
	dws_cache_opts o = {.dir = dir, .block_size = BS, .max_window = 4, .write_backlog = 2,
			    .write_delay_ms = DELAY_MS};
	dws_cache *c = NULL;
	dws_error err = {0};
	CHECK(dws_cache_open(&o, &c, &err) == DWS_OK, "cache open: %s", err.msg);
	dws_blob *b = dws_remote_blob(c, "obj", "ident-slow", SIZE, fake_fetch, &obj, NULL);
	double t0 = now_s();
	bool same = true;
	for (uint64_t off = 0; off < SIZE; off += BS / 4)
		same &= dws_blob_read(b, off, buf + off, BS / 4, &err) == DWS_OK;
	double took = now_s() - t0;
	same &= !memcmp(buf, data, SIZE);
	/* the 2 writers need NBLK * DELAY_MS / 2 = 2 s to write every block */
	CHECK(same && took < 1.0, "read at the network's speed past a slow disk (%.3f s; %s)", took, err.msg);
	dws_cache_counts cc;
	dws_cache_stats(c, &cc);
	uint64_t unkept = cc.unkept_blocks;
	CHECK(unkept > 0 && cc.unkept_bytes == unkept * BS, "blocks not kept are counted (%llu, %llu bytes)",
	      (unsigned long long)unkept, (unsigned long long)cc.unkept_bytes);
	dws_blob_unref(b);
	dws_cache_close(c); /* what is still in memory goes to disk */

	o.write_delay_ms = 0;
	CHECK(dws_cache_open(&o, &c, &err) == DWS_OK, "cache reopen: %s", err.msg);
	dws_cache_stats(c, &cc);
	CHECK(cc.blocks + unkept == NBLK, "every block on disk or not kept (%llu + %llu)",
	      (unsigned long long)cc.blocks, (unsigned long long)unkept);
	obj.fetches = 0;
	b = dws_remote_blob(c, "obj", "ident-slow", SIZE, fake_fetch, &obj, NULL);
	memset(buf, 0, SIZE);
	same = true;
	for (uint64_t off = 0; off < SIZE; off += BS / 4)
		same &= dws_blob_read(b, off, buf + off, BS / 4, &err) == DWS_OK;
	CHECK(same && !memcmp(buf, data, SIZE), "reopened: same bytes");
	CHECK((uint64_t)atomic_load(&obj.fetches) == unkept, "reopened: the blocks not kept fetched again, only those (%d of %llu)",
	      atomic_load(&obj.fetches), (unsigned long long)unkept);
	dws_blob_unref(b);
	cache_test_end(c, dir, data, buf);
}

static int slow_fetch(void *ctx, uint64_t off, size_t len, void *dst, dws_error *err)
{
	usleep(1000); /* a round trip: the prefetchers get going before the reader */
	return fake_fetch(ctx, off, len, dst, err);
}

/* A scan in kernel-sized reads over blocks smaller than a read, the reads
 * arriving two at a time in the wrong order (as FUSE's do): each block is
 * fetched once. With room for 2 blocks being read, the blocks the later
 * read fetched pushed out the one the earlier read shared with it. */
static void test_block_cache_reads_out_of_order(void)
{
	enum { BS = 262144, H = 1616, RD = 1 << 20, NRD = 24, SIZE = H + NRD * RD };
	unsigned char *data = malloc(SIZE), *buf = malloc(RD);
	for (size_t i = 0; i < SIZE; i++)
		data[i] = (unsigned char)(i * 2654435761u >> 11);
	struct fake_obj obj = {.data = data};
	dws_cache_opts o = {.memory_only = true, .block_size = BS, .max_window = 8};
	dws_error err = {0};
	int worst = 0;
	bool same = true;
	for (int round = 0; round < 4; round++) {
		dws_cache *c = NULL;
		CHECK(dws_cache_open(&o, &c, &err) == DWS_OK, "cache open: %s", err.msg);
		obj.fetches = 0;
		dws_blob *b = dws_remote_blob(c, "obj", "ident-ooo", SIZE, slow_fetch, &obj, NULL);
		for (int k = 0; k < NRD; k += 2)
			for (int j = 1; j >= 0; j--) {
				uint64_t off = H + (uint64_t)(k + j) * RD;
				same &= dws_blob_read(b, off, buf, RD, &err) == DWS_OK && !memcmp(buf, data + off, RD);
			}
		int f = atomic_load(&obj.fetches);
		worst = f > worst ? f : worst;
		dws_blob_unref(b);
		dws_cache_close(c);
	}
	int nblk = (SIZE + BS - 1) / BS;
	CHECK(same, "out-of-order reads: the bytes (%s)", err.msg);
	CHECK(worst <= nblk, "out-of-order reads: each block fetched once (%d fetches at worst for %d blocks)", worst, nblk);
	free(data);
	free(buf);
}

/* ---- materialized files ---- */

/* A one-tensor BF16 checkpoint "w" of n elements at dir/model.safetensors. */
static void write_checkpoint(const char *dir, const uint16_t *v, size_t n)
{
	char path[512], hdr[256];
	mkdir(dir, 0700);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	int len = snprintf(hdr, sizeof(hdr), "{\"w\":{\"dtype\":\"BF16\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", n, n * 2);
	uint64_t hl = (uint64_t)len;
	FILE *f = fopen(path, "wb");
	fwrite(&hl, 8, 1, f);
	fwrite(hdr, 1, (size_t)len, f);
	fwrite(v, 2, n, f);
	fclose(f);
}

static void test_materialize(void)
{
	char root[] = "/tmp/dws-unit-mat-XXXXXX";
	if (!mkdtemp(root)) {
		CHECK(0, "mkdtemp: %s", strerror(errno));
		return;
	}
	enum { N = 3 << 20 }; /* 6 MiB of BF16: more than one write chunk */
	uint16_t *v = malloc(N * 2);
	for (size_t i = 0; i < N; i++)
		v[i] = (uint16_t)(i * 2654435761u >> 7);
	char a[600], b[600], bucket[600];
	snprintf(a, sizeof(a), "%s/a", root);
	snprintf(b, sizeof(b), "%s/b", root);
	snprintf(bucket, sizeof(bucket), "%s/bucket", root);
	mkdir(bucket, 0700);
	write_checkpoint(a, v, N);
	for (size_t i = 0; i < N; i += 97)
		v[i] ^= 0x55;
	write_checkpoint(b, v, N);
	char written[600];
	uint64_t changed = 0;
	dws_error e = {0};
	dws_publish_opts po;
	dws_publish_opts_init(&po);
	po.next = a;
	po.bucket = bucket;
	po.step = 1;
	po.format = DWS_PUB_ANCHOR;
	int rc = dws_publish(&po, written, sizeof(written), &changed, &e);
	po.prev = a;
	po.next = b;
	po.step = 2;
	po.parent_step = 1;
	po.format = DWS_PUB_GAP_DELTA;
	rc = rc ? rc : dws_publish(&po, written, sizeof(written), &changed, &e);
	dws_bucket *bk = NULL;
	dws_catalog *cat = NULL;
	dws_builder *bl = NULL;
	dws_step *s = NULL;
	dws_build_opts bo;
	dws_build_opts_init(&bo);
	rc = rc ? rc : dws_bucket_open(bucket, &bk, &e);
	rc = rc ? rc : dws_catalog_load(bk, NULL, &cat, &e);
	rc = rc ? rc : dws_builder_new(cat, &bo, &bl, &e);
	rc = rc ? rc : dws_builder_build(bl, 2, &s, &e);
	CHECK(rc == 0 && changed > 0, "materialize: a bucket of an anchor and a delta: %s", e.msg);
	if (rc)
		goto out;
	CHECK(dws_step_file_local(s, 0), "materialize: a local bucket's step is local");
	CHECK(!dws_step_file_local(s, 99), "materialize: no such file is not local");
	size_t size = (size_t)dws_step_file(s, 0)->size;
	char *want = malloc(size), *got = malloc(size);
	CHECK(dws_step_read(s, 0, 0, want, size, &e) == (int64_t)size, "materialize: read the step: %s", e.msg);
	int fd = -1;
	rc = dws_step_materialize(s, 0, root, 0, NULL, &fd, &e);
	CHECK(rc == 0 && fd >= 0, "materialize: written: %s", e.msg);
	struct stat st;
	CHECK(fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_size == size && st.st_nlink == 0,
	      "materialize: an unnamed file of the file's size");
	CHECK(fd >= 0 && pread(fd, got, size, 0) == (ssize_t)size && !memcmp(got, want, size),
	      "materialize: the bytes are the step's");
	if (fd >= 0)
		close(fd);
	DIR *d = opendir(root);
	size_t entries = 0;
	for (struct dirent *de; d && (de = readdir(d));)
		entries += de->d_name[0] != '.';
	if (d)
		closedir(d);
	CHECK(entries == 3, "materialize: nothing left in the folder (%zu entries)", entries);
	/* the free-space floor, a cancel, a bad folder: refused, no fd */
	fd = -1;
	rc = dws_step_materialize(s, 0, root, UINT64_MAX / 2, NULL, &fd, &e);
	CHECK(rc == DWS_EIO && fd < 0 && strstr(e.msg, "free") && strstr(e.msg, "model.safetensors"),
	      "materialize: refused under the free-space floor: %s", e.msg);
	atomic_bool stop = true;
	e = (dws_error){0};
	rc = dws_step_materialize(s, 0, root, 0, &stop, &fd, &e);
	CHECK(rc != 0 && fd < 0 && strstr(e.msg, "cancelled"), "materialize: cancelled: %s", e.msg);
	e = (dws_error){0};
	rc = dws_step_materialize(s, 0, "/nonexistent/dir", 0, NULL, &fd, &e);
	CHECK(rc != 0 && fd < 0 && strstr(e.msg, "/nonexistent/dir"), "materialize: bad folder named: %s", e.msg);
	free(want);
	free(got);
out:
	dws_step_unref(s);
	dws_builder_free(bl);
	dws_catalog_free(cat);
	dws_bucket_close(bk);
	free(v);
	char cmd[700];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
	CHECK(system(cmd) == 0, "materialize: clean up");
}

/* An options struct not set up by its init is refused, naming it; one set
 * up is taken, its 0 values as 0. */
static void test_opts_init(void)
{
	dws_error e = {0};
	dws_bucket *b = NULL;
	dws_bucket_opts bo = {.block_size = 8u << 20};
	CHECK(dws_bucket_open_opts("/tmp", &bo, &b, &e) == DWS_EINVAL && strstr(e.msg, "dws_bucket_opts_init"),
	      "bucket opts without init refused: %s", e.msg);
	dws_bucket_opts_init(&bo);
	bo.block_size = 0;
	memset(&e, 0, sizeof(e));
	CHECK(dws_bucket_open_opts("/tmp", &bo, &b, &e) == DWS_EINVAL && strstr(e.msg, "block_size 0"),
	      "block_size 0 is 0, refused: %s", e.msg);
	dws_bucket_opts_init(&bo);
	memset(&e, 0, sizeof(e));
	CHECK(dws_bucket_open_opts("/tmp", &bo, &b, &e) == DWS_OK, "bucket opts from init taken: %s", e.msg);
	dws_bucket_close(b);
	dws_publish_opts po = {.step = 1};
	uint64_t changed;
	char written[64];
	memset(&e, 0, sizeof(e));
	CHECK(dws_publish(&po, written, sizeof(written), &changed, &e) == DWS_EINVAL, "publish opts without init: %s", e.msg);
}

int main(void)
{
	test_dtypes();
	test_names();
	test_safetensors();
	test_file_end();
	test_patchset();
	test_patchset_build();
	test_patch_full();
	test_gap_delta();
	test_catalog();
	test_bucket_stats();
	test_block_cache();
	test_block_cache_slow_disk();
	test_block_cache_reads_out_of_order();
	test_materialize();
	test_opts_init();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
