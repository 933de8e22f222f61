/* The fetch pipeline of a remote bucket alone, without FUSE: one reader
 * scans one object in 1 MiB reads through the block cache (readahead,
 * prefetch threads, hot set, disk writers), as the mount's readers do.
 * A diagnostic of tests/bench/run_http_bench.sh, not a test:
 *
 *   fetch_pipeline BUCKET KEY CACHE_DIR [memory]
 *
 * prints `bytes=N seconds=S mbps=M`; "memory" runs without the disk cache
 * (the mount's cache_size=0). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: fetch_pipeline BUCKET KEY CACHE_DIR [memory]\n");
		return 2;
	}
	dws_bucket_opts o;
	dws_bucket_opts_init(&o);
	o.cache_dir = argv[3];
	o.memory_cache = argc > 4 && !strcmp(argv[4], "memory");
	dws_bucket *b;
	dws_error err = {0};
	dws_object obj;
	dws_blob *bl;
	if (dws_bucket_open_opts(argv[1], &o, &b, &err) || dws_bucket_head(b, argv[2], &obj, &err) ||
	    dws_bucket_open_blob(b, &obj, &bl, &err)) {
		fprintf(stderr, "fetch_pipeline: %s\n", err.msg);
		return 1;
	}
	enum { CH = 1 << 20 };
	char *buf = aligned_alloc(4096, CH);
	uint64_t size = dws_blob_size(bl);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t off = 0; off < size; off += CH) {
		size_t len = size - off < CH ? (size_t)(size - off) : CH;
		const void *ref;
		dws_pin pin;
		if (dws_blob_read_ref(bl, off, buf, len, &ref, &pin, &err)) {
			fprintf(stderr, "fetch_pipeline: %s\n", err.msg);
			return 1;
		}
		dws_pin_release(&pin);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("bytes=%llu seconds=%.3f mbps=%.0f\n", (unsigned long long)size, s, (double)size / s / 1e6);
	free(buf);
	dws_blob_unref(bl);
	dws_bucket_close(b);
	return 0;
}
