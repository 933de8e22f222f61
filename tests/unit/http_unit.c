/* Unit tests of the HTTP layer and the remote backends' parsers against a
 * loopback server (loopback.c): error bodies kept apart from data buffers,
 * range answers pinned to the listed object, S3/Hub listings with keys that
 * are skipped (each logged once). The last line is "N passed, N failed". */
#include "bucket.h"
#include "http.h"
#include "loopback.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

#define RANGE 1000

static dws_http *new_http(void)
{
	dws_http_opts o = {.max_attempts = 3, .backoff_base_ms = 1, .backoff_cap_ms = 2, .deadline_ms = 20000};
	dws_http *h = NULL;
	dws_error e = {0};
	if (dws_http_new(&o, &h, &e))
		fprintf(stderr, "dws_http_new: %s\n", e.msg);
	return h;
}

/* ---- error bodies (F1) ---- */

struct errcase {
	int status;        /* answered `times` times, then 206 with the data */
	int times;
	size_t body_len;
	char data[RANGE];
};

static void on_errcase(void *ud, const lb_request *rq, int n, lb_reply *r)
{
	(void)rq;
	struct errcase *ec = ud;
	if (n < ec->times) {
		r->status = ec->status;
		r->body = lb_fill(ec->body_len, 'E');
		r->len = ec->body_len;
		if (ec->status == 302)
			snprintf(r->headers, sizeof(r->headers), "Location: /again\r\n");
		return;
	}
	r->status = 206;
	snprintf(r->headers, sizeof(r->headers), "Content-Range: bytes 0-%d/%d\r\n", RANGE - 1, RANGE);
	r->body = malloc(RANGE);
	memcpy(r->body, ec->data, RANGE);
	r->len = RANGE;
}

/* One range read of RANGE bytes into a buffer of exactly RANGE bytes (ASan
 * sees a byte past it) against `status` answered `times` times. */
static int range_read(dws_http *h, struct errcase *ec, unsigned char *dst, dws_http_resp *rs, dws_error *e)
{
	lb_server s;
	if (lb_start(&s, on_errcase, ec))
		return -1000;
	char *url = dws_xasprintf("%s/obj", s.url);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_CDN, .range_off = 0, .range_len = RANGE, .dst = dst, .what = "obj"};
	int rc = dws_http_do(h, &rq, rs, e);
	lb_stop(&s);
	free(url);
	return rc;
}

static void test_error_bodies(void)
{
	dws_http *h = new_http();
	static const size_t sizes[] = {0, 10, RANGE - 1, RANGE, RANGE + 1, 5000, 1000000};
	static const int finals[] = {404, 410, 403, 416};
	for (size_t i = 0; i < sizeof(finals) / sizeof(finals[0]); i++)
		for (size_t j = 0; j < sizeof(sizes) / sizeof(sizes[0]); j++) {
			struct errcase ec = {.status = finals[i], .times = 1000, .body_len = sizes[j]};
			unsigned char *dst = malloc(RANGE);
			memset(dst, 0xAB, RANGE);
			dws_http_resp rs;
			dws_error e = {0};
			int rc = range_read(h, &ec, dst, &rs, &e);
			int want = finals[i] == 404 || finals[i] == 410 ? DWS_ENOENT : finals[i] == 416 ? DWS_EFORMAT : DWS_EIO;
			CHECK(rc == want && rs.status == finals[i], "HTTP %d, body %zu: rc %d status %ld (%s)", finals[i], sizes[j], rc,
			      rs.status, e.msg);
			bool untouched = true;
			for (size_t k = 0; k < RANGE; k++)
				untouched &= dst[k] == 0xAB;
			CHECK(untouched, "HTTP %d, body %zu: the data buffer is untouched", finals[i], sizes[j]);
			size_t kept = sizes[j] < 4096 ? sizes[j] : 4096;
			CHECK(rs.body && rs.len == kept && rs.body[rs.len] == 0 && (!kept || (rs.body[0] == 'E' && rs.body[kept - 1] == 'E')),
			      "HTTP %d, body %zu: %zu bytes of it kept for the message", finals[i], sizes[j], rs.len);
			dws_http_resp_free(&rs);
			free(dst);
		}
	/* retryable answers (and a redirect) with bodies of every size, then the data */
	static const int again[] = {503, 500, 302};
	for (size_t i = 0; i < sizeof(again) / sizeof(again[0]); i++)
		for (size_t j = 0; j < sizeof(sizes) / sizeof(sizes[0]); j++) {
			struct errcase ec = {.status = again[i], .times = 2, .body_len = sizes[j]};
			for (int k = 0; k < RANGE; k++)
				ec.data[k] = (char)(k * 7 + 1);
			unsigned char *dst = malloc(RANGE);
			dws_http_resp rs;
			dws_error e = {0};
			int rc = range_read(h, &ec, dst, &rs, &e);
			CHECK(rc == DWS_OK && memcmp(dst, ec.data, RANGE) == 0, "HTTP %d twice, body %zu, then the data: rc %d (%s)",
			      again[i], sizes[j], rc, e.msg);
			dws_http_resp_free(&rs);
			free(dst);
		}
	dws_http_free(h);
}

int main(void)
{
	test_error_bodies();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
