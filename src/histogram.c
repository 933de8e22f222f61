/* Fixed-bound histograms (see histogram.h). */
#include "histogram.h"

const double dws_hist_bounds[DWS_HIST_NBOUNDS] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};

void dws_histogram_observe(dws_histogram *h, double seconds)
{
	if (!(seconds >= 0)) /* NaN or a clock that went back */
		seconds = 0;
	for (int i = 0; i < DWS_HIST_NBOUNDS; i++)
		h->le[i] += seconds <= dws_hist_bounds[i];
	h->count++;
	h->sum += seconds;
}
