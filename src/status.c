/* The status document (see status.h). Numbers are JSON integers (every
 * step number fits: stepname.c), absent values null. */
#include "status.h"

#include <jansson.h>
#include <stdlib.h>
#include <time.h>

static void put(json_t *j, const char *key, json_t *v) { json_object_set_new(j, key, v); }
static json_t *num(uint64_t v) { return json_integer((json_int_t)v); }
static json_t *num_or_null(bool has, uint64_t v) { return has ? num(v) : json_null(); }

static json_t *iso_time(int64_t secs)
{
	char when[32];
	time_t t = (time_t)secs;
	struct tm tm;
	gmtime_r(&t, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	return json_string(when);
}

static void put_steps(json_t *j, const dws_status *st)
{
	put(j, "step", num(st->step));
	put(j, "anchor", num(st->anchor));
	put(j, "chain_length", num(st->chain_length));
	put(j, "bucket", json_string(st->bucket));
	put(j, "last_poll", st->last_poll_wall ? iso_time(st->last_poll_wall) : json_null());
	put(j, "latest_step", num(st->latest_step));
	put(j, "lag_steps", num(st->lag_steps));
	put(j, "pending_step", num_or_null(st->has_pending, st->pending_step));
	put(j, "steps", num(st->steps));
	put(j, "swaps", num(st->swaps));
	put(j, "root_since_ns", json_integer(st->root_since_ns));
	put(j, "last_build_ms", json_integer(st->last_build_ms));
	put(j, "merging", json_boolean(st->merging));
	put(j, "materializing", json_boolean(st->materializing));
	put(j, "materialized_step", num_or_null(st->has_materialized, st->materialized_step));
	put(j, "materialized_bytes", num(st->materialized_bytes));
	put(j, "materialize_note", st->materialize_note[0] ? json_string(st->materialize_note) : json_null());
	put(j, "materialized_in_place", num(st->materialized_in_place));
	put(j, "materialized_whole", num(st->materialized_whole));
	put(j, "root_open_handles", json_integer(st->root_open_handles));
	put(j, "patched_elements", num(st->patched_elements));
	put(j, "whole_tensors", num(st->whole_tensors));
	put(j, "whole_tensor_bytes", num(st->whole_tensor_bytes));
	put(j, "patch_bytes", num(st->patch_bytes));
	put(j, "patch_mem_cap", num_or_null(st->patch_mem_cap != UINT64_MAX, st->patch_mem_cap));
	put(j, "patch_bytes_memory", num(st->patch_bytes_memory));
	put(j, "patch_bytes_disk", num(st->patch_bytes_disk));
	put(j, "patch_spill_failures", num(st->patch_spill_failures));
}

static void put_io(json_t *j, const dws_status *st)
{
	put(j, "bytes_fetched", num(st->bytes_fetched));
	put(j, "cache_hits", num(st->cache_hits));
	put(j, "cache_misses", num(st->cache_misses));
	if (!st->remote)
		return;
	put(j, "cache_bytes", num(st->cache.bytes));
	put(j, "cache_unkept_blocks", num(st->cache.unkept_blocks));
	put(j, "cache_unkept_bytes", num(st->cache.unkept_bytes));
	put(j, "cache_waits", num(st->cache.waits));
	put(j, "cache_wait_ms", num(st->cache.wait_ms));
	put(j, "api_calls", num(st->requests[0]));
	put(j, "resolver_calls", num(st->requests[1]));
	put(j, "cdn_requests", num(st->requests[2]));
	put(j, "s3_requests", num(st->requests[3]));
}

static void put_hook(json_t *j, const dws_status *st)
{
	if (!st->has_hook)
		return;
	const dws_hook_stats *h = &st->hook;
	put(j, "on_swap_running", json_boolean(h->running));
	put(j, "on_swap_runs", num(h->runs));
	put(j, "on_swap_last_step", num_or_null(h->has_last, h->last_step));
	put(j, "on_swap_last_exit", h->has_last ? json_integer(h->last_exit) : json_null());
	put(j, "on_swap_last_ms", h->has_last ? json_integer(h->last_ms) : json_null());
}

char *dws_status_json(const dws_status *st, const dws_status_field *extra, size_t nextra)
{
	json_t *j = json_object();
	put_steps(j, st);
	put_io(j, st);
	put_hook(j, st);
	put(j, "last_error", st->last_error && st->last_error[0] ? json_string(st->last_error) : json_null());
	for (size_t i = 0; i < nextra; i++)
		put(j, extra[i].key, extra[i].str ? json_string(extra[i].str) : json_integer(extra[i].num));
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	json_decref(j);
	char *out = dws_xasprintf("%s\n", s ? s : "{}");
	free(s);
	return out;
}
