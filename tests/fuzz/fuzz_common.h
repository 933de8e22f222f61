/* Shared helpers for the libFuzzer targets (not part of the library). */
#ifndef DWSFS_FUZZ_COMMON_H
#define DWSFS_FUZZ_COMMON_H

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant the library promises does not hold: crash so libFuzzer keeps
 * the input. */
#define FUZZ_CHECK(cond)                                                      \
	do {                                                                  \
		if (!(cond)) {                                                \
			fprintf(stderr, "%s:%d: invariant failed: %s\n",      \
				__FILE__, __LINE__, #cond);                   \
			abort();                                              \
		}                                                             \
	} while (0)

/* FUZZ_VERBOSE=1 in the environment: print every error the library gives
 * (to see why seeds are refused). */
static inline bool fuzz_verbose(void)
{
	static int v = -1;
	if (v < 0) {
		const char *e = getenv("FUZZ_VERBOSE");
		v = e && *e && *e != '0';
	}
	return v;
}

/* A failed call must leave one non-empty line and a negative code. */
static inline void fuzz_check_error(int rc, const dws_error *err)
{
	FUZZ_CHECK(rc < 0);
	FUZZ_CHECK(err->code < 0);
	FUZZ_CHECK(err->code == rc);
	size_t n = strnlen(err->msg, sizeof(err->msg));
	FUZZ_CHECK(n > 0 && n < sizeof(err->msg));
	FUZZ_CHECK(!memchr(err->msg, '\n', n) && !memchr(err->msg, '\r', n));
	if (fuzz_verbose())
		fprintf(stderr, "fuzz: %s: %s\n", dws_code_name(rc), err->msg);
}

/* Every invariant dws_st_parse promises about a header it accepted, for a
 * file of file_size bytes whose first bytes are `raw`. */
static int fuzz_cmp_begin(const void *a, const void *b)
{
	const dws_st_tensor *x = *(const dws_st_tensor *const *)a;
	const dws_st_tensor *y = *(const dws_st_tensor *const *)b;
	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return (x->end > y->end) - (x->end < y->end);
}

static inline void fuzz_check_header(const dws_st_file *f, const uint8_t *raw,
				     uint64_t file_size)
{
	uint64_t ds = dws_st_data_start(f);
	FUZZ_CHECK(ds >= 8 + 2 && ds <= file_size);
	uint64_t data_len = file_size - ds;
	FUZZ_CHECK(memcmp(dws_st_raw(f), raw, (size_t)ds) == 0);

	size_t n = dws_st_count(f);
	const dws_st_tensor **by = calloc(n ? n : 1, sizeof(*by));
	FUZZ_CHECK(by);
	for (size_t i = 0; i < n; i++) {
		const dws_st_tensor *t = dws_st_at(f, i);
		FUZZ_CHECK(t->name && t->name[0]);
		FUZZ_CHECK(strcmp(t->name, "__metadata__") != 0);
		FUZZ_CHECK(t->dtype > DWS_DT_INVALID && t->dtype < DWS_DT_COUNT);
		size_t es = dws_dtype_size(t->dtype);
		FUZZ_CHECK(es > 0);
		FUZZ_CHECK(t->ndim <= 16);
		FUZZ_CHECK(t->ndim == 0 || t->shape);
		uint64_t numel = 1;
		for (uint32_t d = 0; d < t->ndim; d++)
			FUZZ_CHECK(dws_mul_ok(numel, t->shape[d], &numel));
		FUZZ_CHECK(numel == t->numel);
		FUZZ_CHECK(t->begin <= t->end);
		FUZZ_CHECK(t->end <= data_len);
		uint64_t nbytes;
		FUZZ_CHECK(dws_mul_ok(t->numel, es, &nbytes));
		FUZZ_CHECK(nbytes == t->end - t->begin);
		FUZZ_CHECK(dws_st_find(f, t->name) == t);
		by[i] = t;
	}
	/* the file ends where its last tensor does */
	uint64_t end = 0;
	for (size_t i = 0; i < n; i++)
		end = by[i]->end > end ? by[i]->end : end;
	FUZZ_CHECK(end == data_len && dws_st_data_end(f) == end);
	/* no two non-empty tensors share a byte */
	qsort(by, n, sizeof(*by), fuzz_cmp_begin);
	const dws_st_tensor *prev = NULL;
	for (size_t i = 0; i < n; i++) {
		if (by[i]->begin == by[i]->end)
			continue;
		FUZZ_CHECK(!prev || by[i]->begin >= prev->end);
		prev = by[i];
	}
	free(by);
	FUZZ_CHECK(dws_st_find(f, "") == NULL);
	FUZZ_CHECK(dws_st_find(f, "__metadata__") == NULL);

	size_t nm = dws_st_meta_count(f);
	for (size_t i = 0; i < nm; i++) {
		const dws_st_meta *m = dws_st_meta_at(f, i);
		FUZZ_CHECK(m->key && m->value);
		/* keys are unique (duplicates are rejected), so lookup finds this one */
		FUZZ_CHECK(dws_st_meta_get(f, m->key) == m->value);
		(void)strlen(m->value); /* terminated, readable */
	}
}

#endif
