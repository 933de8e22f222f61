/* What keeping a cold read's bytes on disk costs by itself: BYTES written as
 * the block cache writes them (src/remote.c), in block files of BLOCK bytes
 * (default 8 MiB) plus a 4 KiB tail, each created under DIR, written with
 * one O_DIRECT write from a page-aligned buffer in memory and renamed into
 * place, from 2 threads (the cache's writers). No network, no FUSE, no hash:
 * the disk's speed, and, measured around it by tests/bench/run_http_bench.sh,
 * the machine's CPU for it (the block layer, interrupts, the hypervisor's I/O
 * exits) beside the writers' own. A diagnostic, not a test:
 *
 *   direct_write DIR BYTES [BLOCK]
 *
 * prints `bytes=N seconds=S mbps=M cpu_s=C end_ns=E` (C: this process's CPU;
 * E: CLOCK_REALTIME when the last write was done, as `date +%s%N` gives it,
 * for a script timing it beside another client). DIR is then emptied of the
 * files it wrote (after the line: untimed) before it exits. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define THREADS 2

static const char *dir;
static uint64_t total, block;
static atomic_uint_fast64_t next_blk;
static unsigned char *buf;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void *writer(void *arg)
{
	(void)arg;
	uint64_t nblk = (total + block - 1) / block;
	for (;;) {
		uint64_t b = atomic_fetch_add(&next_blk, 1);
		if (b >= nblk)
			return NULL;
		uint64_t len = total - b * block < block ? total - b * block : block;
		size_t padded = (size_t)((len + 24 + 4095) / 4096 * 4096);
		char tmp[4096], dst[4096];
		snprintf(tmp, sizeof(tmp), "%s/tmp.%llu", dir, (unsigned long long)b);
		snprintf(dst, sizeof(dst), "%s/%llu.blk", dir, (unsigned long long)b);
		int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0600);
		if (fd < 0) {
			fprintf(stderr, "direct_write: %s: %s\n", tmp, strerror(errno));
			exit(1);
		}
		ssize_t w = write(fd, buf, padded);
		if (w != (ssize_t)padded) {
			fprintf(stderr, "direct_write: %s: %s\n", tmp, w < 0 ? strerror(errno) : "short write");
			exit(1);
		}
		if (close(fd) != 0 || rename(tmp, dst) != 0) {
			fprintf(stderr, "direct_write: %s: %s\n", dst, strerror(errno));
			exit(1);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: direct_write DIR BYTES [BLOCK]\n");
		return 2;
	}
	dir = argv[1];
	total = strtoull(argv[2], NULL, 10);
	block = argc > 3 ? strtoull(argv[3], NULL, 10) : 8u << 20;
	if (!total || !block || block > (1u << 30) || block % 4096) {
		fprintf(stderr, "direct_write: BYTES > 0, BLOCK a multiple of 4096 up to 1 GiB\n");
		return 2;
	}
	size_t sz = (size_t)block + 4096;
	if (posix_memalign((void **)&buf, 2u << 20, sz) != 0) {
		fprintf(stderr, "direct_write: out of memory\n");
		return 1;
	}
	for (size_t i = 0; i < sz; i++) /* not zero pages: data like a model's */
		buf[i] = (unsigned char)(i * 2654435761u >> 13);
	double t0 = now();
	pthread_t t[THREADS];
	for (int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, writer, NULL);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	double s = now() - t0;
	struct timespec end;
	clock_gettime(CLOCK_REALTIME, &end);
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
		     (double)ru.ru_stime.tv_usec / 1e6;
	printf("bytes=%llu seconds=%.3f mbps=%.0f cpu_s=%.3f end_ns=%lld\n", (unsigned long long)total, s,
	       (double)total / s / 1e6, cpu, (long long)end.tv_sec * 1000000000LL + end.tv_nsec);
	fflush(stdout);
	uint64_t nblk = (total + block - 1) / block;
	for (uint64_t b = 0; b < nblk; b++) {
		char dst[4096];
		snprintf(dst, sizeof(dst), "%s/%llu.blk", dir, (unsigned long long)b);
		unlink(dst);
	}
	free(buf);
	return 0;
}
