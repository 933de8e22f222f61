/* libFuzzer target: the safetensors header parser.
 *
 * The whole input is a file. A header the parser accepts must satisfy every
 * invariant it promises (see fuzz_check_header); a header it refuses must give
 * a one-line error with a negative code. The same file is also parsed the way
 * the catalog does (a short prefix, then the byte count it asks for, and
 * through a memory blob) and must give the same answer. */
#include "fuzz_common.h"

static int parse_prefix(const uint8_t *data, size_t size, size_t plen)
{
	dws_st_file *f = NULL;
	dws_error err = {0};
	uint64_t need = 0;
	int rc = dws_st_parse(data, plen, size, "fuzz", &f, &need, &err);
	if (rc == 1) {
		FUZZ_CHECK(f == NULL);
		FUZZ_CHECK(need > plen && need <= size);
		memset(&err, 0, sizeof(err));
		rc = dws_st_parse(data, (size_t)need, size, "fuzz", &f, NULL, &err);
		FUZZ_CHECK(rc != 1);
	}
	if (rc == 0) {
		FUZZ_CHECK(f != NULL && err.code == 0);
		fuzz_check_header(f, data, size);
		dws_st_free(f);
	} else {
		FUZZ_CHECK(f == NULL);
		fuzz_check_error(rc, &err);
	}
	return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	dws_st_file *f = NULL;
	uint64_t need = 0;
	dws_error err = {0};
	int rc = dws_st_parse(data, size, size, "fuzz", &f, &need, &err);
	if (rc == 1) {
		/* it holds the whole file, so it cannot need more; but if it
		 * says so, that must at least be consistent */
		FUZZ_CHECK(f == NULL && need > size);
		return 0;
	}
	if (rc == 0) {
		FUZZ_CHECK(f != NULL);
		FUZZ_CHECK(err.code == 0);
		fuzz_check_header(f, data, size);
		dws_st_free(f);
	} else {
		FUZZ_CHECK(f == NULL);
		fuzz_check_error(rc, &err);
	}

	/* a prefix: the caller learns how much to read and must get the same
	 * verdict (the header is the same bytes) */
	if (size >= 8) {
		size_t plen = 8 + (size - 8) / 2;
		int rc2 = parse_prefix(data, size, plen);
		FUZZ_CHECK((rc2 == 0) == (rc == 0));
		if (rc && rc2)
			FUZZ_CHECK(rc == rc2);
	}

	/* through a blob, as the catalog reads headers */
	void *copy = malloc(size ? size : 1);
	FUZZ_CHECK(copy);
	memcpy(copy, data, size);
	dws_blob *b = dws_blob_from_memory("fuzz", copy, size);
	memset(&err, 0, sizeof(err));
	f = NULL;
	int rc3 = dws_st_read_blob(b, "fuzz", &f, &err);
	FUZZ_CHECK((rc3 == 0) == (rc == 0));
	if (rc3 == 0) {
		fuzz_check_header(f, data, size);
		dws_st_free(f);
	} else {
		FUZZ_CHECK(f == NULL);
		fuzz_check_error(rc3, &err);
	}
	dws_blob_unref(b);
	return 0;
}
