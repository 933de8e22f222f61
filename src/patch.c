/* The patch index (see patch.h): runs, their merges (sparse and dense),
 * and applying them to a window of a tensor. */
#include "patch.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- patches ---- */

/* Bytes held by the runs of every step object alive (status patch_bytes). */
static atomic_uint_least64_t patch_mem;

static uint64_t patch_size(const dws_patch *p)
{
	return p->bits ? p->numel * 2 + (p->numel + 63) / 64 * 8 : (uint64_t)p->n * 6;
}

uint64_t dws_patch_memory(void) { return atomic_load(&patch_mem); }

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct populate {
	char *p;
	size_t n;
};

static void *populate_main(void *v)
{
	struct populate *w = v;
	if (madvise(w->p, w->n, MADV_POPULATE_WRITE) != 0) /* older kernels: touch */
		for (size_t i = 0; i < w->n; i += 4096)
			w->p[i] = 0;
	return NULL;
}

dws_arena *dws_arena_new(size_t bytes)
{
	dws_arena *a = dws_xcalloc(1, sizeof(*a));
	atomic_init(&a->refs, 1);
	a->mem = dws_pmem_alloc(&a->blk, bytes ? bytes : 1, 0);
	if (a->blk.disk) /* a file's pages: neither faulted in ahead nor huge */
		return a;
	/* A fresh arena's pages are faulted in (zeroed by the kernel) as the
	 * decode first writes them: most of a step's build time where fresh
	 * memory is dear (a VM handing freed pages back to its host). Fault
	 * them in on two cores first. */
	enum { SPLIT_MIN = 8u << 20, HUGE = 2u << 20 };
	if (bytes >= SPLIT_MIN) {
		size_t half = (bytes / 2) & ~(size_t)(HUGE - 1);
		struct populate w[2] = {{a->mem, half}, {(char *)a->mem + half, bytes - half}};
		pthread_t t;
		bool two = pthread_create(&t, NULL, populate_main, &w[1]) == 0;
		populate_main(&w[0]);
		if (two)
			pthread_join(t, NULL);
		else
			populate_main(&w[1]);
	}
	dws_big_hint(a->mem, bytes);
	return a;
}

void dws_arena_written(dws_arena *a) { dws_pmem_written(&a->blk); }

void dws_arena_unref(dws_arena *a)
{
	if (!a || atomic_fetch_sub(&a->refs, 1) != 1)
		return;
	dws_pmem_free(&a->blk);
	free(a);
}

void dws_patch_unref(dws_patch *p)
{
	if (!p || atomic_fetch_sub(&p->refs, 1) != 1)
		return;
	atomic_fetch_sub(&patch_mem, patch_size(p));
	if (p->arena) {
		/* the arena lives on while other runs of its delta do: give this
		 * run's whole pages back now (merged runs replace a delta's runs
		 * one tensor at a time) */
		if (atomic_load(&p->arena->refs) > 1) {
			dws_pmem_release(&p->arena->blk, p->idx, (size_t)p->n * sizeof(uint32_t));
			dws_pmem_release(&p->arena->blk, p->val, (size_t)p->n * sizeof(uint16_t));
		}
		dws_arena_unref(p->arena);
	} else {
		for (int i = 0; i < 3; i++)
			dws_pmem_free(&p->own[i]);
	}
	free(p);
}

dws_patch *dws_patch_new_in(dws_arena *a, uint32_t *idx, uint16_t *val, uint32_t n)
{
	dws_patch *p = dws_xcalloc(1, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->n = n;
	p->idx = idx;
	p->val = val;
	p->arena = a;
	atomic_fetch_add(&a->refs, 1);
	atomic_fetch_add(&patch_mem, patch_size(p));
	return p;
}

/* A sparse run over the owned blocks of its arrays. */
static dws_patch *patch_new_blocks(dws_pmem *idx, dws_pmem *val, uint32_t n)
{
	dws_patch *p = dws_xcalloc(1, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->n = n;
	p->own[0] = (dws_pmem){.p = idx->p, .len = idx->len, .disk = idx->disk};
	p->own[1] = (dws_pmem){.p = val->p, .len = val->len, .disk = val->disk};
	p->idx = p->own[0].p;
	p->val = p->own[1].p;
	atomic_fetch_add(&patch_mem, patch_size(p));
	return p;
}

dws_patch *dws_patch_new_owned(uint32_t *idx, uint16_t *val, uint32_t n)
{
	dws_pmem bi, bv;
	dws_pmem_adopt(&bi, idx, (size_t)n * sizeof(uint32_t));
	dws_pmem_adopt(&bv, val, (size_t)n * sizeof(uint16_t));
	return patch_new_blocks(&bi, &bv, n);
}

/* The producer is done with owned run p: its spilled blocks leave the
 * process's pages. */
static void patch_written(dws_patch *p)
{
	for (int i = 0; !p->arena && i < 3; i++)
		dws_pmem_written(&p->own[i]);
}

/* Two runs into one; where both hold an index the newer one's value wins.
 * One sequential pass. */
static dws_patch *merge2(const dws_patch *older, const dws_patch *newer)
{
	uint64_t total = (uint64_t)older->n + newer->n;
	dws_pmem mi, mv;
	uint32_t *idx = dws_pmem_alloc(&mi, (total ? total : 1) * sizeof(uint32_t), DWS_PMEM_HUGE | DWS_PMEM_MERGED);
	uint16_t *val = dws_pmem_alloc(&mv, (total ? total : 1) * sizeof(uint16_t), DWS_PMEM_HUGE | DWS_PMEM_MERGED);
	const uint32_t *ai = older->idx, *bi = newer->idx;
	const uint16_t *av = older->val, *bv = newer->val;
	uint32_t i = 0, j = 0, na = older->n, nb = newer->n;
	uint64_t o = 0;
	while (i < na && j < nb) {
		if (!(o & ((1u << 20) - 1)))
			dws_pmem_trim((1u << 20) * 6); /* spilled runs' pages: not all at once */
		uint32_t x = ai[i], y = bi[j];
		if (x < y) {
			idx[o] = x;
			val[o++] = av[i++];
		} else {
			idx[o] = y;
			val[o++] = bv[j++];
			i += x == y;
		}
	}
	memcpy(idx + o, ai + i, (size_t)(na - i) * sizeof(uint32_t));
	memcpy(val + o, av + i, (size_t)(na - i) * sizeof(uint16_t));
	o += na - i;
	memcpy(idx + o, bi + j, (size_t)(nb - j) * sizeof(uint32_t));
	memcpy(val + o, bv + j, (size_t)(nb - j) * sizeof(uint16_t));
	o += nb - j;
	if (o < total) { /* duplicates dropped: give the tail back */
		dws_pmem_shrink(&mi, (o ? o : 1) * sizeof(uint32_t));
		dws_pmem_shrink(&mv, (o ? o : 1) * sizeof(uint16_t));
	}
	return patch_new_blocks(&mi, &mv, (uint32_t)o);
}

/* ---- dense runs ---- */

static bool use_simd = true;
void dws_patch_simd(bool on) { use_simd = on; }

/* lane masks: nibble -> four 16-bit lanes all ones where its bit is set */
static const uint64_t lane4[16] = {
	0x0000000000000000, 0x000000000000ffff, 0x00000000ffff0000, 0x00000000ffffffff,
	0x0000ffff00000000, 0x0000ffff0000ffff, 0x0000ffffffff0000, 0x0000ffffffffffff,
	0xffff000000000000, 0xffff00000000ffff, 0xffff0000ffff0000, 0xffff0000ffffffff,
	0xffffffff00000000, 0xffffffff0000ffff, 0xffffffffffff0000, 0xffffffffffffffff,
};

/* d[k] = v[k] where bit k of m is set, k < n <= 64 (portable). */
static void blend_portable(uint16_t *d, const uint16_t *v, uint64_t m, unsigned n)
{
	unsigned k = 0;
	for (; k + 4 <= n; k += 4, m >>= 4) {
		uint64_t mask = lane4[m & 15], x, y;
		if (!mask)
			continue;
		memcpy(&x, d + k, 8);
		memcpy(&y, v + k, 8);
		x = (x & ~mask) | (y & mask);
		memcpy(d + k, &x, 8);
	}
	for (; k < n; k++, m >>= 1)
		if (m & 1)
			d[k] = v[k];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx512f,avx512bw")))
static void blend_avx512(uint16_t *d, const uint16_t *v, uint64_t m, unsigned n)
{
	if (n < 64)
		m &= (1ULL << n) - 1;
	__m512i lo = _mm512_loadu_si512((const void *)v);
	_mm512_mask_storeu_epi16(d, (__mmask32)(uint32_t)m, lo);
	if (n > 32) {
		__m512i hi = _mm512_loadu_si512((const void *)(v + 32));
		_mm512_mask_storeu_epi16(d + 32, (__mmask32)(uint32_t)(m >> 32), hi);
	}
}
static bool have_avx512(void)
{
	static int have = -1;
	if (have < 0)
		have = __builtin_cpu_supports("avx512bw") ? 1 : 0;
	return have;
}
#define HAVE_AVX512_PATH 1
#endif

/* Apply dense run p to the BF16 values of elements [e0, e0+cnt) in dst. */
static void dense_apply_bf16(const dws_patch *p, uint64_t e0, uint64_t cnt, uint16_t *dst)
{
	uint64_t e = e0, end = e0 + cnt;
	if (end > p->numel)
		end = p->numel;
	if (p->full) {
		if (end > e)
			memcpy(dst, p->val + e, (size_t)(end - e) * sizeof(uint16_t));
		return;
	}
#ifdef HAVE_AVX512_PATH
	bool simd = use_simd && have_avx512();
#endif
	while (e < end) {
		unsigned b = (unsigned)(e & 63);
		unsigned n = 64 - b;
		if (n > end - e)
			n = (unsigned)(end - e);
		uint64_t m = p->bits[e >> 6] >> b;
		if (n < 64)
			m &= (1ULL << n) - 1;
		uint16_t *d = dst + (e - e0);
		const uint16_t *v = p->val + e;
		if (m == ~0ULL)
			memcpy(d, v, 128);
		else if (m) {
#ifdef HAVE_AVX512_PATH
			/* the masked load reads only v[0..n): never past the array */
			if (simd && n == 64)
				blend_avx512(d, v, m, n);
			else
#endif
				blend_portable(d, v, m, n);
		}
		e += n;
	}
}

/* A dense run, nothing set. Its values are faulted in before the huge page
 * hint on the build path, as an arena (dws_arena_new); with `huge` (a whole
 * tensor the compaction thread makes, off the build path) after it: replies
 * point into those, and from small pages the kernel's copy of them into the
 * page cache took 4-6x the CPU (pinning every 4 KiB page). */
static dws_patch *dense_new(uint64_t numel, bool huge)
{
	dws_patch *p = dws_xcalloc(1, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->numel = numel;
	size_t words = (size_t)((numel + 63) / 64);
	p->bits = dws_pmem_alloc(&p->own[2], (words ? words : 1) * sizeof(uint64_t), DWS_PMEM_ZERO | DWS_PMEM_MERGED);
	size_t bytes = (size_t)(numel ? numel : 1) * sizeof(uint16_t);
	p->val = dws_pmem_alloc(&p->own[1], bytes, DWS_PMEM_ZERO | DWS_PMEM_MERGED | (huge ? DWS_PMEM_HUGE : 0));
	if (!huge && !p->own[1].disk)
		dws_big_hint(p->val, bytes);
	atomic_fetch_add(&patch_mem, patch_size(p));
	return p;
}

/* Fill the elements of dense run p that carry no entry from its BF16
 * source and set every bit. False (p unchanged) if the source cannot be
 * read. */
static bool make_full(dws_patch *p, const dws_src *src)
{
	enum { CH = 64 * 1024 }; /* elements per read, a multiple of 64 */
	uint16_t *buf = dws_xmalloc(CH * sizeof(uint16_t));
	bool ok = true;
	const dws_read_hint quiet = {DWS_READ_QUIET, UINT64_MAX}; /* a remote source's blocks, from the cache */
	for (uint64_t e = 0; e < p->numel && ok; e += CH) {
		uint64_t n = p->numel - e < CH ? p->numel - e : CH;
		dws_error err = {0};
		if (dws_blob_read_hint(src->blob, src->off + e * 2, buf, (size_t)n * 2, &quiet, &err) != DWS_OK) {
			ok = false;
			break;
		}
		dws_pmem_trim(n * 2);
		/* the patched values over the source's, then the whole window back */
		dense_apply_bf16(p, e, n, buf);
		memcpy(p->val + e, buf, (size_t)n * 2);
	}
	free(buf);
	if (!ok)
		return false;
	uint64_t words = (p->numel + 63) / 64;
	memset(p->bits, 0xff, (size_t)words * sizeof(uint64_t));
	if (p->numel % 64)
		p->bits[words - 1] = (1ULL << (p->numel % 64)) - 1;
	p->full = true;
	return true;
}

/* Set bits of dense run p. */
static uint64_t dense_count(const dws_patch *p)
{
	uint64_t n = 0, words = (p->numel + 63) / 64;
	for (uint64_t w = 0; w < words; w++)
		n += (uint64_t)__builtin_popcountll(p->bits[w]);
	return n;
}

/* runs[0..k) applied in order into dense run out, a window of elements at a
 * time: each cache line of out is loaded once for all the runs, where run
 * by run a 1% delta touches a quarter of the lines of the whole tensor (a
 * mount starting on a 50-delta chain spent seconds in that traffic). */
static void dense_apply_runs(dws_patch *out, dws_patch *const *runs, uint32_t k)
{
	enum { WINDOW = 1u << 17 }; /* elements: 256 KiB of values (in L2), a multiple of 64 */
	uint64_t numel = out->numel, words = (numel + 63) / 64;
	uint32_t *cur = dws_xcalloc(k ? k : 1, sizeof(*cur));
	for (uint64_t w0 = 0; w0 < numel; w0 += WINDOW) {
		uint64_t w1 = numel - w0 < WINDOW ? numel : w0 + WINDOW;
		dws_pmem_trim(WINDOW * 2); /* a spilled tensor's pages: not all at once */
		for (uint32_t r = 0; r < k; r++) {
			const dws_patch *p = runs[r];
			if (p->bits) {
				uint64_t we = (w1 + 63) / 64 < words ? (w1 + 63) / 64 : words;
				for (uint64_t w = w0 / 64; w < we; w++) {
					uint64_t m = p->bits[w];
					if (!m)
						continue;
					out->bits[w] |= m;
					unsigned n = w * 64 + 64 <= numel ? 64 : (unsigned)(numel - w * 64);
					if (m == ~0ULL)
						memcpy(out->val + w * 64, p->val + w * 64, 128);
					else
						blend_portable(out->val + w * 64, p->val + w * 64, m, n);
				}
				continue;
			}
			/* locals: the stores below would otherwise reload them */
			const uint32_t *idx = p->idx, n = p->n;
			const uint16_t *val = p->val;
			uint64_t *bits = out->bits;
			uint16_t *ov = out->val;
			uint32_t i = cur[r];
			for (; i < n && idx[i] < w1; i++) {
				uint32_t e = idx[i];
				__builtin_prefetch(idx + i + 64);
				__builtin_prefetch(val + i + 64);
				bits[e >> 6] |= 1ULL << (e & 63);
				ov[e] = val[i];
			}
			cur[r] = i;
		}
	}
	free(cur);
}

/* runs[0..k) applied in order into one dense run. */
static dws_patch *densify(dws_patch *const *runs, uint32_t k, uint64_t numel, bool huge)
{
	dws_patch *out = dense_new(numel, huge);
	dense_apply_runs(out, runs, k);
	uint64_t n = dense_count(out);
	/* entries of the chain: what a full run took over still counts */
	for (uint32_t r = 0; r < k; r++)
		if (runs[r]->full && runs[r]->n > n)
			n = runs[r]->n;
	out->n = (uint32_t)n;
	return out;
}

/* Sparse runs pairwise, as a balanced tree: log2(k) sequential passes over
 * the entries, each pair merged older-with-newer so the newest value wins. */
static dws_patch *merge_sparse(dws_patch *const *runs, uint32_t k)
{
	if (k == 0)
		return dws_patch_new_owned(dws_xmalloc(sizeof(uint32_t)), dws_xmalloc(sizeof(uint16_t)), 0);
	if (k == 1) {
		atomic_fetch_add(&runs[0]->refs, 1);
		return runs[0];
	}
	uint32_t h = k / 2;
	dws_patch *a = merge_sparse(runs, h), *b = merge_sparse(runs + h, k - h);
	dws_patch *m = merge2(a, b);
	dws_patch_unref(a);
	dws_patch_unref(b);
	return m;
}

dws_patch *dws_patch_compact(dws_patch *const *runs, uint32_t k, uint64_t numel,
			     const dws_src *src)
{
	/* dense costs 2 bytes + 1 bit per element, sparse 6 bytes per entry:
	 * dense once the entries (an upper bound: before duplicates go) pass a
	 * third of the elements, or when a run already is */
	uint64_t total = 0;
	bool any_dense = false;
	for (uint32_t r = 0; r < k; r++) {
		total += runs[r]->n;
		any_dense |= runs[r]->bits != NULL;
	}
	if (numel >= 4096 && (any_dense || total * 3 > numel)) {
		bool whole = src && src->dtype == DWS_DT_BF16 && src->blob &&
			     dws_blob_local(src->blob, src->off, numel * 2); /* to be made full */
		dws_patch *d = densify(runs, k, numel, whole);
		for (uint32_t r = 0; r < k; r++)
			d->full |= runs[r]->full; /* every bit set already */
		if (!d->full && whole)
			make_full(d, src);
		patch_written(d);
		return d;
	}
	dws_patch *m = merge_sparse(runs, k);
	patch_written(m);
	return m;
}

dws_patchset *dws_patchset_add(const dws_patchset *old, dws_patch *run, uint64_t numel)
{
	uint32_t n = old ? old->nruns : 0;
	dws_patchset *ps = dws_xcalloc(1, sizeof(*ps) + (n + 1) * sizeof(dws_patch *));
	atomic_init(&ps->refs, 1);
	for (uint32_t i = 0; i < n; i++) {
		ps->runs[i] = old->runs[i];
		atomic_fetch_add(&ps->runs[i]->refs, 1);
	}
	ps->runs[n] = run;
	ps->nruns = n + 1;
	if (ps->nruns > DWS_MAX_RUNS) {
		dws_patch *one = dws_patch_compact(ps->runs, ps->nruns, numel, NULL);
		for (uint32_t i = 0; i < ps->nruns; i++)
			dws_patch_unref(ps->runs[i]);
		ps->runs[0] = one;
		ps->nruns = 1;
	}
	for (uint32_t i = 0; i < ps->nruns; i++)
		ps->entries += ps->runs[i]->n;
	return ps;
}

/* Smaller tensors stay sparse. A build folds the sparse runs after its
 * dense one once they hold 1/FOLD_AT of the elements: each fold is a pass
 * over the whole tensor, while the pending entries cost about a quarter of
 * the dense run (6 bytes each against 2 and a bit per element). */
enum { DENSE_MIN = 4096, FOLD_AT = 12 };

/* runs[from..] of old (NULL: none), then run (NULL: none), as a malloc'd
 * array of *k (no references taken). */
static dws_patch **runs_then(const dws_patchset *old, uint32_t from, dws_patch *run, uint32_t *k)
{
	uint32_t n = old ? old->nruns - from : 0;
	*k = n + (run ? 1 : 0);
	dws_patch **runs = dws_xcalloc(*k ? *k : 1, sizeof(*runs));
	for (uint32_t i = 0; i < n; i++)
		runs[i] = old->runs[from + i];
	if (run)
		runs[n] = run;
	return runs;
}

/* A set of the one run p (its reference is taken over). */
static dws_patchset *patchset_one(dws_patch *p)
{
	dws_patchset *ps = dws_xcalloc(1, sizeof(*ps) + sizeof(dws_patch *));
	atomic_init(&ps->refs, 1);
	ps->runs[0] = p;
	ps->nruns = 1;
	ps->entries = p->n;
	return ps;
}

/* [own, pending sparse runs...] + run (NULL: none) as [own], the runs
 * folded into own in place (own is private to the build). */
static dws_patchset *fold_into_own(const dws_patchset *old, dws_patch *run, dws_patch *own)
{
	uint32_t k;
	dws_patch **runs = runs_then(old, 1, run, &k);
	dense_apply_runs(own, runs, k);
	free(runs);
	dws_patch_unref(run);
	own->n = (uint32_t)dense_count(own);
	patch_written(own);
	/* old (the caller drops it) lets go of the folded runs */
	atomic_fetch_add(&own->refs, 1);
	return patchset_one(own);
}

static bool is_own(const dws_patchset *ps, const dws_patch *own)
{
	return own && ps && ps->runs[0] == own && atomic_load(&ps->refs) == 1 &&
	       atomic_load(&own->refs) == 1;
}

dws_patchset *dws_patchset_fold_build(const dws_patchset *ps, dws_patch *own)
{
	if (!is_own(ps, own) || ps->nruns < 2)
		return NULL;
	for (uint32_t i = 1; i < ps->nruns; i++)
		if (ps->runs[i]->bits)
			return NULL;
	return fold_into_own(ps, NULL, own);
}

dws_patchset *dws_patchset_add_build(const dws_patchset *old, dws_patch *run, uint64_t numel,
				     dws_patch **own)
{
	/* the dense run this build made, seen by nobody else yet: the sparse
	 * runs after it are folded into it in place a batch at a time (one
	 * pass over the tensor per batch) */
	if (is_own(old, *own)) {
		bool sparse = !run->bits;
		for (uint32_t i = 1; i < old->nruns; i++)
			sparse &= !old->runs[i]->bits;
		uint64_t pending = old->entries - (*own)->n + run->n;
		if (sparse && pending * FOLD_AT <= numel && old->nruns < DWS_MAX_RUNS)
			return dws_patchset_add(old, run, numel); /* pending */
		if (sparse)
			return fold_into_own(old, run, *own);
	}
	uint32_t n = old ? old->nruns : 0;
	uint64_t total = run->n;
	bool sparse = !run->bits;
	for (uint32_t i = 0; i < n; i++) {
		total += old->runs[i]->n;
		sparse &= !old->runs[i]->bits;
	}
	if (numel < DENSE_MIN || !sparse || total * 3 <= numel || n + 1 > DWS_MAX_RUNS)
		return dws_patchset_add(old, run, numel);
	uint32_t k;
	dws_patch **runs = runs_then(old, 0, run, &k);
	*own = densify(runs, k, numel, false);
	patch_written(*own);
	free(runs);
	dws_patch_unref(run);
	return patchset_one(*own);
}

/* Size-tiered: merge the newest RUN_FANOUT runs once the oldest of them is
 * no more than twice the newest, so runs grow by powers of RUN_FANOUT and a
 * tensor carries O(log chain) of them; each entry is merged O(log chain)
 * times in all. Far past that (steps arriving faster than compaction), the
 * newest half is merged whatever the sizes.
 *
 * Density wins over tiers: once a third of the tensor's elements carry
 * entries, all its runs become one dense run (smaller, and applied by masked
 * stores instead of scattered ones); newer sparse runs fold into it once
 * they hold 1/16 of the elements or number DENSE_FOLD. */
enum { RUN_FANOUT = 4, RUN_MANY = 16, DENSE_FOLD = 8 };

static bool pick_tiered(const dws_patchset *ps, uint32_t from, uint32_t *j, uint32_t *k)
{
	uint32_t n = ps->nruns;
	if (n - from < RUN_FANOUT)
		return false;
	if (n - from >= RUN_MANY) {
		*k = (n - from) / 2;
		*j = n - *k;
		return true;
	}
	*j = n - RUN_FANOUT;
	*k = RUN_FANOUT;
	return (uint64_t)ps->runs[*j]->n <= 2 * (uint64_t)ps->runs[n - 1]->n + 64;
}

bool dws_patchset_pick(const dws_patchset *ps, uint64_t numel, uint32_t *j, uint32_t *k)
{
	if (!ps || ps->nruns == 0)
		return false;
	if (ps->nruns == 1) {
		if (ps->runs[0]->bits || numel < DENSE_MIN || ps->entries * 3 <= numel)
			return false;
		*j = 0; /* one sparse run, dense enough */
		*k = 1;
		return true;
	}
	uint32_t n = ps->nruns;
	if (numel >= DENSE_MIN) {
		if (ps->runs[0]->bits) {
			uint64_t newer = ps->entries - ps->runs[0]->n;
			if (newer * 16 > numel || n > DENSE_FOLD) {
				*j = 0;
				*k = n;
				return true;
			}
			return pick_tiered(ps, 1, j, k);
		}
		if (ps->entries * 3 > numel) {
			*j = 0;
			*k = n;
			return true;
		}
	}
	return pick_tiered(ps, 0, j, k);
}

dws_patchset *dws_patchset_splice(const dws_patchset *ps, uint32_t j, uint32_t k,
				  dws_patch *merged)
{
	uint32_t n = ps->nruns - k + 1;
	dws_patchset *out = dws_xcalloc(1, sizeof(*out) + n * sizeof(dws_patch *));
	atomic_init(&out->refs, 1);
	uint32_t o = 0;
	for (uint32_t r = 0; r < ps->nruns; r++) {
		if (r >= j && r < j + k) {
			if (r == j) {
				out->runs[o++] = merged;
				atomic_fetch_add(&merged->refs, 1);
			}
			continue;
		}
		out->runs[o++] = ps->runs[r];
		atomic_fetch_add(&ps->runs[r]->refs, 1);
	}
	out->nruns = o;
	for (uint32_t r = 0; r < o; r++)
		out->entries += out->runs[r]->n;
	return out;
}

void dws_patchset_unref(dws_patchset *ps)
{
	if (!ps || atomic_fetch_sub(&ps->refs, 1) != 1)
		return;
	for (uint32_t i = 0; i < ps->nruns; i++)
		dws_patch_unref(ps->runs[i]);
	free(ps);
}

/* First entry of run p with index >= e. */
static uint32_t run_lower_bound(const dws_patch *p, uint64_t e)
{
	uint32_t lo = 0, hi = p->n;
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (p->idx[mid] < e)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

void dws_patchset_apply_bf16(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
			     uint16_t *dst)
{
	uint64_t e1 = e0 + cnt;
	for (uint32_t r = 0; ps && r < ps->nruns; r++) {
		const dws_patch *p = ps->runs[r];
		if (p->bits) {
			dense_apply_bf16(p, e0, cnt, dst);
			continue;
		}
		for (uint32_t k = run_lower_bound(p, e0); k < p->n && p->idx[k] < e1; k++)
			dst[p->idx[k] - e0] = p->val[k];
	}
}


void dws_patchset_each(const dws_patchset *ps, uint64_t e0, uint64_t cnt,
		       void (*fn)(void *ctx, uint64_t k, uint16_t v), void *ctx)
{
	uint64_t e1 = e0 + cnt;
	for (uint32_t r = 0; ps && r < ps->nruns; r++) {
		const dws_patch *p = ps->runs[r];
		if (p->bits) {
			for (uint64_t e = e0; e < e1 && e < p->numel; e++)
				if (p->bits[e >> 6] >> (e & 63) & 1)
					fn(ctx, e - e0, p->val[e]);
			continue;
		}
		for (uint32_t k = run_lower_bound(p, e0); k < p->n && p->idx[k] < e1; k++)
			fn(ctx, p->idx[k] - e0, p->val[k]);
	}
}
