/* The state digest: see digest.h. */
#include "digest.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

enum { CHUNK = 1 << 20 }; /* elements read at a time */

static int cmp_item(const void *a, const void *b)
{
	return strcmp(((const dws_digest_item *)a)->name, ((const dws_digest_item *)b)->name);
}

int dws_state_digest(dws_digest_item *items, size_t n, dws_bf16_read_fn read, void *ctx,
		     uint64_t *out, dws_error *err)
{
	if (n)
		qsort(items, n, sizeof(*items), cmp_item);
	XXH3_state_t *st = XXH3_createState();
	XXH3_64bits_reset(st);
	uint16_t *bf = dws_xmalloc(CHUNK * sizeof(uint16_t));
	void *scratch = dws_xmalloc(CHUNK * 4);
	int rc = DWS_OK;
	for (size_t i = 0; i < n && !rc; i++) {
		const dws_digest_item *t = &items[i];
		XXH3_64bits_update(st, t->name, strlen(t->name) + 1);
		uint64_t ne = t->numel;
		XXH3_64bits_update(st, &ne, 8);
		for (uint64_t e = 0; e < t->numel && !rc; e += CHUNK) {
			uint64_t k = t->numel - e < CHUNK ? t->numel - e : CHUNK;
			rc = read(ctx, t->ref, e, k, bf, scratch, err);
			if (!rc)
				dws_xxh3_update(st, bf, k * 2);
		}
	}
	*out = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	free(bf);
	free(scratch);
	return rc;
}

int dws_state_check(uint64_t got, const char *want, const char *what, uint64_t step,
		    dws_error *err)
{
	char hex[17];
	snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)got);
	if (strcmp(hex, want) != 0)
		return dws_fail(err, DWS_EVERIFY, "%s: step %llu does not match the producer's state checksum (got %s, want %.16s)",
				what, (unsigned long long)step, hex, want);
	return DWS_OK;
}

void dws_to_bf16(dws_dtype dt, const void *src, uint64_t n, uint16_t *out)
{
	if (dt == DWS_DT_F32) {
		for (uint64_t i = 0; i < n; i++) {
			float f;
			memcpy(&f, (const char *)src + 4 * i, 4);
			out[i] = dws_f32_to_bf16(f);
		}
	} else if (dt == DWS_DT_F16) {
		for (uint64_t i = 0; i < n; i++) {
			uint16_t h;
			memcpy(&h, (const char *)src + 2 * i, 2);
			out[i] = dws_f16_to_bf16(h);
		}
	} else if (src != out) {
		memcpy(out, src, (size_t)n * 2);
	}
}
