/* Reading a step's files: each extent is the layout file's own bytes or a
 * tensor, read from its source (converting dtype where the output differs)
 * with its patch applied window by window, or pointed to where it sits whole
 * in memory. The cost of a read does not grow with the chain: a tensor
 * carries a few merged runs, never the deltas themselves. */
#include "step_int.h"
#include "patchmem.h"

#include <stdlib.h>
#include <string.h>

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
static int produce(const dws_layout *L, const dws_steptab *t, size_t slot, uint64_t e0, uint64_t cnt,
		   unsigned char *dst, dws_error *err)
{
	const dws_slot *sl = &L->slots[slot];
	const dws_src *src = &t->src[slot];
	size_t ssz = dws_dtype_size(src->dtype);
	int rc;
	const dws_patchset *full = t->patch[slot];
	if (full && full->nruns && full->runs[0]->full && sl->dtype == DWS_DT_BF16 && ((uintptr_t)dst & 1) == 0) {
		/* the whole tensor is in memory: no source read */
		dws_patchset_apply_bf16(full, e0, cnt, (uint16_t *)(void *)dst);
		return DWS_OK;
	}
	/* read ahead within this tensor only: one tensor costs about its bytes */
	const dws_read_hint hint = {DWS_READ_NORMAL, src->off + sl->numel * ssz};
	if (src->dtype == sl->dtype) {
		rc = dws_blob_read_hint(src->blob, src->off + e0 * ssz, dst, cnt * ssz, &hint, err);
		if (rc)
			return rc;
	} else {
		/* only BF16 sources are converted (checked at build) */
		uint16_t scratch[CONV_CHUNK];
		for (uint64_t done = 0; done < cnt;) {
			uint64_t n = cnt - done < CONV_CHUNK ? cnt - done : CONV_CHUNK;
			rc = dws_blob_read_hint(src->blob, src->off + (e0 + done) * 2, scratch, n * 2, &hint, err);
			if (rc)
				return rc;
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
	const dws_patchset *ps = t->patch[slot];
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
static int read_tensor(const dws_layout *L, const dws_steptab *t, size_t slot, uint64_t boff, size_t n,
		       unsigned char *dst, dws_error *err)
{
	size_t osz = dws_dtype_size(L->slots[slot].dtype);
	unsigned char tmp[8];
	uint64_t e = boff / osz;
	size_t head = (size_t)(boff % osz);
	int rc;
	if (head) {
		rc = produce(L, t, slot, e, 1, tmp, err);
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
		rc = produce(L, t, slot, e, whole, dst, err);
		if (rc)
			return rc;
		dst += whole * osz;
		n -= whole * osz;
		e += whole;
	}
	if (n) {
		rc = produce(L, t, slot, e, 1, tmp, err);
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
static dws_patch *full_tensor(const dws_layout *L, const dws_steptab *t, size_t slot)
{
	const dws_patchset *ps = t->patch[slot];
	if (ps && ps->nruns == 1 && ps->runs[0]->full && L->slots[slot].dtype == DWS_DT_BF16)
		return ps->runs[0];
	return NULL;
}

/* Whether every byte of file f can be produced without a fetch. */
static bool file_local(const dws_layout *L, const dws_steptab *t, const dws_out_file *f)
{
	for (size_t i = 0; i < f->next; i++) {
		const dws_extent *x = &f->ext[i];
		if (x->slot < 0) {
			if (!dws_blob_local(f->blob, x->off, x->len))
				return false;
			continue;
		}
		const dws_src *src = &t->src[x->slot];
		uint64_t bytes;
		if (full_tensor(L, t, (size_t)x->slot) || !src->blob)
			continue; /* the source is not read */
		if (!dws_mul_ok(L->slots[x->slot].numel, dws_dtype_size(src->dtype), &bytes) ||
		    !dws_blob_local(src->blob, src->off, bytes))
			return false;
	}
	return true;
}

bool dws_step_file_local(dws_step *s, size_t fi)
{
	if (fi >= s->layout->nfiles)
		return false;
	dws_steptab *t = dws_step_tab(s);
	bool local = file_local(s->layout, t, &s->layout->files[fi]);
	dws_steptab_put(t);
	return local;
}

static void patch_unpin(void *p, void *unused)
{
	(void)unused;
	dws_patch_unref(p);
}

/* A tensor served as its source's bytes: no patch, no conversion. */
static bool plain_tensor(const dws_layout *L, const dws_steptab *t, size_t slot)
{
	const dws_patchset *ps = t->patch[slot];
	return (!ps || !ps->nruns) && t->src[slot].dtype == L->slots[slot].dtype;
}

/* Bytes [pos, pos+n) of extent x of file f into dst, or, with P, pointed
 * to where they sit whole in memory (*ref, kept by *pin). */
static int read_extent(const dws_layout *L, const dws_steptab *t, const dws_out_file *f, const dws_extent *x,
		       uint64_t pos, size_t n, unsigned char *dst, bool ref_ok, const void **ref, dws_pin *pin,
		       dws_error *err)
{
	dws_patch *run;
	if (x->slot < 0)
		return ref_ok ? dws_blob_read_ref(f->blob, pos, dst, n, ref, pin, err) : dws_blob_read(f->blob, pos, dst, n, err);
	/* a spilled run's pages are small: pinned one by one for a reply
	 * pointing into them, they cost more than a copy */
	if (ref_ok && (run = full_tensor(L, t, (size_t)x->slot)) && !run->own[1].disk) {
		/* the reply points into the run, which the pin keeps */
		atomic_fetch_add(&run->refs, 1);
		*ref = (const unsigned char *)run->val + (pos - x->off);
		*pin = (dws_pin){patch_unpin, run, NULL};
		return DWS_OK;
	}
	if (ref_ok && plain_tensor(L, t, (size_t)x->slot)) {
		const dws_src *src = &t->src[x->slot];
		const dws_read_hint hint = {DWS_READ_NORMAL, src->off + x->len}; /* this tensor's end */
		return dws_blob_read_ref_hint(src->blob, src->off + (pos - x->off), dst, n, &hint, ref, pin, err);
	}
	return read_tensor(L, t, (size_t)x->slot, pos - x->off, n, dst, err);
}

/* The first extent of f that ends after off. */
static size_t extent_at(const dws_out_file *f, uint64_t off)
{
	size_t lo = 0, hi = f->next;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (f->ext[mid].off + f->ext[mid].len <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int64_t step_read(dws_step *s, size_t fi, uint64_t off, void *buf, size_t len,
			 struct pieces *P, dws_error *err)
{
	pthread_once(&f16_once, f16_table_init);
	dws_pmem_trim(len); /* spilled patches' pages read before leave the process */
	const dws_layout *L = s->layout;
	if (fi >= L->nfiles)
		return dws_fail(err, DWS_ENOENT, "step %llu: no file %zu", (unsigned long long)s->step, fi);
	const dws_out_file *f = &L->files[fi];
	if (off >= f->info.size)
		return 0;
	if (len > f->info.size - off)
		len = (size_t)(f->info.size - off);
	if (len > INT64_MAX)
		len = INT64_MAX;
	dws_steptab *t = dws_step_tab(s);
	unsigned char *dst = buf;
	uint64_t pos = off, end = off + len;
	int rc = DWS_OK;
	for (size_t i = extent_at(f, off); i < f->next && pos < end && !rc; i++) {
		const dws_extent *x = &f->ext[i];
		uint64_t xe = x->off + x->len;
		size_t n = (size_t)((xe < end ? xe : end) - pos);
		const void *ref = dst;
		dws_pin pin = {0};
		rc = read_extent(L, t, f, x, pos, n, dst, P != NULL, &ref, &pin, err);
		if (!rc && P)
			piece_add(P, dst, ref, n, &pin);
		dst += n;
		pos += n;
	}
	dws_steptab_put(t);
	if (rc) {
		for (size_t k = 0; P && k < P->npins; k++)
			dws_pin_release(&P->pins[k]);
		return rc;
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

