/* A histogram of durations in seconds with fixed bucket bounds, kept the
 * way Prometheus exports one: cumulative counts per bound, a count and a
 * sum. A value, not thread safe: its owner's lock guards it, and a copy is
 * a snapshot. */
#ifndef DWSFS_HISTOGRAM_H
#define DWSFS_HISTOGRAM_H

#include <stdint.h>

#include "internal.h"


void dws_histogram_observe(dws_histogram *h, double seconds);

#endif
