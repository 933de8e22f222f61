/* dwsctl's progress line on a terminal: phase, percentage, bytes, rate and
 * time left, redrawn at most five times a second (and at each phase's end). */
#ifndef DWSFS_FS_PROGRESS_H
#define DWSFS_FS_PROGRESS_H

#include <dwsfs/dwsfs.h>

#include <stdbool.h>
#include <time.h>

struct progress {
	const char *prog, *verb;     /* "dwsctl", "extract" */
	struct timespec start, last; /* of this phase; the last redraw */
	uint64_t total, done;
	char phase[64];
	bool shown;
	dws_progress pr;             /* hand &pr to the library */
};

/* The callback to hand to the library: NULL when stderr is no terminal. */
const dws_progress *progress_start(struct progress *p, const char *prog, const char *verb);
/* Ends the line, if one was drawn. */
void progress_end(struct progress *p);

#endif
