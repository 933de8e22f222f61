/* The mount engine driven without FUSE and without waiting: a clock of the
 * test's own and a bucket that fails on demand are injected, and each turn
 * of the sync thread is run by hand (dws_mount_sync_once). Covers the swap
 * policy (swap_idle, swap_max_delay, never), the backoff of a transient
 * failure, the refusal of a bad step, and the counts the metrics show. The
 * last line is "N passed, N failed". */
#include "bucket.h"
#include "check.h"
#include "engine.h"
#include "histogram.h"
#include "status.h"
#include "swap.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


/* ---- the swap policy alone ---- */

static void test_swap_policy(void)
{
	dws_swap_policy p = {.idle_ms = 1000, .max_delay_ms = 5000};
	int64_t wake;
	dws_swap_state s = {.ready = false};
	CHECK(dws_swap_decide(&p, &s, 0, &wake) == DWS_SWAP_WAIT && wake == INT64_MAX, "nothing ready: wait");
	s = (dws_swap_state){.ready = true, .ready_since = 0, .root_open = 0, .root_activity = -5000};
	CHECK(dws_swap_decide(&p, &s, 0, &wake) == DWS_SWAP_IDLE, "idle root: swap at once");
	s.root_activity = -200;
	CHECK(dws_swap_decide(&p, &s, 0, &wake) == DWS_SWAP_WAIT && wake == 800, "recent use: wait for swap_idle (%lld)",
	      (long long)wake);
	s.root_open = 1;
	CHECK(dws_swap_decide(&p, &s, 4999, &wake) == DWS_SWAP_WAIT && wake == 5000, "open: wait for swap_max_delay");
	CHECK(dws_swap_decide(&p, &s, 5000, &wake) == DWS_SWAP_FORCED, "open past swap_max_delay: forced");
	p.never_force = true;
	CHECK(dws_swap_decide(&p, &s, 1000000, &wake) == DWS_SWAP_WAIT && wake == INT64_MAX, "never: not while open");
	s.root_open = 0;
	s.root_activity = 1000000 - 10;
	CHECK(dws_swap_decide(&p, &s, 1000000, &wake) == DWS_SWAP_FORCED, "never only holds while a file is open");
}

/* ---- a clock of the test's own ---- */

static int64_t fake_now;
static int64_t fake_mono(void *ctx) { (void)ctx; return fake_now; }
static int64_t fake_wall(void *ctx) { (void)ctx; return 1700000000000000000LL + fake_now * 1000000; }
static const dws_clock fake_clock = {fake_mono, fake_wall, NULL};

/* ---- a bucket whose blob reads of one key fail, a number of times ---- */

static char fail_key[128];
static atomic_int fail_left;

static int failing_read(dws_blob *b, uint64_t off, void *buf, size_t len, const dws_read_hint *h,
			dws_error *err)
{
	if (atomic_load(&fail_left) > 0) {
		atomic_fetch_sub(&fail_left, 1);
		return dws_fail(err, DWS_EIO, "%s: injected read failure", dws_blob_name(b));
	}
	return dws_blob_read_hint(dws_blob_priv(b), off, buf, len, h, err);
}

static void failing_destroy(dws_blob *b) { dws_blob_unref(dws_blob_priv(b)); }

static const struct dws_blob_ops failing_blob_ops = {.read = failing_read, .destroy = failing_destroy};

struct wrap {
	dws_bucket *inner;
};

static int w_list(dws_bucket *b, const char *prefix, dws_object **out, size_t *n, dws_error *err)
{
	return dws_bucket_list(((struct wrap *)b->priv)->inner, prefix, out, n, err);
}

static int w_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out, dws_error *err)
{
	dws_blob *in = NULL;
	int rc = dws_bucket_open_blob(((struct wrap *)b->priv)->inner, obj, &in, err);
	if (rc || strcmp(obj->key, fail_key) != 0) {
		*out = in;
		return rc;
	}
	*out = dws_blob_new(&failing_blob_ops, dws_blob_name(in), dws_blob_size(in), in);
	return DWS_OK;
}

static void w_close(dws_bucket *b)
{
	dws_bucket_close(((struct wrap *)b->priv)->inner);
	free(b->priv);
	free(b->uri);
	free(b);
}

static const struct dws_bucket_ops wrap_ops = {.list = w_list, .open_blob = w_open_blob, .close = w_close};

static dws_bucket *failing_bucket(const char *dir)
{
	dws_error e = {0};
	struct wrap *w = dws_xcalloc(1, sizeof(*w));
	if (dws_bucket_open(dir, &w->inner, &e) != DWS_OK) {
		fprintf(stderr, "%s\n", e.msg);
		exit(1);
	}
	dws_bucket *b = dws_xcalloc(1, sizeof(*b));
	b->ops = &wrap_ops;
	b->priv = w;
	b->uri = dws_xstrdup(dir);
	return b;
}

/* ---- a bucket of checkpoints published step by step ---- */

enum { N = 4096 };

static void write_checkpoint(const char *dir, const uint16_t *v)
{
	char path[512], hdr[128];
	mkdir(dir, 0700);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	int len = snprintf(hdr, sizeof(hdr), "{\"w\":{\"dtype\":\"BF16\",\"shape\":[%d],\"data_offsets\":[0,%d]}}", N, N * 2);
	while (len % 8)
		hdr[len++] = ' ';
	uint64_t hl = (uint64_t)len;
	FILE *f = fopen(path, "wb");
	fwrite(&hl, 8, 1, f);
	fwrite(hdr, 1, (size_t)len, f);
	fwrite(v, 2, N, f);
	fclose(f);
}

struct run {
	char root[64], bucket[96];
	uint16_t v[N];
	uint64_t step;
	char prev[160];
};

/* Step `step` of the run: every 97th value changed; an anchor or a delta. */
static void publish(struct run *r, uint64_t step, bool anchor)
{
	for (size_t i = step % 97; i < N; i += 97)
		r->v[i] = (uint16_t)(r->v[i] + step);
	char dir[160], written[600];
	snprintf(dir, sizeof(dir), "%s/ckpt%llu", r->root, (unsigned long long)step);
	write_checkpoint(dir, r->v);
	dws_publish_opts po;
	dws_publish_opts_init(&po);
	po.prev = anchor ? NULL : r->prev;
	po.next = dir;
	po.bucket = r->bucket;
	po.step = step;
	po.parent_step = anchor ? -1 : (int64_t)r->step;
	po.format = anchor ? DWS_PUB_ANCHOR : DWS_PUB_GAP_DELTA;
	uint64_t changed;
	dws_error e = {0};
	if (dws_publish(&po, written, sizeof(written), &changed, &e) != DWS_OK) {
		fprintf(stderr, "publish step %llu: %s\n", (unsigned long long)step, e.msg);
		exit(1);
	}
	snprintf(r->prev, sizeof(r->prev), "%s", dir);
	r->step = step;
}

static void run_init(struct run *r)
{
	memset(r, 0, sizeof(*r));
	snprintf(r->root, sizeof(r->root), "/tmp/dws-unit-engine-XXXXXX");
	if (!mkdtemp(r->root))
		exit(1);
	snprintf(r->bucket, sizeof(r->bucket), "%s/bucket", r->root);
	for (size_t i = 0; i < N; i++)
		r->v[i] = (uint16_t)(0x3f80 + i % 64);
}

static void run_free(struct run *r)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", r->root);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", r->root);
}

static uint64_t root_step(dws_mount *m)
{
	dws_step *s = dws_mount_root(m);
	uint64_t n = dws_step_number(s);
	dws_step_unref(s);
	return n;
}

/* dws_mount_sync_once at the fake time t. */
static void turn(dws_mount *m, int64_t t)
{
	fake_now = t;
	dws_mount_sync_once(m);
}

static dws_mount *engine(struct run *r, dws_mount_opts *o)
{
	o->bucket = r->bucket;
	o->poll_ms = 1000;
	o->swap_idle_ms = 1000;
	o->swap_max_delay_ms = 5000;
	dws_mount_env env = {&fake_clock, failing_bucket(r->bucket)};
	dws_mount *m = NULL;
	dws_error e = {0};
	if (dws_mount_open_env(o, &env, &m, &e) != DWS_OK) {
		fprintf(stderr, "open: %s\n", e.msg);
		exit(1);
	}
	return m;
}

/* ---- the engine ---- */

static void test_swaps(void)
{
	struct run r;
	run_init(&r);
	publish(&r, 1, true);
	publish(&r, 2, false);
	fake_now = 0;
	dws_mount_opts o;
	dws_mount_opts_init(&o);
	dws_mount *m = engine(&r, &o);
	CHECK(root_step(m) == 2, "the newest step at start");
	publish(&r, 3, false);
	turn(m, 1000); /* polls, builds 3, and the root was idle long enough */
	CHECK(root_step(m) == 3, "idle root: step 3 served at the poll that found it (root %llu)",
	      (unsigned long long)root_step(m));
	dws_mount_root_opened(m); /* a loader holds a file */
	publish(&r, 4, false);
	turn(m, 2000);
	CHECK(root_step(m) == 3, "open: the root stays");
	publish(&r, 5, false);
	turn(m, 3000); /* 5 replaces 4 as the pending step, the clock does not restart */
	turn(m, 6999);
	CHECK(root_step(m) == 3, "open, before swap_max_delay");
	turn(m, 7000);
	CHECK(root_step(m) == 5, "swap_max_delay after the first pending step (root %llu)", (unsigned long long)root_step(m));
	dws_mount_root_released(m);
	dws_mount_close(m);
	run_free(&r);
}

static void test_transient_failure_backs_off(void)
{
	struct run r;
	run_init(&r);
	publish(&r, 1, true);
	fake_now = 0;
	dws_mount_opts o;
	dws_mount_opts_init(&o);
	dws_mount *m = engine(&r, &o);
	snprintf(fail_key, sizeof(fail_key), "deltas/step_000002.safetensors");
	atomic_store(&fail_left, 1000);
	publish(&r, 2, false);
	turn(m, 1000);
	CHECK(root_step(m) == 1, "a delta that cannot be read is not served");
	char *st = dws_mount_status_json(m, NULL, 0);
	CHECK(strstr(st, "injected read failure") != NULL, "the failure in the status: %s", st);
	free(st);
	int left = atomic_load(&fail_left);
	turn(m, 1999);
	CHECK(atomic_load(&fail_left) == left, "no retry before its backoff (1 s)");
	turn(m, 2000);
	CHECK(atomic_load(&fail_left) < left, "retried after 1 s");
	left = atomic_load(&fail_left);
	turn(m, 3000);
	turn(m, 3999);
	CHECK(atomic_load(&fail_left) == left, "the next retry waits 2 s");
	dws_status sn;
	dws_mount_status(m, &sn);
	CHECK(sn.build_failures[0] == 2 && sn.build_failures[1] == 0 && sn.builds.count == 1,
	      "two transient failures (the first try, one retry), one build (%llu, %llu, %llu)", (unsigned long long)sn.build_failures[0],
	      (unsigned long long)sn.build_failures[1], (unsigned long long)sn.builds.count);
	atomic_store(&fail_left, 0); /* the network heals */
	turn(m, 5000);
	CHECK(root_step(m) == 2, "built once the reads work (root %llu)", (unsigned long long)root_step(m));
	dws_mount_status(m, &sn);
	CHECK(sn.builds.count == 2 && sn.builds.le[0] == 2, "each build in the histogram (%llu)",
	      (unsigned long long)sn.builds.count);
	publish(&r, 3, false);
	turn(m, 6000);
	CHECK(root_step(m) == 3, "and the next step too");
	dws_mount_close(m);
	fail_key[0] = 0;
	run_free(&r);
}

static void corrupt_payload(const char *bucket, uint64_t step)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/deltas/step_%06llu.safetensors", bucket, (unsigned long long)step);
	int fd = open(path, O_RDWR);
	off_t end = lseek(fd, 0, SEEK_END);
	unsigned char b;
	if (pread(fd, &b, 1, end - 3) == 1) {
		b ^= 0x5a;
		if (pwrite(fd, &b, 1, end - 3) != 1)
			fprintf(stderr, "cannot corrupt %s\n", path);
	}
	close(fd);
}

static void test_bad_step_refused_for_good(void)
{
	struct run r;
	run_init(&r);
	publish(&r, 1, true);
	fake_now = 0;
	dws_mount_opts o;
	dws_mount_opts_init(&o);
	dws_mount *m = engine(&r, &o);
	publish(&r, 2, false);
	corrupt_payload(r.bucket, 2);
	turn(m, 1000);
	CHECK(root_step(m) == 1, "a step failing its payload checksum is not served");
	uint64_t *v;
	size_t n = dws_mount_steps(m, &v);
	CHECK(n == 1 && v[0] == 1, "nor listed in steps/ (%zu steps)", n);
	free(v);
	dws_step *s = NULL;
	dws_error e = {0};
	CHECK(dws_mount_get_step(m, 2, &s, &e) == DWS_EVERIFY && !s, "nor built for steps/N (%s)", e.msg);
	turn(m, 200000);
	CHECK(root_step(m) == 1, "nor retried");
	dws_status sn;
	dws_mount_status(m, &sn);
	CHECK(sn.build_failures[1] == 1 && sn.build_failures[0] == 0, "one failure for good (%llu bad, %llu transient)",
	      (unsigned long long)sn.build_failures[1], (unsigned long long)sn.build_failures[0]);
	publish(&r, 3, false); /* its chain goes through the bad delta */
	turn(m, 201000);
	CHECK(root_step(m) == 1, "a broken delta breaks its successors");
	publish(&r, 4, true);
	turn(m, 202000);
	CHECK(root_step(m) == 4, "until the next anchor (root %llu)", (unsigned long long)root_step(m));
	dws_mount_close(m);
	run_free(&r);
}

/* ---- the histogram alone ---- */

static void test_histogram(void)
{
	dws_histogram h = {0};
	dws_histogram_observe(&h, 0.01); /* a bound is in its own bucket */
	dws_histogram_observe(&h, 0.3);
	dws_histogram_observe(&h, 120);  /* past the last bound: +Inf only */
	dws_histogram_observe(&h, -1);   /* a clock that went back: 0 */
	CHECK(h.count == 4 && h.le[0] == 2 && h.le[4] == 2 && h.le[5] == 3 && h.le[DWS_HIST_NBOUNDS - 1] == 3,
	      "cumulative counts (%llu %llu %llu)", (unsigned long long)h.le[0], (unsigned long long)h.le[5],
	      (unsigned long long)h.le[DWS_HIST_NBOUNDS - 1]);
	CHECK(h.sum > 120.30 && h.sum < 120.32, "the sum (%f)", h.sum);
	for (int i = 1; i < DWS_HIST_NBOUNDS; i++)
		CHECK(dws_hist_bounds[i] > dws_hist_bounds[i - 1], "bounds rise");
	CHECK(dws_hist_bounds[0] == 0.01 && dws_hist_bounds[DWS_HIST_NBOUNDS - 1] == 60, "10 ms to 60 s");
}

int main(void)
{
	test_histogram();
	test_swap_policy();
	test_swaps();
	test_transient_failure_backs_off();
	test_bad_step_refused_for_good();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
