/* Unit tests of the HTTP layer and the remote backends' parsers against a
 * loopback server (loopback.c): error bodies kept apart from data buffers,
 * range answers pinned to the listed object, S3/Hub listings with keys that
 * are skipped (each logged once). The last line is "N passed, N failed". */
#include "bucket.h"
#include "check.h"
#include "http.h"
#include "loopback.h"
#include "s3_upload.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


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

/* ---- retries and failures counted by why (the metrics) ---- */

static void test_error_kinds(void)
{
	dws_http *h = new_http(); /* 3 attempts */
	uint64_t r[DWS_HTTP_NERR], f[DWS_HTTP_NERR];
	static const struct {
		int status, times;
		int retried, failed;     /* kind, or -1 */
		uint64_t nretried;
	} cases[] = {
		{503, 2, DWS_HTTP_ERR_STATUS, -1, 2},
		{404, 1000, -1, DWS_HTTP_ERR_NOT_FOUND, 0},
		{403, 1000, -1, DWS_HTTP_ERR_STATUS, 0},
		{429, 1000, DWS_HTTP_ERR_THROTTLED, DWS_HTTP_ERR_THROTTLED, 2},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t r0[DWS_HTTP_NERR], f0[DWS_HTTP_NERR];
		dws_http_errors(h, r0, f0);
		struct errcase ec = {.status = cases[i].status, .times = cases[i].times};
		unsigned char dst[RANGE];
		dws_http_resp rs;
		dws_error e = {0};
		range_read(h, &ec, dst, &rs, &e);
		dws_http_resp_free(&rs);
		dws_http_errors(h, r, f);
		for (int k = 0; k < DWS_HTTP_NERR; k++) {
			uint64_t want_r = k == cases[i].retried ? cases[i].nretried : 0, want_f = k == cases[i].failed;
			CHECK(r[k] - r0[k] == want_r && f[k] - f0[k] == want_f, "HTTP %d x%d: kind %d retried %llu, failed %llu",
			      cases[i].status, cases[i].times, k, (unsigned long long)(r[k] - r0[k]),
			      (unsigned long long)(f[k] - f0[k]));
		}
	}
	/* nothing listens: connection refused, retried, then failed */
	lb_server s;
	if (lb_start(&s, on_errcase, NULL) == 0) {
		char *url = dws_xasprintf("%s/obj", s.url);
		lb_stop(&s);
		uint64_t r0[DWS_HTTP_NERR], f0[DWS_HTTP_NERR];
		dws_http_errors(h, r0, f0);
		dws_http_req rq = {.url = url, .cls = DWS_HTTP_CDN, .what = "obj"};
		dws_http_resp rs;
		dws_error e = {0};
		CHECK(dws_http_do(h, &rq, &rs, &e) != DWS_OK, "nothing listens: fails");
		dws_http_resp_free(&rs);
		dws_http_errors(h, r, f);
		CHECK(r[DWS_HTTP_ERR_NETWORK] - r0[DWS_HTTP_ERR_NETWORK] == 2 &&
		      f[DWS_HTTP_ERR_NETWORK] - f0[DWS_HTTP_ERR_NETWORK] == 1, "a refused connection: network, retried twice");
		free(url);
	}
	dws_http_free(h);
}

/* ---- range answers pinned to the listed object (F8) ---- */

static void test_range_check(void)
{
	static const char *H = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
	dws_range_pin p = {.size = 100};
	snprintf(p.hash, sizeof(p.hash), "%s", H);
	dws_http_resp rs = {.status = 206, .has_range_total = true, .range_total = 100};
	dws_error e = {0};
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_OK, "a plain answer of the listed size");
	rs.range_total = 101;
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_ENOENT && strstr(e.msg, "101 bytes, listed 100"),
	      "another total size is a change: %s", e.msg);
	rs = (dws_http_resp){.status = 200, .has_content_length = true, .content_length = 99};
	memset(&e, 0, sizeof(e));
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_ENOENT, "a whole-object 200 of another size is a change");
	rs = (dws_http_resp){.status = 206};
	char other[80];
	snprintf(other, sizeof(other), "ff%s", H + 2);
	memset(&e, 0, sizeof(e));
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, other, &e) == DWS_ENOENT && strstr(e.msg, "content hash"),
	      "another content hash named (X-Xet-Hash)");
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, H, &e) == DWS_OK, "the listed hash named");
	rs = (dws_http_resp){.status = 206};
	snprintf(rs.etag, sizeof(rs.etag), "\"abc\"");
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_OK, "an ETag that names no hash, nothing pinned: unknown, taken");
	p.etag_is_hash = true;
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_OK, "where ETags are hashes, one that is no hash says nothing");
	snprintf(rs.etag, sizeof(rs.etag), "\"%s11\"", H + 2);
	memset(&e, 0, sizeof(e));
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_ENOENT && strstr(e.msg, "listed hash"),
	      "where ETags are hashes, another hash is another content: %s", e.msg);
	snprintf(rs.etag, sizeof(rs.etag), "W/\"%s\"", H);
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_OK && dws_etag_names(rs.etag, H), "the hash as a weak ETag");
	snprintf(p.etag, sizeof(p.etag), "\"abc\"");
	snprintf(rs.etag, sizeof(rs.etag), "abc");
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_OK, "the pinned ETag, quoted or not");
	snprintf(rs.etag, sizeof(rs.etag), "\"abd\"");
	memset(&e, 0, sizeof(e));
	CHECK(dws_range_check("o", &p, DWS_OK, &rs, NULL, &e) == DWS_ENOENT && strstr(e.msg, "changed while it was read"),
	      "another ETag than the pinned one: %s", e.msg);
	rs = (dws_http_resp){.status = 412};
	dws_fail(&e, DWS_EIO, "o: GET ...: HTTP 412");
	CHECK(dws_range_check("o", &p, DWS_EIO, &rs, NULL, &e) == DWS_ENOENT && strstr(e.msg, "no longer has ETag \"abc\""),
	      "a 412 is a change, said so: %s", e.msg);
	rs = (dws_http_resp){.status = 403};
	memset(&e, 0, sizeof(e));
	CHECK(dws_range_check("o", &p, DWS_EIO, &rs, NULL, &e) == DWS_EIO, "other failures pass through");
	char im[200];
	dws_range_if_match(&p, im, sizeof(im));
	CHECK(!strcmp(im, "\"abc\""), "If-Match is the pinned ETag: %s", im);
	snprintf(p.etag, sizeof(p.etag), "abc");
	dws_range_if_match(&p, im, sizeof(im));
	CHECK(!strcmp(im, "\"abc\""), "quoted when it was not: %s", im);
	snprintf(p.etag, sizeof(p.etag), "W/\"abc\"");
	dws_range_if_match(&p, im, sizeof(im));
	CHECK(!im[0], "a weak ETag is never sent as If-Match");
	snprintf(p.etag, sizeof(p.etag), "\"a b\"");
	dws_range_if_match(&p, im, sizeof(im));
	CHECK(!im[0], "nor what is no entity tag");
}

/* ---- S3 against a loopback store ---- */

#define OBJ_SIZE 10000
static const char *LIST_XML_HEAD =
	"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult><Name>bkt</Name><IsTruncated>false</IsTruncated>";

struct s3srv {
	char *list;           /* the ListObjectsV2 answer */
	char *list2;          /* the answer to a continuation-token, if any */
	char list_targets[2][2048]; /* the listings' request targets, as sent */
	char etag[64];        /* the object's ETag now */
	uint64_t total;       /* and size as Content-Range says */
	bool honour_if_match;
	char if_match[256];   /* as the last GET sent it */
	char data[OBJ_SIZE];
};

static void on_s3(void *ud, const lb_request *rq, int n, lb_reply *r)
{
	(void)n;
	struct s3srv *s = ud;
	if (!strncmp(rq->target, "/bkt?", 5) && strstr(rq->target, "list-type=2")) {
		bool next = strstr(rq->target, "continuation-token=") != NULL;
		snprintf(s->list_targets[next], sizeof(s->list_targets[next]), "%s", rq->target);
		const char *l = next && s->list2 ? s->list2 : s->list;
		r->status = 200;
		r->body = dws_xstrdup(l);
		r->len = strlen(l);
		return;
	}
	char rng[128];
	unsigned long long a = 0, b = 0;
	lb_header(rq, "If-Match", s->if_match, sizeof(s->if_match));
	lb_header(rq, "Range", rng, sizeof(rng));
	if (s->honour_if_match && s->if_match[0] && strcmp(s->if_match, s->etag) != 0) {
		r->status = 412;
		return;
	}
	if (sscanf(rng, "bytes=%llu-%llu", &a, &b) != 2 || b < a || b >= OBJ_SIZE) {
		r->status = 416;
		return;
	}
	r->status = 206;
	snprintf(r->headers, sizeof(r->headers), "ETag: %s\r\nContent-Range: bytes %llu-%llu/%llu\r\n", s->etag, a, b,
		 (unsigned long long)s->total);
	r->len = b - a + 1;
	r->body = malloc(r->len);
	memcpy(r->body, s->data + a, r->len);
}

static char *list_xml(const char *entries)
{
	return dws_xasprintf("%s%s</ListBucketResult>", LIST_XML_HEAD, entries);
}

static char *entry(const char *key, uint64_t size)
{
	return dws_xasprintf("<Contents><Key>%s</Key><LastModified>2024-05-01T12:00:00.000Z</LastModified>"
			     "<ETag>&quot;e1&quot;</ETag><Size>%llu</Size><StorageClass>STANDARD</StorageClass></Contents>",
			     key, (unsigned long long)size);
}

static int open_s3(lb_server *srv, dws_bucket **b)
{
	dws_bucket_opts bo;
	dws_bucket_opts_init(&bo);
	bo.s3_endpoint = srv->url;
	bo.s3_region = "us-east-1";
	bo.s3_key = "K";
	bo.s3_secret = "S";
	bo.memory_cache = true;
	bo.block_size = 4096;
	bo.read_deadline_ms = 5000;
	dws_error e = {0};
	int rc = dws_bucket_open_opts("s3://bkt/run", &bo, b, &e);
	if (rc)
		fprintf(stderr, "open s3: %s\n", e.msg);
	return rc;
}

/* Everything written to stderr while fn(arg) runs. */
static char *capture_stderr(void (*fn)(void *), void *arg)
{
	char path[] = "/tmp/dws-unit-XXXXXX";
	int fd = mkstemp(path), saved = dup(2);
	fflush(stderr);
	dup2(fd, 2);
	fn(arg);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	off_t n = lseek(fd, 0, SEEK_END);
	char *out = calloc(1, (size_t)n + 1);
	if (pread(fd, out, (size_t)n, 0) != n)
		out[0] = 0;
	close(fd);
	unlink(path);
	return out;
}

struct listing {
	dws_bucket *b;
	size_t n[2];
	int rc[2];
	char names[2][256];
};

static void list_twice(void *arg)
{
	struct listing *l = arg;
	for (int i = 0; i < 2; i++) {
		dws_object *v = NULL;
		dws_error e = {0};
		l->rc[i] = dws_bucket_list(l->b, "", &v, &l->n[i], &e);
		if (l->rc[i])
			fprintf(stderr, "list: %s\n", e.msg);
		l->names[i][0] = 0;
		for (size_t k = 0; k < l->n[i]; k++)
			snprintf(l->names[i] + strlen(l->names[i]), sizeof(l->names[i]) - strlen(l->names[i]), "%s;", v[k].key);
		dws_objects_free(v, l->n[i]);
	}
}

static size_t count(const char *hay, const char *needle)
{
	size_t n = 0;
	for (const char *p = hay; (p = strstr(p, needle)); p++)
		n++;
	return n;
}

static void test_s3_listing(void)
{
	char *longkey = lb_fill(1500, 'L'), *huge = lb_fill(5000, 'H');
	longkey[1499] = huge[4999] = 0;
	char *k1 = dws_xasprintf("run/%s", longkey), *k2 = dws_xasprintf("run/%s", huge);
	char *parts[] = {entry("run/anchors/step_000001.safetensors", 10), entry("run/deltas/bad\001raw", 1),
			 entry("run/deltas/bad&#x1;ref", 1), entry("run/deltas/bad&#0031;ref2", 1), entry(k1, 1), entry(k2, 1),
			 entry("run/deltas/../../escape", 1), entry("run/deltas/step_000002.safetensors", 20)};
	char all[16384] = "";
	for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
		snprintf(all + strlen(all), sizeof(all) - strlen(all), "%s", parts[i]);
		free(parts[i]);
	}
	struct s3srv st = {.list = list_xml(all)};
	lb_server srv;
	dws_bucket *b = NULL;
	if (lb_start(&srv, on_s3, &st) == 0 && open_s3(&srv, &b) == 0) {
		struct listing l = {.b = b};
		char *log = capture_stderr(list_twice, &l);
		CHECK(l.rc[0] == 0 && l.rc[1] == 0 && l.n[0] == 2 && l.n[1] == 2 &&
			      !strcmp(l.names[0], "anchors/step_000001.safetensors;deltas/step_000002.safetensors;"),
		      "s3: the listing goes on past keys it cannot take: rc %d n %zu %s", l.rc[0], l.n[0], l.names[0]);
		CHECK(count(log, "ignoring listed object") == 6, "s3: six keys ignored, each logged once over two listings:\n%s", log);
		CHECK(count(log, "control character") == 3 && count(log, "over 1023 bytes") == 2 && count(log, "not a safe path") == 1,
		      "s3: each says why:\n%s", log);
		free(log);
		dws_bucket_close(b);
	}
	lb_stop(&srv);
	free(st.list);
	free(k1);
	free(k2);
	free(longkey);
	free(huge);
}

/* libcurl 7.88 signs a query as sent and S3 checks it sorted: every S3
 * query is built sorted, escaped as SigV4 says. */
static void test_sigv4_query(void)
{
	const char *kv[] = {"list-type", "2", "prefix", "run/a b~", "continuation-token", "1/x+y=="};
	char *q = dws_http_query(kv, 3);
	CHECK(!strcmp(q, "continuation-token=1%2Fx%2By%3D%3D&list-type=2&prefix=run%2Fa%20b~"), "sorted, escaped query: %s", q);
	free(q);
	const char *up[] = {"uploads", NULL};
	q = dws_http_query(up, 1);
	CHECK(!strcmp(q, "uploads="), "an empty value keeps its '=': %s", q);
	free(q);
	const char *part[] = {"uploadId", "ab.C-_", "partNumber", "10"};
	q = dws_http_query(part, 2);
	CHECK(!strcmp(q, "partNumber=10&uploadId=ab.C-_"), "UploadPart's query: %s", q);
	free(q);
	/* parts grow to a whole MiB where 10000 would not hold the object */
	CHECK(dws_s3_part_size(13ull << 20, 5ull << 20) == 5ull << 20, "a small object keeps its part size");
	CHECK(dws_s3_part_size(5ull << 40, 64ull << 20) == 525ull << 20, "5 TiB: 525 MiB parts");
	CHECK(dws_s3_part_size((5ull << 40) + 1, 64ull << 20) == 0, "over 5 TiB: none");
	CHECK(dws_s3_part_size(10000ull * (64ull << 20) + 1, 64ull << 20) == 65ull << 20, "one byte past 10000 parts");
	/* a listing of two pages: the second's query sorted too */
	char *e1 = entry("run/anchors/step_000001.safetensors", 10), *e2 = entry("run/deltas/step_000002.safetensors", 20);
	struct s3srv st = {.list = dws_xasprintf("<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>"
						 "t/1+=</NextContinuationToken>%s</ListBucketResult>", e1),
			   .list2 = list_xml(e2)};
	lb_server srv;
	dws_bucket *b = NULL;
	if (lb_start(&srv, on_s3, &st) == 0 && open_s3(&srv, &b) == 0) {
		dws_object *v = NULL;
		size_t n = 0;
		dws_error err = {0};
		int rc = dws_bucket_list(b, "", &v, &n, &err);
		CHECK(rc == 0 && n == 2, "two pages listed: rc %d n %zu %s", rc, n, err.msg);
		CHECK(!strcmp(st.list_targets[0], "/bkt?list-type=2&prefix=run%2F") &&
			      !strcmp(st.list_targets[1], "/bkt?continuation-token=t%2F1%2B%3D&list-type=2&prefix=run%2F"),
		      "listing queries sorted: %s then %s", st.list_targets[0], st.list_targets[1]);
		dws_objects_free(v, n);
		dws_bucket_close(b);
	}
	lb_stop(&srv);
	free(st.list);
	free(st.list2);
	free(e1);
	free(e2);
}

struct blobread {
	dws_blob *blob;
	uint64_t off;
	int rc;
	char buf[100];
	dws_error e;
};

static void read_blob(void *arg)
{
	struct blobread *r = arg;
	memset(&r->e, 0, sizeof(r->e));
	r->rc = dws_blob_read(r->blob, r->off, r->buf, sizeof(r->buf), &r->e);
}

static void close_bucket(void *b) { dws_bucket_close(b); }

static void test_s3_pinned(void)
{
	char *e = entry("run/anchors/step_000001.safetensors", OBJ_SIZE);
	struct s3srv st = {.list = list_xml(e), .total = OBJ_SIZE, .honour_if_match = true};
	free(e);
	snprintf(st.etag, sizeof(st.etag), "\"e1\"");
	for (int i = 0; i < OBJ_SIZE; i++)
		st.data[i] = (char)(i * 13);
	lb_server srv;
	dws_bucket *b = NULL;
	if (lb_start(&srv, on_s3, &st) || open_s3(&srv, &b)) {
		CHECK(0, "s3 pinned: set up");
		return;
	}
	dws_object *v = NULL;
	size_t n = 0;
	dws_error err = {0};
	struct blobread r = {.off = 50};
	if (dws_bucket_list(b, "", &v, &n, &err) || n != 1 || dws_bucket_open_blob(b, &v[0], &r.blob, &err)) {
		CHECK(0, "s3 pinned: list and open: %s", err.msg);
		goto out;
	}
	free(capture_stderr(read_blob, &r));
	CHECK(r.rc == 0 && !memcmp(r.buf, st.data + 50, 100) && !strcmp(st.if_match, "\"e1\""),
	      "s3: a range read sends the listed ETag as If-Match (%s): %s", st.if_match, r.e.msg);
	snprintf(st.etag, sizeof(st.etag), "\"e2\""); /* rewritten: a 412 */
	r.off = 4096 + 50;
	free(capture_stderr(read_blob, &r));
	CHECK(r.rc == DWS_ENOENT && strstr(r.e.msg, "changed"), "s3: a 412 is a change: %s", r.e.msg);
	st.honour_if_match = false; /* a store that ignores If-Match: the ETag after the fact */
	free(capture_stderr(read_blob, &r));
	CHECK(r.rc == DWS_ENOENT && strstr(r.e.msg, "ETag \"e2\""), "s3: another ETag is a change: %s", r.e.msg);
	snprintf(st.etag, sizeof(st.etag), "\"e1\"");
	st.total = OBJ_SIZE + 1;
	free(capture_stderr(read_blob, &r));
	CHECK(r.rc == DWS_ENOENT && strstr(r.e.msg, "10001 bytes"), "s3: another total size is a change: %s", r.e.msg);
	st.total = OBJ_SIZE;
	free(capture_stderr(read_blob, &r));
	CHECK(r.rc == 0 && !memcmp(r.buf, st.data + 4096 + 50, 100), "s3: the listed object again: %s", r.e.msg);
	dws_blob_unref(r.blob);
out:
	dws_objects_free(v, n);
	free(capture_stderr(close_bucket, b)); /* a readahead it cancels says so */
	lb_stop(&srv);
	free(st.list);
}

int main(void)
{
	test_error_bodies();
	test_error_kinds();
	test_range_check();
	test_s3_listing();
	test_s3_pinned();
	test_sigv4_query();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
