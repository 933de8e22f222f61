/* Sparse delta decoding: one file -> sorted (index, BF16 value) lists. */
#ifndef DWSFS_DELTA_H
#define DWSFS_DELTA_H

#include "internal.h"

#include <string.h>

typedef struct dws_delta_param {
	const char *name;           /* value tensor name (borrowed from st) */
	int name_len;               /* length of the parameter name within it */
	size_t slot;                /* what the resolver returned */
	uint64_t count;
	uint32_t *idx;              /* strictly ascending, < numel; owned unless pooled */
	bool pooled;                /* idx lies in the caller's pool */
	const unsigned char *val;   /* count BF16 values, little endian, unaligned */
	const unsigned char *idx_raw; /* the index tensor's data, as in the file */
	int idx_kind;               /* DWS_IDX_* */
} dws_delta_param;

/* How a param's index tensor is encoded. */
enum { DWS_IDX_I32, DWS_IDX_GAP16, DWS_IDX_GAP32 };

/* Entry k of an index tensor of this kind, after the index `last` (the one
 * of entry k-1; UINT64_MAX before the first): the format's rule, in this one
 * place. I32 entries are absolute offsets, which must ascend strictly (false
 * when one does not); U16/U32 entries are gaps, idx[k] = idx[k-1] + g[k] + 1
 * with idx[-1] = -1, ascending by construction. An index past the tensor is
 * the caller's to check (the last one suffices). Called with a constant kind
 * in the hot loops, so the switch folds away. */
static inline bool dws_idx_entry(int kind, const unsigned char *raw, uint64_t k, uint64_t last, uint64_t *out)
{
	switch (kind) {
	case DWS_IDX_GAP16: {
		uint16_t g;
		memcpy(&g, raw + 2 * k, 2);
		*out = last + g + 1; /* UINT64_MAX + g + 1 wraps to g */
		return true;
	}
	case DWS_IDX_GAP32: {
		uint32_t g;
		memcpy(&g, raw + 4 * k, 4);
		*out = last + g + 1;
		return true;
	}
	default: {
		int32_t v;
		memcpy(&v, raw + 4 * k, 4);
		*out = (uint64_t)(int64_t)v;
		return (int64_t)v > (int64_t)last; /* (int64_t)UINT64_MAX is -1 */
	}
	}
}

/* The errors of that rule, one line each naming the object (what), the
 * param and the place. */
int dws_idx_order_fail(const dws_delta_param *p, uint64_t k, uint64_t last, const char *what, dws_error *err);
int dws_idx_range_fail(const dws_delta_param *p, uint64_t ix, uint64_t numel, const char *what, dws_error *err);

/* Maps a trainer parameter name to the output tensor it patches: returns 0 and
 * fills slot and numel, or -1 if the model has no such tensor. */
typedef int (*dws_resolve_fn)(void *ctx, const char *name, size_t *slot,
			      uint64_t *numel);

/* Decode a sparse file. `data` is the data section (after the header). */
int dws_delta_decode(const dws_st_file *st, const unsigned char *data,
		     uint64_t data_len, dws_variant v, const char *what,
		     dws_resolve_fn resolve, void *ctx, dws_delta_param **out,
		     size_t *n, dws_error *err);
/* The same, with every param's indices placed in pool (room for the file's
 * total value count, dws_delta_value_count) instead of allocated one by one. */
int dws_delta_decode_pool(const dws_st_file *st, const unsigned char *data,
			  uint64_t data_len, dws_variant v, const char *what,
			  dws_resolve_fn resolve, void *ctx, uint32_t *pool,
			  dws_delta_param **out, size_t *n, dws_error *err);
/* Every check of dws_delta_decode except the index values: idx stays NULL,
 * idx_raw and idx_kind say where they are. Whoever applies them must check
 * each index (ascending, inside the tensor) as decode_idx does. */
int dws_delta_scan(const dws_st_file *st, const unsigned char *data,
		   uint64_t data_len, dws_variant v, const char *what,
		   dws_resolve_fn resolve, void *ctx, dws_delta_param **out,
		   size_t *n, dws_error *err);
/* Elements in the file's value tensors (bounded by its size). */
uint64_t dws_delta_value_count(const dws_st_file *st, dws_variant v);
void dws_delta_free(dws_delta_param *p, size_t n);

#endif
