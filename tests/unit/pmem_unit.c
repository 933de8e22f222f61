/* Unit tests of patch memory under a cap (src/patchmem.c): the cap is
 * honoured, freed blocks give their bytes back, a spill that fails falls
 * back to memory, and patch runs built and merged past the cap hold the
 * same values as the replay. The last line is "N passed, N failed". */
#include "check.h"
#include "patch.h"
#include "patchmem.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[] = "/tmp/dwsfs-pmem-XXXXXX";

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static bool all_zero(const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static void test_cap(void)
{
	enum { MiB = 1 << 20 };
	dws_pmem_counts c0, c;
	dws_pmem_configure(4 * MiB, dir);
	dws_pmem_get(&c0);
	dws_pmem a, b, small;
	unsigned char *pa = dws_pmem_alloc(&a, 3 * MiB, DWS_PMEM_ZERO);
	unsigned char *pb = dws_pmem_alloc(&b, 3 * MiB, DWS_PMEM_ZERO);
	dws_pmem_alloc(&small, 100, 0);
	CHECK(!a.disk && b.disk, "under the cap in memory, past it spilled (%d %d)", a.disk, b.disk);
	CHECK(!small.disk, "small arrays stay in memory");
	CHECK(all_zero(pa, 3 * MiB) && all_zero(pb, 3 * MiB), "zeroed both ways");
	memset(pb, 0x5a, 3 * MiB);
	dws_pmem_written(&b);
	bool same = true;
	for (size_t i = 0; i < 3 * MiB; i += 4093)
		same &= pb[i] == 0x5a;
	CHECK(same, "a spilled block keeps its bytes after its pages leave the process");
	dws_pmem_get(&c);
	CHECK(c.memory - c0.memory == 3 * MiB + 100 && c.disk - c0.disk == 3 * MiB,
	      "counted: memory +%llu, disk +%llu", (unsigned long long)(c.memory - c0.memory),
	      (unsigned long long)(c.disk - c0.disk));
	/* a run released early from a spilled arena: punched out, uncounted */
	dws_pmem_release(&b, pb + 4096, 8192);
	dws_pmem_get(&c);
	CHECK(c.disk - c0.disk == 3 * MiB - 8192, "release gives whole pages back (%llu)",
	      (unsigned long long)(c.disk - c0.disk));
	dws_pmem_free(&a);
	dws_pmem_free(&b);
	dws_pmem_free(&small);
	dws_pmem_get(&c);
	CHECK(c.memory == c0.memory && c.disk == c0.disk, "freed: back to where it started");
	/* after the free, the room is there again */
	dws_pmem_alloc(&a, 3 * MiB, 0);
	CHECK(!a.disk, "freed room is used again");
	dws_pmem_free(&a);
	/* a merged run leaves room for the next delta's arena */
	dws_pmem d, m;
	dws_pmem_alloc(&d, 1 * MiB, 0); /* a build's arena: 1 MiB */
	dws_pmem_free(&d);
	dws_pmem_alloc(&m, 3 * MiB, DWS_PMEM_MERGED);
	CHECK(m.disk, "a merged run past cap - 2 x the arena spills");
	dws_pmem_free(&m);
}

static void test_spill_failure(void)
{
	enum { MiB = 1 << 20 };
	dws_pmem_counts c0, c;
	dws_pmem_configure(0, dir);
	dws_pmem_get(&c0);
	dws_pmem_fail_spills(1);
	dws_pmem a;
	unsigned char *p = dws_pmem_alloc(&a, 2 * MiB, DWS_PMEM_ZERO);
	dws_pmem_get(&c);
	CHECK(!a.disk && all_zero(p, 2 * MiB), "a failed spill: zeroed memory instead");
	CHECK(c.spill_failures == c0.spill_failures + 1 && c.memory == c0.memory + 2 * MiB, "counted as a failure");
	dws_pmem_free(&a);
	/* a folder that cannot hold files */
	dws_pmem_configure(0, "/nonexistent/dwsfs-pmem");
	dws_pmem_alloc(&a, 2 * MiB, 0);
	dws_pmem_get(&c);
	CHECK(!a.disk && c.spill_failures == c0.spill_failures + 2, "no folder: memory");
	dws_pmem_free(&a);
}

/* A delta's run of random changes (1 in one_in of n elements) in an arena
 * of its own, as a build makes it; recorded in want[]. */
static dws_patch *arena_run(uint32_t n, unsigned one_in, int32_t *want, bool *spilled)
{
	uint32_t m = 0;
	for (uint32_t i = 0; i < n; i++)
		m += rnd() % one_in == 0;
	dws_arena *a = dws_arena_new((size_t)m * 6);
	*spilled = a->blk.disk;
	uint32_t *idx = a->mem;
	uint16_t *val = (uint16_t *)(void *)(idx + m);
	uint32_t k = 0;
	for (uint32_t i = 0; i < n && k < m; i++)
		if (rnd() % (n / m) == 0 || n - i == m - k) {
			idx[k] = i;
			val[k] = (uint16_t)rnd();
			want[i] = val[k++];
		}
	dws_patch *p = dws_patch_new_in(a, idx, val, k);
	dws_arena_written(a);
	dws_arena_unref(a);
	return p;
}

static int bad_values(const dws_patchset *ps, const int32_t *want, uint16_t *out, uint32_t n)
{
	int bad = 0;
	for (uint32_t i = 0; i < n; i++)
		out[i] = 0xdead;
	dws_patchset_apply_bf16(ps, 0, n, out);
	for (uint32_t i = 0; i < n; i++)
		bad += out[i] != (want[i] >= 0 ? (uint16_t)want[i] : 0xdead);
	return bad;
}

/* Runs built, folded and merged with every big array spilled (cap 0):
 * the set equals the replay; everything freed gives its bytes back. */
static void test_runs_spilled(void)
{
	enum { D = 200003, FILES = 50 };
	static int32_t want[D];
	static uint16_t out[D];
	for (int i = 0; i < D; i++)
		want[i] = -1;
	dws_pmem_configure(0, dir);
	dws_pmem_counts c0, c;
	dws_pmem_get(&c0);
	dws_patchset *ps = NULL;
	dws_patch *own = NULL;
	int bad = 0, spilled = 0;
	uint64_t most_disk = 0;
	for (int f = 0; f < FILES; f++) {
		bool sp;
		dws_patch *run = arena_run(D, 40, want, &sp);
		spilled += sp;
		dws_patchset *next = dws_patchset_add_build(ps, run, D, &own);
		dws_patchset_unref(ps);
		ps = next;
		bad += bad_values(ps, want, out, D);
		dws_pmem_get(&c);
		if (c.disk > most_disk)
			most_disk = c.disk;
	}
	dws_patchset *folded = dws_patchset_fold_build(ps, own);
	if (folded) {
		dws_patchset_unref(ps);
		ps = folded;
	}
	bad += bad_values(ps, want, out, D);
	CHECK(spilled == FILES, "every arena spilled (%d of %d)", spilled, FILES);
	CHECK(ps->runs[0]->bits && ps->runs[0]->own[1].disk, "the build's dense run spilled");
	CHECK(bad == 0, "spilled runs hold the replayed values (%d bad)", bad);
	dws_pmem_get(&c);
	CHECK(c.memory - c0.memory < 64 * 1024, "memory past the cap: only small arrays (%llu)",
	      (unsigned long long)(c.memory - c0.memory));
	/* merged by the compactor's call: dense, spilled, same values */
	dws_patch *m = dws_patch_compact(ps->runs, ps->nruns, D, NULL);
	dws_patchset *one = dws_patchset_splice(ps, 0, ps->nruns, m);
	dws_patch_unref(m);
	CHECK(bad_values(one, want, out, D) == 0 && one->runs[0]->own[1].disk, "compacted, spilled, same values");
	dws_patchset_unref(one);
	dws_patchset_unref(ps);
	/* sparse merges (merge2 with its tail cut) spilled too */
	for (int i = 0; i < D; i++)
		want[i] = -1;
	ps = NULL;
	for (int f = 0; f < 8; f++) {
		bool sp;
		dws_patchset *next = dws_patchset_add(ps, arena_run(D, 40, want, &sp), D);
		dws_patchset_unref(ps);
		ps = next;
	}
	m = dws_patch_compact(ps->runs, ps->nruns, D, NULL);
	CHECK(!m->bits && m->own[0].disk && m->own[1].disk, "a sparse merge spilled");
	one = dws_patchset_splice(ps, 0, ps->nruns, m);
	dws_patch_unref(m);
	CHECK(bad_values(one, want, out, D) == 0, "the sparse merge holds the replayed values");
	dws_patchset_unref(one);
	dws_patchset_unref(ps);
	dws_pmem_get(&c);
	CHECK(c.memory == c0.memory && c.disk == c0.disk, "all freed (memory %+lld, disk %+lld)",
	      (long long)(c.memory - c0.memory), (long long)(c.disk - c0.disk));
	CHECK(most_disk > c0.disk, "spilled bytes were counted");
}

int main(void)
{
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	test_cap();
	test_spill_failure();
	test_runs_spilled();
	rmdir(dir);
	fprintf(stderr, "%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
