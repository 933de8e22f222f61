/* A histogram of durations in seconds with fixed bucket bounds, kept the
 * way Prometheus exports one: cumulative counts per bound, a count and a
 * sum. A value, not thread safe: its owner's lock guards it, and a copy is
 * a snapshot. */
#ifndef DWSFS_HISTOGRAM_H
#define DWSFS_HISTOGRAM_H

#include <stdint.h>

/* Step builds take ~10 ms (a small delta on a warm cache) to a minute (a
 * large model's anchor fetched cold): bounds from 10 ms to 60 s. */
#define DWS_HIST_NBOUNDS 12
extern const double dws_hist_bounds[DWS_HIST_NBOUNDS];

typedef struct dws_histogram {
	uint64_t le[DWS_HIST_NBOUNDS]; /* observations <= dws_hist_bounds[i] */
	uint64_t count;                /* all of them (the +Inf bucket) */
	double sum;                    /* seconds */
} dws_histogram;

void dws_histogram_observe(dws_histogram *h, double seconds);

#endif
