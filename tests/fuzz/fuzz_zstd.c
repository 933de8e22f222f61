/* libFuzzer target: zstd objects (.safetensors.zst).
 *
 * The input is a compressed object. Its first 4 KiB are decompressed into
 * memory (as the catalog does to read a header), then the whole object is
 * decompressed into an unlinked temporary file with a 16 MiB cap. Neither may
 * crash or exceed its bound, and when both succeed they must agree. A
 * decompressed file is then read as a safetensors header through the blob, as
 * the catalog does. Last, the object is read as the builder reads a step
 * file: its header first, then exactly the size that header declares, into
 * memory and into a temporary file; where that succeeds, the whole decode
 * did too, to the same bytes, and they parse as a whole file. */
#include "fuzz_common.h"

#define PREFIX_WANT 4096
#define MAX_OUT (1u << 24)

/* dws_zstd_st_header, then dws_zstd_st_read and _file of what it declares;
 * whole/whole_len: the whole decode, NULL if it failed. */
static void check_exact(dws_blob *src, dws_blob *whole, uint64_t whole_len)
{
	dws_st_file *h = NULL;
	uint64_t size = 0;
	dws_error err = {0};
	int rc = dws_zstd_st_header(src, &h, &size, &err);
	if (rc) {
		FUZZ_CHECK(h == NULL);
		fuzz_check_error(rc, &err);
		return;
	}
	FUZZ_CHECK(h && size == dws_st_data_start(h) + dws_st_data_end(h));
	dws_st_free(h);
	if (size > MAX_OUT)
		return;
	unsigned char *buf = malloc(size ? (size_t)size : 1);
	FUZZ_CHECK(buf);
	memset(&err, 0, sizeof(err));
	rc = dws_zstd_st_read(src, buf, size, &err);
	dws_blob *file = NULL;
	dws_error ferr = {0};
	int frc = dws_zstd_st_file(src, NULL, size, &file, &ferr);
	FUZZ_CHECK((rc == 0) == (frc == 0));
	if (rc) {
		fuzz_check_error(rc, &err);
		fuzz_check_error(frc, &ferr);
		FUZZ_CHECK(file == NULL);
	} else {
		/* exactly the stream: the whole decode ended there too */
		FUZZ_CHECK(whole && whole_len == size);
		FUZZ_CHECK(file && dws_blob_size(file) == size);
		unsigned char *a = malloc(size ? (size_t)size : 1), *b = malloc(size ? (size_t)size : 1);
		FUZZ_CHECK(a && b);
		memset(&err, 0, sizeof(err));
		FUZZ_CHECK(dws_blob_read(whole, 0, a, (size_t)size, &err) == 0);
		FUZZ_CHECK(dws_blob_read(file, 0, b, (size_t)size, &err) == 0);
		FUZZ_CHECK(memcmp(a, buf, (size_t)size) == 0 && memcmp(b, buf, (size_t)size) == 0);
		free(a);
		free(b);
		/* and the bytes are a whole safetensors file, no byte past its tensors */
		dws_st_file *f = NULL;
		memset(&err, 0, sizeof(err));
		FUZZ_CHECK(dws_st_parse(buf, (size_t)size, size, "fuzz", &f, NULL, &err) == 0);
		fuzz_check_header(f, buf, size);
		dws_st_free(f);
	}
	dws_blob_unref(file);
	free(buf);
}

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
		check_exact(src, out, osz);
		dws_blob_unref(out); /* closes the temporary file */
	} else {
		FUZZ_CHECK(out == NULL);
		fuzz_check_error(rc, &err);
		/* a prefix that ended early saw the whole stream end cleanly,
		 * so the whole decode must have succeeded too */
		FUZZ_CHECK(!(rc == DWS_EFORMAT && prc == 0 && pre_len < PREFIX_WANT));
		check_exact(src, NULL, 0);
	}
	free(pre);
	dws_blob_unref(src);
	return 0;
}
