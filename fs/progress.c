/* See progress.h. Rate and time left are those of the current phase (a
 * phase starts when the total changes or the count goes back). */
#include "progress.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static double secs(const struct timespec *a, const struct timespec *b)
{
	return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

static void fmt_left(double s, char *buf, size_t n)
{
	if (!(s >= 0) || s > 359999) {
		snprintf(buf, n, "--:--");
		return;
	}
	unsigned t = (unsigned)(s + 0.5);
	if (t >= 3600)
		snprintf(buf, n, "%u:%02u:%02u", t / 3600, t / 60 % 60, t % 60);
	else
		snprintf(buf, n, "%u:%02u", t / 60, t % 60);
}

static void draw(void *ctx, const char *what, uint64_t done, uint64_t total)
{
	struct progress *p = ctx;
	if (p->watch)
		p->in_watch = !strcmp(what, p->watch);
	if (!p->tty)
		return;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	bool new_phase = total != p->total || done < p->done || strcmp(what, p->phase) != 0;
	/* extract names each file it writes: one phase over all of them */
	if (new_phase && total == p->total && done >= p->done && !strcmp(p->verb, "extract"))
		new_phase = false;
	if (new_phase)
		p->start = now;
	snprintf(p->phase, sizeof(p->phase), "%s", what);
	p->total = total;
	p->done = done;
	if (!new_phase && done != total && secs(&p->last, &now) < 0.2)
		return;
	p->last = now;
	p->shown = true;
	double el = secs(&p->start, &now), rate = (double)done / (el > 0.001 ? el : 0.001);
	char left[32];
	fmt_left(rate > 0 ? (double)(total - done) / rate : -1, left, sizeof(left));
	const char *label = what;
	size_t ll = strlen(label);
	if (ll > 32) /* a path: its end says most */
		label += ll - 32;
	fprintf(stderr, "\r%s: %s %-32s %5.1f%%  %.1f / %.1f MiB  %.1f MiB/s  ETA %s   ", p->prog, p->verb, label,
		total ? 100.0 * (double)done / (double)total : 100.0, (double)done / 1048576.0, (double)total / 1048576.0,
		rate / 1048576.0, left);
}

const dws_progress *progress_start(struct progress *p, const char *prog, const char *verb)
{
	memset(p, 0, sizeof(*p));
	p->prog = prog;
	p->verb = verb;
	p->pr = (dws_progress){draw, p};
	p->tty = isatty(2);
	return p->tty ? &p->pr : NULL;
}

const dws_progress *progress_watch(struct progress *p, const char *prog, const char *verb, const char *watch)
{
	progress_start(p, prog, verb);
	p->watch = watch;
	return &p->pr;
}

void progress_end(struct progress *p)
{
	if (p->shown)
		fputc('\n', stderr);
	p->shown = false;
}
