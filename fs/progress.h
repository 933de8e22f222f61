/* dwsctl's progress line on a terminal: phase, percentage, bytes, rate and
 * time left, redrawn at most five times a second (and at each phase's end). */
#ifndef DWSFS_FS_PROGRESS_H
#define DWSFS_FS_PROGRESS_H

#include <dwsfs/dwsfs.h>

#include <signal.h>
#include <stdbool.h>
#include <time.h>

struct progress {
	const char *prog, *verb;     /* "dwsctl", "extract" */
	struct timespec start, last; /* of this phase; the last redraw */
	uint64_t total, done;
	char phase[64];
	bool shown, tty;
	const char *watch;           /* progress_watch's phase */
	volatile sig_atomic_t in_watch; /* the library is in that phase now */
	dws_progress pr;             /* hand &pr to the library */
};

/* The callback to hand to the library: NULL when stderr is no terminal. */
const dws_progress *progress_start(struct progress *p, const char *prog, const char *verb);
/* As progress_start, but the callback is handed over off a terminal too
 * (drawing nothing there), and p->in_watch says whether the library is in
 * phase `watch` now (a signal handler may read it). */
const dws_progress *progress_watch(struct progress *p, const char *prog, const char *verb, const char *watch);
/* Ends the line, if one was drawn. */
void progress_end(struct progress *p);

#endif
