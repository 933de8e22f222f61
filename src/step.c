/* Steps as values: reading bytes of a reconstructed file, and the merged
 * patch index that keeps the cost of a read independent of chain length. */
#include "step.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* ---- patches ---- */

dws_arena *dws_arena_new(size_t bytes)
{
	dws_arena *a = dws_xcalloc(1, sizeof(*a));
	atomic_init(&a->refs, 1);
	a->mem = dws_big_alloc(bytes ? bytes : 1);
	return a;
}

void dws_arena_unref(dws_arena *a)
{
	if (!a || atomic_fetch_sub(&a->refs, 1) != 1)
		return;
	free(a->mem);
	free(a);
}

void dws_patch_unref(dws_patch *p)
{
	if (!p || atomic_fetch_sub(&p->refs, 1) != 1)
		return;
	if (p->arena) {
		dws_arena_unref(p->arena);
	} else {
		free(p->idx);
		free(p->val);
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
	return p;
}

dws_patch *dws_patch_new_owned(uint32_t *idx, uint16_t *val, uint32_t n)
{
	dws_patch *p = dws_xcalloc(1, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->n = n;
	p->idx = idx;
	p->val = val;
	return p;
}

/* k-way merge with a binary heap of run heads ordered by (index, newer
 * first): the first entry popped for an index is the newest; older ones for
 * the same index are dropped. One pass over every entry. */
dws_patch *dws_patch_compact(dws_patch *const *runs, uint32_t k)
{
	uint64_t total = 0;
	for (uint32_t r = 0; r < k; r++)
		total += runs[r]->n;
	uint32_t *idx = dws_big_alloc((total ? total : 1) * sizeof(uint32_t));
	uint16_t *val = dws_big_alloc((total ? total : 1) * sizeof(uint16_t));
	uint32_t *heap = dws_xmalloc((k ? k : 1) * sizeof(uint32_t)); /* run numbers */
	uint32_t *pos = dws_xcalloc(k ? k : 1, sizeof(uint32_t));
	uint32_t hn = 0;
#define KEY_LESS(a, b) (runs[a]->idx[pos[a]] < runs[b]->idx[pos[b]] || \
			(runs[a]->idx[pos[a]] == runs[b]->idx[pos[b]] && (a) > (b)))
	for (uint32_t r = 0; r < k; r++) {
		if (!runs[r]->n)
			continue;
		uint32_t i = hn++;
		heap[i] = r;
		while (i && KEY_LESS(heap[i], heap[(i - 1) / 2])) {
			uint32_t t = heap[i];
			heap[i] = heap[(i - 1) / 2];
			heap[(i - 1) / 2] = t;
			i = (i - 1) / 2;
		}
	}
	uint64_t out = 0;
	while (hn) {
		uint32_t r = heap[0];
		uint32_t e = runs[r]->idx[pos[r]];
		if (!out || idx[out - 1] != e) {
			idx[out] = e;
			val[out++] = runs[r]->val[pos[r]];
		}
		if (++pos[r] == runs[r]->n)
			heap[0] = heap[--hn];
		for (uint32_t i = 0;;) { /* sift down */
			uint32_t l = 2 * i + 1, m = i;
			if (l < hn && KEY_LESS(heap[l], heap[m]))
				m = l;
			if (l + 1 < hn && KEY_LESS(heap[l + 1], heap[m]))
				m = l + 1;
			if (m == i)
				break;
			uint32_t t = heap[i];
			heap[i] = heap[m];
			heap[m] = t;
			i = m;
		}
	}
#undef KEY_LESS
	free(heap);
	free(pos);
	idx = dws_xrealloc(idx, (out ? out : 1) * sizeof(uint32_t));
	val = dws_xrealloc(val, (out ? out : 1) * sizeof(uint16_t));
	return dws_patch_new_owned(idx, val, (uint32_t)out);
}

dws_patchset *dws_patchset_add(const dws_patchset *old, dws_patch *run)
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
		dws_patch *one = dws_patch_compact(ps->runs, ps->nruns);
		for (uint32_t i = 0; i < ps->nruns; i++)
			dws_patch_unref(ps->runs[i]);
		ps->runs[0] = one;
		ps->nruns = 1;
	}
	for (uint32_t i = 0; i < ps->nruns; i++)
		ps->entries += ps->runs[i]->n;
	return ps;
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
		for (uint32_t k = run_lower_bound(p, e0); k < p->n && p->idx[k] < e1; k++)
			dst[p->idx[k] - e0] = p->val[k];
	}
}

/* ---- layout ---- */

void dws_layout_unref(dws_layout *l)
{
	if (!l || atomic_fetch_sub(&l->refs, 1) != 1)
		return;
	for (size_t i = 0; i < l->nfiles; i++) {
		free((char *)l->files[i].info.path);
		free(l->files[i].ext);
		dws_blob_unref(l->files[i].blob);
	}
	for (size_t i = 0; i < l->nslots; i++) {
		free(l->slots[i].name);
		free(l->slots[i].trainer);
		free(l->slots[i].shape);
	}
	for (size_t i = 0; i < l->nnodes; i++)
		free(l->node_keys[i]);
	free(l->node_keys);
	free(l->nodes);
	dws_strmap_free(&l->by_node_path);
	dws_strmap_free(&l->by_name);
	dws_strmap_free(&l->by_path);
	free(l->files);
	free(l->slots);
	free(l);
}

/* ---- step accessors ---- */

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
	for (size_t i = 0; i < s->layout->nslots; i++) {
		dws_blob_unref(s->src[i].blob);
		dws_patchset_unref(s->patch[i]);
	}
	dws_layout_unref(s->layout);
	free(s->src);
	free(s->patch);
	free(s->trained);
	free(s);
}

uint64_t dws_step_number(const dws_step *s) { return s->step; }
uint64_t dws_step_anchor(const dws_step *s) { return s->anchor; }
size_t dws_step_chain_length(const dws_step *s) { return s->chain; }
size_t dws_step_file_count(const dws_step *s) { return s->layout->nfiles; }
const dws_file_info *dws_step_file(const dws_step *s, size_t i) { return &s->layout->files[i].info; }

uint64_t dws_step_patch_entries(const dws_step *s)
{
	uint64_t n = 0;
	for (size_t i = 0; i < s->layout->nslots; i++)
		if (s->patch[i])
			n += s->patch[i]->entries;
	return n;
}

int dws_step_file_lookup(const dws_step *s, const char *path)
{
	size_t i;
	return dws_strmap_get(&s->layout->by_path, path, &i) ? (int)i : -1;
}

/* ---- reading ---- */

static uint16_t f16_of_bf16[65536];
static pthread_once_t f16_once = PTHREAD_ONCE_INIT;

static void f16_table_init(void)
{
	for (uint32_t b = 0; b < 65536; b++)
		f16_of_bf16[b] = dws_bf16_to_f16((uint16_t)b);
}

/* Store BF16 value v as element k of dst in dtype out. */
static inline void put_bf16(unsigned char *dst, uint64_t k, dws_dtype out, uint16_t v)
{
	switch (out) {
	case DWS_DT_BF16:
		memcpy(dst + 2 * k, &v, 2);
		break;
	case DWS_DT_F32: {
		uint32_t u = (uint32_t)v << 16;
		memcpy(dst + 4 * k, &u, 4);
		break;
	}
	case DWS_DT_F16:
		memcpy(dst + 2 * k, &f16_of_bf16[v], 2);
		break;
	default:
		break; /* refused when the step was built */
	}
}

enum { CONV_CHUNK = 64 * 1024 }; /* elements converted per scratch fill */

/* Write elements [e0, e0+cnt) of slot's tensor, patched, into dst. */
static int produce(dws_step *s, size_t slot, uint64_t e0, uint64_t cnt,
		   unsigned char *dst, dws_error *err)
{
	const dws_slot *sl = &s->layout->slots[slot];
	const dws_src *src = &s->src[slot];
	size_t ssz = dws_dtype_size(src->dtype);
	int rc;
	/* read ahead within this tensor only: one tensor costs about its bytes */
	dws_blob_readahead_limit(src->off + sl->numel * ssz);
	if (src->dtype == sl->dtype) {
		rc = dws_blob_read(src->blob, src->off + e0 * ssz, dst, cnt * ssz, err);
		if (rc) {
			dws_blob_readahead_limit(UINT64_MAX);
			return rc;
		}
	} else {
		/* only BF16 sources are converted (checked at build) */
		uint16_t scratch[CONV_CHUNK];
		for (uint64_t done = 0; done < cnt;) {
			uint64_t n = cnt - done < CONV_CHUNK ? cnt - done : CONV_CHUNK;
			rc = dws_blob_read(src->blob, src->off + (e0 + done) * 2, scratch, n * 2, err);
			if (rc) {
				dws_blob_readahead_limit(UINT64_MAX);
				return rc;
			}
			unsigned char *d = dst + done * dws_dtype_size(sl->dtype);
			if (sl->dtype == DWS_DT_F32) {
				uint32_t *o = (uint32_t *)(void *)d;
				for (uint64_t k = 0; k < n; k++) {
					uint32_t u = (uint32_t)scratch[k] << 16;
					memcpy(o + k, &u, 4);
				}
			} else {
				for (uint64_t k = 0; k < n; k++)
					memcpy(d + 2 * k, &f16_of_bf16[scratch[k]], 2);
			}
			done += n;
		}
	}
	dws_blob_readahead_limit(UINT64_MAX);
	const dws_patchset *ps = s->patch[slot];
	if (!ps || !cnt)
		return DWS_OK;
	if (sl->dtype == DWS_DT_BF16) {
		/* dst may be unaligned for u16 stores only in theory: tensors start
		 * at even offsets of the data section in every file we serve */
		if (((uintptr_t)dst & 1) == 0) {
			dws_patchset_apply_bf16(ps, e0, cnt, (uint16_t *)(void *)dst);
			return DWS_OK;
		}
	}
	uint64_t e1 = e0 + cnt;
	for (uint32_t r = 0; r < ps->nruns; r++) {
		const dws_patch *p = ps->runs[r];
		for (uint32_t k = run_lower_bound(p, e0); k < p->n && p->idx[k] < e1; k++)
			put_bf16(dst, p->idx[k] - e0, sl->dtype, p->val[k]);
	}
	return DWS_OK;
}

/* Bytes [boff, boff+n) of a tensor's output data; elements cut by the range
 * ends go through a small bounce buffer. */
static int read_tensor(dws_step *s, size_t slot, uint64_t boff, size_t n,
		       unsigned char *dst, dws_error *err)
{
	size_t osz = dws_dtype_size(s->layout->slots[slot].dtype);
	unsigned char tmp[8];
	uint64_t e = boff / osz;
	size_t head = (size_t)(boff % osz);
	int rc;
	if (head) {
		rc = produce(s, slot, e, 1, tmp, err);
		if (rc)
			return rc;
		size_t take = osz - head < n ? osz - head : n;
		memcpy(dst, tmp + head, take);
		dst += take;
		n -= take;
		e++;
	}
	uint64_t whole = n / osz;
	if (whole) {
		rc = produce(s, slot, e, whole, dst, err);
		if (rc)
			return rc;
		dst += whole * osz;
		n -= whole * osz;
		e += whole;
	}
	if (n) {
		rc = produce(s, slot, e, 1, tmp, err);
		if (rc)
			return rc;
		memcpy(dst, tmp, n);
	}
	return DWS_OK;
}

int64_t dws_step_read(dws_step *s, size_t fi, uint64_t off, void *buf,
		      size_t len, dws_error *err)
{
	pthread_once(&f16_once, f16_table_init);
	if (fi >= s->layout->nfiles)
		return dws_fail(err, DWS_ENOENT, "step %llu: no file %zu", (unsigned long long)s->step, fi);
	const dws_out_file *f = &s->layout->files[fi];
	if (off >= f->info.size)
		return 0;
	if (len > f->info.size - off)
		len = (size_t)(f->info.size - off);
	if (len > INT64_MAX)
		len = INT64_MAX;
	/* first extent that ends after off */
	size_t lo = 0, hi = f->next;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (f->ext[mid].off + f->ext[mid].len <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	unsigned char *dst = buf;
	uint64_t pos = off, end = off + len;
	for (size_t i = lo; i < f->next && pos < end; i++) {
		const dws_extent *x = &f->ext[i];
		uint64_t xe = x->off + x->len;
		size_t n = (size_t)((xe < end ? xe : end) - pos);
		int rc = x->slot < 0 ? dws_blob_read(f->blob, pos, dst, n, err)
				     : read_tensor(s, (size_t)x->slot, pos - x->off, n, dst, err);
		if (rc)
			return rc;
		dst += n;
		pos += n;
	}
	return (int64_t)len;
}

/* ---- state digest ---- */

static int cmp_trainer(const void *a, const void *b, void *ctx)
{
	const dws_slot *sl = ctx;
	return strcmp(sl[*(const size_t *)a].trainer, sl[*(const size_t *)b].trainer);
}

/* XXH3-64 over the trainer's view of the model: for each trained tensor in
 * order of its trainer name, the name, a NUL, numel as u64 LE, and its values
 * as BF16. Independent of the base's dtypes and layout; `dwsctl publish`
 * computes the same from the next checkpoint. */
int dws_step_state_digest(dws_step *s, uint64_t *out, dws_error *err)
{
	pthread_once(&f16_once, f16_table_init);
	const dws_layout *L = s->layout;
	size_t *order = dws_xcalloc(L->nslots, sizeof(size_t)), n = 0;
	for (size_t i = 0; i < L->nslots; i++)
		if (s->trained[i])
			order[n++] = i;
	qsort_r(order, n, sizeof(size_t), cmp_trainer, L->slots);
	XXH3_state_t *st = XXH3_createState();
	XXH3_64bits_reset(st);
	enum { CH = 1 << 20 };
	unsigned char *buf = dws_xmalloc(CH * 4);
	uint16_t *bf = dws_xmalloc(CH * 2);
	int rc = DWS_OK;
	for (size_t k = 0; k < n && !rc; k++) {
		const dws_slot *sl = &L->slots[order[k]];
		XXH3_64bits_update(st, sl->trainer, strlen(sl->trainer) + 1);
		uint64_t ne = sl->numel;
		XXH3_64bits_update(st, &ne, 8);
		const dws_src *src = &s->src[order[k]];
		const dws_patchset *ps = s->patch[order[k]];
		size_t ssz = dws_dtype_size(src->dtype);
		for (uint64_t e = 0; e < sl->numel && !rc; e += CH) {
			uint64_t cnt = sl->numel - e < CH ? sl->numel - e : CH;
			rc = dws_blob_read(src->blob, src->off + e * ssz, buf, cnt * ssz, err);
			if (rc)
				break;
			for (uint64_t i = 0; i < cnt; i++) {
				if (src->dtype == DWS_DT_BF16) {
					memcpy(&bf[i], buf + 2 * i, 2);
				} else if (src->dtype == DWS_DT_F16) {
					uint16_t h;
					memcpy(&h, buf + 2 * i, 2);
					bf[i] = dws_f16_to_bf16(h);
				} else {
					float f;
					memcpy(&f, buf + 4 * i, 4);
					bf[i] = dws_f32_to_bf16(f);
				}
			}
			dws_patchset_apply_bf16(ps, e, cnt, bf);
			XXH3_64bits_update(st, bf, cnt * 2);
		}
	}
	*out = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	free(buf);
	free(bf);
	free(order);
	return rc;
}

/* ---- folder tree ---- */

static uint32_t tree_add(dws_layout *L, uint32_t parent, const char *name,
			 size_t len, int64_t file)
{
	char *key = dws_xasprintf("%u/%.*s", parent, (int)len, name);
	size_t found;
	if (dws_strmap_get(&L->by_node_path, key, &found)) {
		free(key);
		return (uint32_t)found;
	}
	uint32_t i = (uint32_t)L->nnodes++;
	L->nodes = dws_xrealloc(L->nodes, L->nnodes * sizeof(*L->nodes));
	L->node_keys = dws_xrealloc(L->node_keys, L->nnodes * sizeof(*L->node_keys));
	L->node_keys[i] = key;
	/* the name is the tail of the key, which lives as long as the layout */
	L->nodes[i] = (dws_node){key + strlen(key) - len, parent, DWS_NODE_NONE, DWS_NODE_NONE, file};
	if (i) {
		dws_node *p = &L->nodes[parent];
		if (p->child == DWS_NODE_NONE) {
			p->child = i;
		} else {
			uint32_t c = p->child;
			while (L->nodes[c].next != DWS_NODE_NONE)
				c = L->nodes[c].next;
			L->nodes[c].next = i;
		}
	}
	dws_strmap_put(&L->by_node_path, key, i);
	return i;
}

void dws_layout_build_tree(dws_layout *L)
{
	dws_strmap_init(&L->by_node_path);
	tree_add(L, 0, "", 0, -1);
	for (size_t f = 0; f < L->nfiles; f++) {
		const char *p = L->files[f].info.path;
		uint32_t dir = 0;
		for (;;) {
			const char *slash = strchr(p, '/');
			if (!slash) {
				tree_add(L, dir, p, strlen(p), (int64_t)f);
				break;
			}
			dir = tree_add(L, dir, p, (size_t)(slash - p), -1);
			if (L->nodes[dir].file >= 0)
				break; /* a file and a folder of one name: the file wins */
			p = slash + 1;
		}
	}
}

size_t dws_step_node_count(const dws_step *s) { return s->layout->nnodes; }
const dws_node *dws_step_node(const dws_step *s, size_t i) { return &s->layout->nodes[i]; }
uint64_t dws_step_id(const dws_step *s) { return s->id; }

uint32_t dws_step_node_lookup(const dws_step *s, uint32_t dir, const char *name)
{
	char *key = dws_xasprintf("%u/%s", dir, name);
	size_t i;
	bool ok = dws_strmap_get(&s->layout->by_node_path, key, &i);
	free(key);
	return ok ? (uint32_t)i : DWS_NODE_NONE;
}
