/* The swap policy (see swap.h). A loader that opens the shards one after
 * another keeps the root in use, so it never gets two steps, unless
 * swap_max_delay forces the swap while one of its files is open. */
#include "swap.h"

dws_swap_verdict dws_swap_decide(const dws_swap_policy *p, const dws_swap_state *s, int64_t now,
				 int64_t *wake_at)
{
	*wake_at = INT64_MAX;
	if (!s->ready)
		return DWS_SWAP_WAIT;
	if (s->root_open == 0 && now - s->root_activity >= p->idle_ms)
		return DWS_SWAP_IDLE;
	bool may_force = !(p->never_force && s->root_open > 0);
	if (may_force && now - s->ready_since >= p->max_delay_ms)
		return DWS_SWAP_FORCED;
	if (s->root_open == 0)
		*wake_at = s->root_activity + p->idle_ms;
	if (may_force && s->ready_since + p->max_delay_ms < *wake_at)
		*wake_at = s->ready_since + p->max_delay_ms;
	return DWS_SWAP_WAIT;
}
