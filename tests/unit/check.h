/* The C unit tests' one assertion: CHECK(cond, fmt, ...) counts a pass or
 * prints the failure with its place and goes on; main reports the counts. */
#ifndef DWSFS_TESTS_CHECK_H
#define DWSFS_TESTS_CHECK_H

#include <stdio.h>

static int passed, failed;

#define CHECK(cond, ...)                                                   \
	do {                                                               \
		if (cond) {                                                \
			passed++;                                          \
		} else {                                                   \
			failed++;                                          \
			fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
			fprintf(stderr, __VA_ARGS__);                      \
			fputc('\n', stderr);                               \
		}                                                          \
	} while (0)

#endif
