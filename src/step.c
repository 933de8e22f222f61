/* Steps as values: reading bytes of a reconstructed file, and the merged
 * patch index that keeps the cost of a read independent of chain length. */
#include "step.h"
#include "digest.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* ---- layout ---- */

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

size_t dws_step_whole_tensors(const dws_step *s, uint64_t *bytes)
{
	size_t n = 0;
	uint64_t b = 0;
	for (size_t i = 0; i < s->layout->nslots; i++) {
		const dws_patchset *ps = s->patch[i];
		if (ps && ps->nruns && ps->runs[0]->full) {
			n++;
			b += s->layout->slots[i].numel * 2;
		}
	}
	*bytes = b;
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

struct put_ctx {
	unsigned char *dst;
	dws_dtype dtype;
};

static void put_each(void *ctx, uint64_t k, uint16_t v)
{
	const struct put_ctx *pc = ctx;
	put_bf16(pc->dst, k, pc->dtype, v);
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
	const dws_patchset *full = s->patch[slot];
	if (full && full->nruns && full->runs[0]->full && sl->dtype == DWS_DT_BF16 && ((uintptr_t)dst & 1) == 0) {
		/* the whole tensor is in memory: no source read */
		dws_patchset_apply_bf16(full, e0, cnt, (uint16_t *)(void *)dst);
		return DWS_OK;
	}
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
	struct put_ctx pc = {dst, sl->dtype};
	dws_patchset_each(ps, e0, cnt, put_each, &pc);
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

/* The pieces of a reply (dws_step_read_iov). */
struct pieces {
	struct iovec *iov;
	size_t n, cap;
	dws_pin *pins;
	size_t npins;
	const unsigned char *buf_end; /* end of the last piece if it is in buf */
};

/* Bytes for [dst, dst+n) of buf are at ref (== dst: produced in place).
 * Pieces in buf are contiguous unless a pointed-to piece comes between, so
 * a pointed-to piece is taken only with a slot left for the buf piece after
 * it; without, its bytes are copied into place. */
static void piece_add(struct pieces *P, unsigned char *dst, const void *ref, size_t n, dws_pin *pin)
{
	if (ref != dst && P->n + 2 > P->cap) {
		memcpy(dst, ref, n);
		dws_pin_release(pin);
		ref = dst;
	}
	if (ref != dst) {
		P->iov[P->n++] = (struct iovec){(void *)ref, n};
		P->pins[P->npins++] = *pin;
		P->buf_end = NULL;
		return;
	}
	if (P->n && P->buf_end == dst)
		P->iov[P->n - 1].iov_len += n;
	else
		P->iov[P->n++] = (struct iovec){dst, n};
	P->buf_end = dst + n;
}

/* A tensor held whole in memory: one full run, BF16 out. */
static dws_patch *full_tensor(const dws_step *s, size_t slot)
{
	const dws_patchset *ps = s->patch[slot];
	if (ps && ps->nruns == 1 && ps->runs[0]->full && s->layout->slots[slot].dtype == DWS_DT_BF16)
		return ps->runs[0];
	return NULL;
}

bool dws_step_file_local(dws_step *s, size_t fi)
{
	if (fi >= s->layout->nfiles)
		return false;
	const dws_out_file *f = &s->layout->files[fi];
	for (size_t i = 0; i < f->next; i++) {
		const dws_extent *x = &f->ext[i];
		if (x->slot < 0) {
			if (!dws_blob_local(f->blob, x->off, x->len))
				return false;
			continue;
		}
		const dws_src *src = &s->src[x->slot];
		uint64_t bytes;
		if (full_tensor(s, (size_t)x->slot) || !src->blob)
			continue; /* the source is not read */
		if (!dws_mul_ok(s->layout->slots[x->slot].numel, dws_dtype_size(src->dtype), &bytes) ||
		    !dws_blob_local(src->blob, src->off, bytes))
			return false;
	}
	return true;
}

static void patch_unpin(void *p, void *unused)
{
	(void)unused;
	dws_patch_unref(p);
}

/* A tensor served as its source's bytes: no patch, no conversion. */
static bool plain_tensor(const dws_step *s, size_t slot)
{
	const dws_patchset *ps = s->patch[slot];
	return (!ps || !ps->nruns) && s->src[slot].dtype == s->layout->slots[slot].dtype;
}

static int64_t step_read(dws_step *s, size_t fi, uint64_t off, void *buf, size_t len,
			 struct pieces *P, dws_error *err)
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
		const void *ref = dst;
		dws_pin pin = {0};
		dws_patch *run;
		int rc;
		if (x->slot < 0) {
			rc = P ? dws_blob_read_ref(f->blob, pos, dst, n, &ref, &pin, err)
			       : dws_blob_read(f->blob, pos, dst, n, err);
		} else if (P && (run = full_tensor(s, (size_t)x->slot))) {
			/* the reply points into the run, which the pin keeps */
			atomic_fetch_add(&run->refs, 1);
			ref = (const unsigned char *)run->val + (pos - x->off);
			pin = (dws_pin){patch_unpin, run, NULL};
			rc = DWS_OK;
		} else if (P && plain_tensor(s, (size_t)x->slot)) {
			const dws_src *src = &s->src[x->slot];
			dws_blob_readahead_limit(src->off + x->len);
			rc = dws_blob_read_ref(src->blob, src->off + (pos - x->off), dst, n, &ref, &pin, err);
			dws_blob_readahead_limit(UINT64_MAX);
		} else {
			rc = read_tensor(s, (size_t)x->slot, pos - x->off, n, dst, err);
		}
		if (rc) {
			for (size_t k = 0; P && k < P->npins; k++)
				dws_pin_release(&P->pins[k]);
			return rc;
		}
		if (P)
			piece_add(P, dst, ref, n, &pin);
		dst += n;
		pos += n;
	}
	return (int64_t)len;
}

int64_t dws_step_read(dws_step *s, size_t fi, uint64_t off, void *buf,
		      size_t len, dws_error *err)
{
	return step_read(s, fi, off, buf, len, NULL, err);
}

int64_t dws_step_read_iov(dws_step *s, size_t fi, uint64_t off, void *buf,
			  size_t len, struct iovec *iov, size_t *niov,
			  dws_pin *pins, size_t *npins, dws_error *err)
{
	struct pieces P = {.iov = iov, .cap = *niov ? *niov : 1, .pins = pins};
	*niov = 0;
	*npins = 0;
	int64_t n = step_read(s, fi, off, buf, len, &P, err);
	if (n >= 0) {
		*niov = P.n;
		*npins = P.npins;
	}
	return n;
}

/* ---- state digest (digest.h) ---- */

/* Elements [e0, e0+n) of slot's tensor as the trainer sees them: BF16. */
static int step_bf16(void *ctx, size_t slot, uint64_t e0, uint64_t n, uint16_t *out,
		     void *scratch, dws_error *err)
{
	dws_step *s = ctx;
	const dws_src *src = &s->src[slot];
	size_t ssz = dws_dtype_size(src->dtype);
	void *raw = src->dtype == DWS_DT_BF16 ? (void *)out : scratch;
	int rc = dws_blob_read(src->blob, src->off + e0 * ssz, raw, n * ssz, err);
	if (rc)
		return rc;
	dws_to_bf16(src->dtype, raw, n, out);
	dws_patchset_apply_bf16(s->patch[slot], e0, n, out);
	return DWS_OK;
}

size_t dws_step_digest_items(const dws_step *s, dws_digest_item **out)
{
	const dws_layout *L = s->layout;
	dws_digest_item *v = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(*v));
	size_t n = 0;
	for (size_t i = 0; i < L->nslots; i++)
		if (s->trained[i])
			v[n++] = (dws_digest_item){L->slots[i].trainer, L->slots[i].numel, i};
	*out = v;
	return n;
}

int dws_step_state_digest(dws_step *s, uint64_t *out, dws_error *err)
{
	dws_digest_item *items;
	size_t n = dws_step_digest_items(s, &items);
	int rc = dws_state_digest(items, n, step_bf16, s, out, err);
	free(items);
	return rc;
}

int dws_step_check_state(dws_step *s, const char *want, const char *what, dws_error *err)
{
	if (!want || !want[0])
		return DWS_OK;
	uint64_t h;
	int rc = dws_step_state_digest(s, &h, err);
	return rc ? rc : dws_state_check(h, want, what, s->step, err);
}

size_t dws_step_node_count(const dws_step *s) { return s->layout->nnodes; }
const dws_node *dws_step_node(const dws_step *s, size_t i) { return &s->layout->nodes[i]; }
uint64_t dws_step_id(const dws_step *s) { return s->id; }

uint32_t dws_step_node_lookup(const dws_step *s, uint32_t dir, const char *name)
{
	return dws_layout_node_lookup(s->layout, dir, name);
}
