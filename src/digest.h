/* The state digest (metadata dwsfs.state_xxh3): one definition for the
 * producer (dwsctl publish, over a checkpoint) and every reader (a step, an
 * extracted folder). */
#ifndef DWSFS_DIGEST_H
#define DWSFS_DIGEST_H

#include "internal.h"

/* One tensor of the trainer's view: its trainer name, its element count, and
 * `ref`, what the reader needs to find it. */
typedef struct dws_digest_item {
	const char *name;
	uint64_t numel;
	size_t ref;
} dws_digest_item;

/* Elements [e0, e0+n) of tensor `ref` as BF16 into out (scratch: room for n
 * elements of 4 bytes). */
typedef int (*dws_bf16_read_fn)(void *ctx, size_t ref, uint64_t e0, uint64_t n, uint16_t *out,
				void *scratch, dws_error *err);

/* XXH3-64 over the items sorted by name (sorted in place): for each, the
 * name, a NUL, numel as u64 LE, and its values as BF16. Independent of the
 * stored dtypes and layout. */
int dws_state_digest(dws_digest_item *items, size_t n, dws_bf16_read_fn read, void *ctx,
		     uint64_t *out, dws_error *err);

/* got against the producer's checksum `want` (16 hex digits): DWS_EVERIFY
 * with one line naming `what` and the step when they differ. */
int dws_state_check(uint64_t got, const char *want, const char *what, uint64_t step,
		    dws_error *err);

/* n values of dtype dt at src (F32, F16 or BF16) as BF16, rounded to nearest
 * even as torch's .to(bfloat16) does. */
void dws_to_bf16(dws_dtype dt, const void *src, uint64_t n, uint16_t *out);

#endif
