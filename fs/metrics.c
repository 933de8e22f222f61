/* The metrics endpoint (see metrics.h; every metric in docs/metrics.md,
 * which tests/test_metrics.py holds to what this file emits). Names follow
 * Prometheus' conventions: base units (seconds, bytes), counters end in
 * _total, a HELP and a TYPE line for each family. */
#include "metrics.h"
#include "fs.h"
#include "passthrough.h"
#include "revision.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct metrics {
	struct MHD_Daemon *d;
	struct fs *f;
};

/* ---- the address ---- */

static bool parse_port(const char *s, uint16_t *port)
{
	if (!*s || strlen(s) > 5 || strspn(s, "0123456789") != strlen(s))
		return false;
	long p = strtol(s, NULL, 10);
	if (p < 1 || p > 65535)
		return false;
	*port = (uint16_t)p;
	return true;
}

bool metrics_addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
	char host[64];
	const char *port;
	memset(ss, 0, sizeof(*ss));
	if (!s)
		return false;
	if (s[0] == '[') {
		const char *end = strchr(s, ']');
		if (!end || end[1] != ':' || (size_t)(end - s - 1) >= sizeof(host))
			return false;
		snprintf(host, sizeof(host), "%.*s", (int)(end - s - 1), s + 1);
		port = end + 2;
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
		a->sin6_family = AF_INET6;
		*len = sizeof(*a);
		uint16_t p;
		if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1 || !parse_port(port, &p))
			return false;
		a->sin6_port = htons(p);
		return true;
	}
	const char *colon = strrchr(s, ':');
	if (!colon || (size_t)(colon - s) >= sizeof(host))
		return false;
	snprintf(host, sizeof(host), "%.*s", (int)(colon - s), s);
	struct sockaddr_in *a = (struct sockaddr_in *)ss;
	a->sin_family = AF_INET;
	*len = sizeof(*a);
	uint16_t p;
	if (inet_pton(AF_INET, host, &a->sin_addr) != 1 || !parse_port(colon + 1, &p))
		return false;
	a->sin_port = htons(p);
	return true;
}

int metrics_listen(const char *addr)
{
	struct sockaddr_storage ss;
	socklen_t len;
	if (!metrics_addr_parse(addr, &ss, &len)) {
		fprintf(stderr, "dwsfs: metrics_addr='%s': it takes %s\n", addr, METRICS_ADDR_TAKES);
		return -1;
	}
	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	if (fd >= 0) {
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)); /* a restart within TIME_WAIT */
		if (ss.ss_family == AF_INET6) /* [::] is IPv6 only: no IPv4 address it was not given */
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	}
	if (fd < 0 || bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 16) != 0) {
		fprintf(stderr, "dwsfs: metrics_addr %s: %s\n", addr, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* ---- the text ---- */

static void head(FILE *o, const char *name, const char *type, const char *help)
{
	fprintf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void u64(FILE *o, const char *name, const char *type, const char *help, uint64_t v)
{
	head(o, name, type, help);
	fprintf(o, "%s %llu\n", name, (unsigned long long)v);
}

static void i64(FILE *o, const char *name, const char *help, int64_t v)
{
	head(o, name, "gauge", help);
	fprintf(o, "%s %lld\n", name, (long long)v);
}

static void dbl(FILE *o, const char *name, const char *type, const char *help, double v)
{
	head(o, name, type, help);
	fprintf(o, "%s %.6f\n", name, v);
}

/* One counter family with one label, a sample per value. */
static void by_label(FILE *o, const char *name, const char *help, const char *label, const char *const *values,
		     const uint64_t *v, size_t n)
{
	head(o, name, "counter", help);
	for (size_t i = 0; i < n; i++)
		fprintf(o, "%s{%s=\"%s\"} %llu\n", name, label, values[i], (unsigned long long)v[i]);
}

/* A label value with ", \ and newlines escaped. */
static void label_value(FILE *o, const char *s)
{
	for (; *s; s++) {
		if (*s == '"' || *s == '\\' || *s == '\n')
			fputc('\\', o);
		fputc(*s == '\n' ? 'n' : *s, o);
	}
}

static void steps(FILE *o, const dws_status *st)
{
	u64(o, "dwsfs_step", "gauge", "The step the root serves (the status's step).", st->step);
	u64(o, "dwsfs_anchor_step", "gauge", "The anchor the root's step is built on.", st->anchor);
	u64(o, "dwsfs_latest_step", "gauge", "The newest step in the bucket, built or not.", st->latest_step);
	u64(o, "dwsfs_lag_steps", "gauge", "Steps in the bucket newer than the root's.", st->lag_steps);
	u64(o, "dwsfs_swaps_total", "counter", "Swaps of the root to a newer step.", st->swaps);
	dbl(o, "dwsfs_root_since_timestamp_seconds", "gauge", "When the root took its step (Unix time).",
	    (double)st->root_since_ns / 1e9);
	i64(o, "dwsfs_last_poll_timestamp_seconds", "When the bucket was last polled (Unix time).", st->last_poll_wall);
	i64(o, "dwsfs_root_open_handles", "Files of the root open now.", st->root_open_handles);
	u64(o, "dwsfs_patch_memory_bytes", "gauge", "Memory held by patch arrays.", st->patch_bytes);
	if (st->patch_mem_cap != UINT64_MAX)
		u64(o, "dwsfs_patch_memory_cap_bytes", "gauge", "The cap on patch arrays in memory (patch_mem).",
		    st->patch_mem_cap);
	u64(o, "dwsfs_patch_anonymous_bytes", "gauge", "Patch arrays in anonymous memory (held under patch_mem).",
	    st->patch_bytes_memory);
	u64(o, "dwsfs_patch_spilled_bytes", "gauge", "Patch arrays spilled to unlinked files past patch_mem.",
	    st->patch_bytes_disk);
	u64(o, "dwsfs_patch_spill_failures_total", "counter", "Spills that failed and stayed in memory.",
	    st->patch_spill_failures);
}

static void builds(FILE *o, const dws_status *st)
{
	const char *name = "dwsfs_build_seconds";
	head(o, name, "histogram", "Time to build and verify each step built (the root's and steps/N).");
	for (int i = 0; i < DWS_HIST_NBOUNDS; i++)
		fprintf(o, "%s_bucket{le=\"%g\"} %llu\n", name, dws_hist_bounds[i], (unsigned long long)st->builds.le[i]);
	fprintf(o, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)st->builds.count);
	fprintf(o, "%s_sum %.6f\n%s_count %llu\n", name, st->builds.sum, name, (unsigned long long)st->builds.count);
	static const char *const kinds[] = {"transient", "bad"};
	by_label(o, "dwsfs_step_build_failures_total",
		 "Step builds that failed: transient (tried again later) or bad (refused for good).", "kind", kinds,
		 st->build_failures, 2);
	u64(o, "dwsfs_poll_failures_total", "counter", "Polls of the bucket that failed.", st->poll_failures);
}

static void io(FILE *o, const dws_status *st)
{
	const dws_bucket_stats *b = &st->io;
	const dws_cache_counts *c = &b->cache;
	u64(o, "dwsfs_bytes_fetched_total", "counter", "Bytes read from the bucket (remote: HTTP answers).",
	    st->bytes_fetched);
	u64(o, "dwsfs_cache_hits_total", "counter", "Block reads served by the block cache (remote buckets).", c->hits);
	u64(o, "dwsfs_cache_misses_total", "counter", "Block reads that fetched the block (remote buckets).", c->misses);
	u64(o, "dwsfs_cache_bytes", "gauge", "Bytes in the block cache on disk.", c->bytes);
	u64(o, "dwsfs_cache_blocks", "gauge", "Blocks in the block cache on disk.", c->blocks);
	u64(o, "dwsfs_cache_unkept_bytes_total", "counter",
	    "Bytes fetched and gone from memory before the disk took them.", c->unkept_bytes);
	u64(o, "dwsfs_cache_waits_total", "counter", "Reads that waited for a block being fetched.", c->waits);
	dbl(o, "dwsfs_cache_wait_seconds_total", "counter", "Time reads waited for blocks being fetched.",
	    (double)c->wait_ms / 1000);
	static const char *const classes[] = {"api", "resolve", "cdn", "s3"};
	by_label(o, "dwsfs_http_requests_total", "HTTP requests (each attempt) by class.", "class", classes,
		 b->requests, 4);
	by_label(o, "dwsfs_http_received_bytes_total", "Bytes of HTTP answers by class.", "class", classes, b->bytes, 4);
	static const char *const why[DWS_HTTP_NERR] = {"status", "throttled", "not_found", "network", "truncated",
						       "other"};
	by_label(o, "dwsfs_http_retries_total", "HTTP attempts tried again, by why the attempt failed.", "reason", why,
		 b->retries, DWS_HTTP_NERR);
	by_label(o, "dwsfs_http_failures_total", "HTTP requests that failed for good, by why the last attempt failed.",
		 "reason", why, b->failures, DWS_HTTP_NERR);
}

static void hook(FILE *o, const dws_status *st)
{
	if (!st->has_hook)
		return;
	const dws_hook_stats *h = &st->hook;
	u64(o, "dwsfs_on_swap_runs_total", "counter", "Runs of the on_swap command that ended.", h->runs);
	u64(o, "dwsfs_on_swap_failures_total", "counter", "Runs of on_swap that did not exit 0 (timeouts included).",
	    h->failures);
	u64(o, "dwsfs_on_swap_running", "gauge", "1 while an on_swap run is under way.", h->running);
	if (!h->has_last)
		return;
	u64(o, "dwsfs_on_swap_last_step", "gauge", "The step of the last on_swap run that ended.", h->last_step);
	i64(o, "dwsfs_on_swap_last_exit_code", "Exit status of the last run: 128+N for signal N, 124 timed out.",
	    h->last_exit);
	dbl(o, "dwsfs_on_swap_last_duration_seconds", "gauge", "How long the last on_swap run took.",
	    (double)h->last_ms / 1000);
}

static void daemon_side(FILE *o, struct fs *f)
{
	u64(o, "dwsfs_read_errors_total", "counter", "Reads answered with EIO.", atomic_load(&f->read_errors));
	u64(o, "dwsfs_daemon_reads_total", "counter", "Reads the daemon served (not passed through).",
	    pt_daemon_reads());
	u64(o, "dwsfs_passthrough_opens_total", "counter", "Opens the kernel serves by passthrough.", pt_opens());
	head(o, "dwsfs_build_info", "gauge", "1, labelled with the version and the source revision.");
	fprintf(o, "dwsfs_build_info{version=\"");
	label_value(o, DWSFS_VERSION);
	fprintf(o, "\",revision=\"");
	label_value(o, DWSFS_REVISION);
	fprintf(o, "\"} 1\n");
}

/* The whole text, malloc'd; NULL when out of memory. */
static char *render(struct fs *f, size_t *len)
{
	dws_status st;
	dws_mount_status(f->m, &st);
	char *buf = NULL;
	FILE *o = open_memstream(&buf, len);
	if (!o)
		return NULL;
	steps(o, &st);
	builds(o, &st);
	io(o, &st);
	hook(o, &st);
	daemon_side(o, f);
	if (fclose(o) != 0) {
		free(buf);
		return NULL;
	}
	return buf;
}

/* ---- the server ---- */

static enum MHD_Result answer(struct MHD_Connection *c, unsigned status, char *body, size_t len,
			      enum MHD_ResponseMemoryMode mode)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
				status == MHD_HTTP_OK ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain");
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
				  const char *version, const char *upload, size_t *upload_size, void **req_cls)
{
	(void)version, (void)upload, (void)upload_size, (void)req_cls;
	static char not_found[] = "dwsfs: the metrics are at /metrics\n", not_get[] = "dwsfs: GET /metrics\n";
	if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD))
		return answer(c, MHD_HTTP_METHOD_NOT_ALLOWED, not_get, strlen(not_get), MHD_RESPMEM_PERSISTENT);
	if (strcmp(url, "/metrics"))
		return answer(c, MHD_HTTP_NOT_FOUND, not_found, strlen(not_found), MHD_RESPMEM_PERSISTENT);
	size_t len = 0;
	char *text = render(((struct metrics *)cls)->f, &len);
	if (!text)
		return MHD_NO;
	return answer(c, MHD_HTTP_OK, text, len, MHD_RESPMEM_MUST_FREE);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	(void)cls;
	char line[512];
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = 0;
	dws_log_at(DWS_LOG_WARN, "metrics: %s", line);
}

struct metrics *metrics_start(int fd, struct fs *f)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
	if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && ss.ss_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	struct metrics *mt = calloc(1, sizeof(*mt));
	if (!mt)
		return NULL;
	mt->f = f;
	/* a few scrapers at a time, none holding a connection forever */
	mt->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, mt, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL,
				 MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT, 16u,
				 MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
	if (!mt->d) {
		fprintf(stderr, "dwsfs: metrics_addr: the HTTP server did not start\n");
		free(mt);
		return NULL;
	}
	return mt;
}

void metrics_stop(struct metrics *mt)
{
	if (!mt)
		return;
	MHD_stop_daemon(mt->d); /* closes the listening socket */
	free(mt);
}
