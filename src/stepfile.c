/* Step files read no further than they can legitimately hold.
 *
 * A .zst step file is decompressed header first: the header declares the
 * file's size, which is checked against what the model allows before any of
 * the data is inflated, and then exactly that size is decompressed (a zstd
 * bomb, a small file followed by gigabytes of zeros, stops one chunk past
 * it). What a file may hold, besides its header:
 * - a sparse delta: one index (at most 4 bytes: I32, or a U16/U32 gap) and
 *   one BF16 value per changed element, each tensor named once and its
 *   indices strictly ascending inside it, so at most 6 bytes for each
 *   patchable (float) element of the model;
 * - a dense file applied onto a model (an anchor over a base, an overlay):
 *   each tensor replaces one of the model's with as many elements, in its
 *   dtype or BF16 into a wider float, so at most the model's tensor bytes;
 * - an anchor that starts the layout: what its own header declares.
 * On top, a delta (held in memory) stays within max_delta_bytes, a dense
 * file (a decompressed copy on disk) within its caller's cap. */
#include "step.h"

/* a + b * c, saturating: the caps below are bounds, not sizes to allocate */
static uint64_t add_mul(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t p, s;
	return dws_mul_ok(b, c, &p) && dws_add_ok(a, p, &s) ? s : UINT64_MAX;
}


int dws_delta_check(const dws_st_file *st, uint64_t patchable, const char *what,
		    dws_error *err)
{
	uint64_t cap = add_mul(0, patchable, DWS_SPARSE_BYTES_PER_ELEMENT);
	if (dws_st_data_end(st) > cap)
		return dws_fail(err, DWS_EFORMAT, "%s: too large for a sparse delta of this model: its tensors take %llu bytes, "
				"at most %llu can be legitimate (%d bytes for each of the model's %llu patchable elements)", what,
				(unsigned long long)dws_st_data_end(st), (unsigned long long)cap, DWS_SPARSE_BYTES_PER_ELEMENT,
				(unsigned long long)patchable);
	return DWS_OK;
}

static int over_limit(const char *what, uint64_t size, uint64_t max, dws_error *err)
{
	return dws_fail(err, DWS_EFORMAT, "%s: %llu bytes is more than the %llu byte limit for a delta", what,
			(unsigned long long)size, (unsigned long long)max);
}

int dws_delta_size(dws_blob *raw, bool compressed, uint64_t patchable, uint64_t max_bytes,
		   uint64_t *size, dws_error *err)
{
	const char *what = dws_blob_name(raw);
	if (!compressed) {
		/* the header is parsed once the file is in memory: what it could
		 * be at most is known already */
		*size = dws_blob_size(raw);
		uint64_t cap = add_mul(8 + (uint64_t)DWS_ST_MAX_HEADER, patchable, DWS_SPARSE_BYTES_PER_ELEMENT);
		if (*size > cap)
			return dws_fail(err, DWS_EFORMAT, "%s: too large for a sparse delta of this model: %llu bytes, at most %llu "
					"can be legitimate (a header of at most %u bytes, %d bytes for each of the model's %llu patchable elements)",
					what, (unsigned long long)*size, (unsigned long long)cap, DWS_ST_MAX_HEADER,
					DWS_SPARSE_BYTES_PER_ELEMENT, (unsigned long long)patchable);
		return *size > max_bytes || *size > SIZE_MAX ? over_limit(what, *size, max_bytes, err) : DWS_OK;
	}
	dws_st_file *st = NULL;
	int rc = dws_zstd_st_header(raw, &st, size, err);
	if (!rc)
		rc = dws_delta_check(st, patchable, what, err);
	if (!rc && (*size > max_bytes || *size > SIZE_MAX))
		rc = over_limit(what, *size, max_bytes, err);
	dws_st_free(st);
	return rc;
}

int dws_dense_zstd(dws_blob *raw, const char *tmpdir, uint64_t model_bytes, uint64_t max_bytes,
		   dws_blob **out, dws_error *err)
{
	const char *what = dws_blob_name(raw);
	dws_st_file *st = NULL;
	uint64_t size;
	int rc = dws_zstd_st_header(raw, &st, &size, err);
	if (!rc && dws_st_data_end(st) > model_bytes)
		rc = dws_fail(err, DWS_EFORMAT, "%s: too large for this model: its tensors take %llu bytes, the model's %llu", what,
			      (unsigned long long)dws_st_data_end(st), (unsigned long long)model_bytes);
	else if (!rc && size > max_bytes)
		rc = dws_fail(err, DWS_EFORMAT, "%s: %llu bytes is more than the %llu byte limit for a decompressed file", what,
			      (unsigned long long)size, (unsigned long long)max_bytes);
	dws_st_free(st);
	return rc ? rc : dws_zstd_st_file(raw, tmpdir, size, out, err);
}
