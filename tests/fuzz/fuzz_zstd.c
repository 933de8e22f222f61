/* libFuzzer target: zstd objects (.safetensors.zst).
 *
 * The input is a compressed object. Its first 4 KiB are decompressed into
 * memory (as the catalog does to read a header), then the whole object is
 * decompressed into an unlinked temporary file with a 16 MiB cap (as the
 * builder does). Neither may crash or exceed its bound, and when both succeed
 * they must agree. A decompressed file is then read as a safetensors header
 * through the blob, as the catalog does. */
#include "fuzz_common.h"

#define PREFIX_WANT 4096
#define MAX_OUT (1u << 24)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	void *copy = malloc(size ? size : 1);
	FUZZ_CHECK(copy);
	memcpy(copy, data, size);
	dws_blob *src = dws_blob_from_memory("fuzz.safetensors.zst", copy, size);
	FUZZ_CHECK(src && dws_blob_size(src) == size);

	void *pre = NULL;
	size_t pre_len = 0;
	dws_error err = {0};
	int prc = dws_zstd_prefix(src, PREFIX_WANT, &pre, &pre_len, &err);
	if (prc == 0) {
		FUZZ_CHECK(err.code == 0);
		FUZZ_CHECK(pre && pre_len <= PREFIX_WANT);
	} else {
		fuzz_check_error(prc, &err);
	}

	dws_blob *out = NULL;
	memset(&err, 0, sizeof(err));
	int rc = dws_blob_zstd(src, NULL, MAX_OUT, &out, &err);
	if (rc == 0) {
		FUZZ_CHECK(err.code == 0);
		FUZZ_CHECK(out);
		uint64_t osz = dws_blob_size(out);
		FUZZ_CHECK(osz <= MAX_OUT);
		/* a whole decode that succeeds means the prefix decode did too,
		 * and gave the same first bytes */
		FUZZ_CHECK(prc == 0);
		FUZZ_CHECK(pre_len == (osz < PREFIX_WANT ? osz : PREFIX_WANT));
		unsigned char buf[PREFIX_WANT];
		memset(&err, 0, sizeof(err));
		FUZZ_CHECK(dws_blob_read(out, 0, buf, pre_len, &err) == 0);
		FUZZ_CHECK(memcmp(buf, pre, pre_len) == 0);
		/* reading past the end is an error, not a crash */
		memset(&err, 0, sizeof(err));
		int r = dws_blob_read(out, osz, buf, 1, &err);
		FUZZ_CHECK(r < 0);
		fuzz_check_error(r, &err);

		/* the header of the decompressed file, as the catalog reads it */
		dws_st_file *f = NULL;
		memset(&err, 0, sizeof(err));
		r = dws_st_read_blob(out, "fuzz", &f, &err);
		if (r == 0) {
			unsigned char *head = malloc((size_t)dws_st_data_start(f));
			FUZZ_CHECK(head);
			memset(&err, 0, sizeof(err));
			FUZZ_CHECK(dws_blob_read(out, 0, head, (size_t)dws_st_data_start(f), &err) == 0);
			fuzz_check_header(f, head, osz);
			free(head);
			dws_st_free(f);
		} else {
			FUZZ_CHECK(f == NULL);
			fuzz_check_error(r, &err);
		}
		dws_blob_unref(out); /* closes the temporary file */
	} else {
		FUZZ_CHECK(out == NULL);
		fuzz_check_error(rc, &err);
		/* a prefix that ended early saw the whole stream end cleanly,
		 * so the whole decode must have succeeded too */
		FUZZ_CHECK(!(rc == DWS_EFORMAT && prc == 0 && pre_len < PREFIX_WANT));
	}
	free(pre);
	dws_blob_unref(src);
	return 0;
}
