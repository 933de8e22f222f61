/* dwsctl: inspect, extract, verify and publish Delta Weight Sync buckets
 * without a mount. A thin command line over libdwsfs. */
#include "dwsfs/dwsfs.h"
#include "progress.h"
#include "revision.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdarg.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *prog = "dwsctl";

static void usage(FILE *to)
{
	fprintf(to,
		"usage: %s COMMAND ...\n"
		"  ls BUCKET [--all] [--format F]         one line per step of the current run\n"
		"  extract BUCKET OUTDIR [--step N] [--base SRC] [--map-prefix FROM=TO]...\n"
		"          [--verify none|payload|state] [--format F]\n"
		"                                         write the reconstructed model folder; a step\n"
		"                                         that fails verification (default: state) is not\n"
		"                                         written\n"
		"  verify BUCKET [--step N] [--base SRC] [--map-prefix FROM=TO]... [--format F]\n"
		"                                         check a step against the producer's checksums\n"
		"  patch BUCKET OUT --from M --to N [--base SRC] [--map-prefix FROM=TO]... [--verify MODE]\n"
		"          [--format F]\n"
		"                                         what differs from step M to step N, as one\n"
		"                                         safetensors file (docs/patches.md)\n"
		"  publish PREV NEXT BUCKET --step N [--format gap_delta|raw|v1|anchor]\n"
		"          [--zstd[=LEVEL]] [--run-id ID] [--parent N] [--force]\n"
		"                                         write NEXT as a delta against PREV (or an anchor)\n"
		"                                         into a local folder or s3://\n"
		"  status MOUNTPOINT                      print where a dwsfs mount stands\n"
		"  wait MOUNTPOINT STEP [--timeout S]     return once the root serves STEP or later\n"
		"BUCKET: a local folder, hf://buckets/NS/NAME[/PREFIX] or s3://BUCKET[/PREFIX].\n"
		"F (--format of ls, extract, verify, patch): trl, skyrl or miles; by default\n"
		"from the bucket's layout.\n",
		prog);
}

static int die(const dws_error *e)
{
	fprintf(stderr, "%s: %s\n", prog, e->msg);
	return 1;
}

__attribute__((format(printf, 1, 2)))
static int bad_usage(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 2;
}

/* SIGINT or SIGTERM in publish: during the upload, the library stops it and
 * undoes it (an S3 multipart upload is aborted, not left to be billed), then
 * dwsctl dies of the signal; before the upload, or a second time, at once. */
static volatile sig_atomic_t stop_signal;
static struct progress *watching;

static void on_stop_signal(int sig)
{
	if (stop_signal || !watching || !watching->in_watch) {
		signal(sig, SIG_DFL);
		raise(sig);
		return;
	}
	stop_signal = sig;
}

/* Options shared by the commands that build a step. */
struct build_args {
	uint64_t step;
	bool has_step;
	const char *base;
	dws_prefix_map maps[16];
	size_t nmaps;
	bool verify;       /* payload checksums and parent steps while building */
	bool verify_state; /* and the state checksum of the step */
	dws_format format; /* DWS_FORMAT_AUTO: from the layout */
};

static int parse_step(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (!*s || *end || errno || s[0] == '-')
		return -1;
	*out = v;
	return 0;
}

enum { OPT_STEP = 1000, OPT_BASE, OPT_MAP, OPT_ALL, OPT_FORMAT, OPT_ZSTD, OPT_RUN, OPT_PARENT, OPT_VERIFY, OPT_FROM, OPT_TO, OPT_FORCE };

static int parse_build_opt(int c, struct build_args *a)
{
	switch (c) {
	case OPT_STEP:
		if (parse_step(optarg, &a->step))
			return bad_usage("--step needs a step number, not '%s'", optarg);
		a->has_step = true;
		return 0;
	case OPT_BASE:
		a->base = optarg;
		return 0;
	case OPT_FORMAT:
		if (!dws_format_parse(optarg, &a->format))
			return bad_usage("--format is trl, skyrl or miles, not '%s'", optarg);
		return 0;
	case OPT_VERIFY:
		if (strcmp(optarg, "none") && strcmp(optarg, "payload") && strcmp(optarg, "state"))
			return bad_usage("--verify is none, payload or state, not '%s'", optarg);
		a->verify = strcmp(optarg, "none") != 0;
		a->verify_state = strcmp(optarg, "state") == 0;
		return 0;
	case OPT_MAP: {
		char *eq = strchr(optarg, '=');
		if (!eq || eq == optarg || a->nmaps == 16)
			return bad_usage("--map-prefix needs FROM=TO (at most 16), not '%s'", optarg);
		*eq = 0;
		a->maps[a->nmaps++] = (dws_prefix_map){optarg, eq + 1};
		return 0;
	}
	}
	return -1;
}

/* Open bucket, catalog and builder, then build the requested step. */
struct session {
	dws_bucket *bucket;
	dws_catalog *cat;
	dws_builder *bl;
	dws_step *step;
};

static void session_close(struct session *s)
{
	dws_step_unref(s->step);
	dws_builder_free(s->bl);
	dws_catalog_free(s->cat);
	dws_bucket_close(s->bucket);
}

static int session_open_build(struct session *s, const char *uri, struct build_args *a,
			      bool build, dws_error *err)
{
	memset(s, 0, sizeof(*s));
	int rc = dws_bucket_open(uri, &s->bucket, err);
	dws_catalog_opts co;
	dws_catalog_opts_init(&co);
	co.format = a ? a->format : DWS_FORMAT_AUTO;
	if (!rc)
		rc = dws_catalog_load(s->bucket, &co, &s->cat, err);
	if (rc)
		return rc;
	if (!a)
		return DWS_OK;
	if (!a->has_step) {
		size_t n = dws_catalog_count(s->cat);
		if (!n) {
			err->code = DWS_ENOENT;
			if (dws_catalog_format(s->cat) == DWS_FORMAT_TRL)
				snprintf(err->msg, sizeof(err->msg), "%s: the bucket holds no steps (anchors/ and deltas/ are empty)", uri);
			else
				snprintf(err->msg, sizeof(err->msg), "%s: the folder holds no complete %s version yet", uri,
					 dws_format_name(dws_catalog_format(s->cat)));
			return DWS_ENOENT;
		}
		a->step = dws_catalog_at(s->cat, n - 1)->step;
	}
	dws_build_opts bo;
	dws_build_opts_init(&bo);
	bo.base = a->base;
	bo.maps = a->maps;
	bo.nmaps = a->nmaps;
	bo.verify = a->verify;
	rc = dws_builder_new(s->cat, &bo, &s->bl, err);
	if (!rc && build)
		rc = dws_builder_build(s->bl, a->step, &s->step, err);
	return rc;
}

static int session_open(struct session *s, const char *uri, struct build_args *a,
			dws_error *err)
{
	return session_open_build(s, uri, a, true, err);
}

/* ---- ls ---- */

static void fmt_time(int64_t ns, char *buf, size_t n)
{
	time_t t = (time_t)(ns / 1000000000);
	struct tm tm;
	gmtime_r(&t, &tm);
	strftime(buf, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void ls_line(const dws_stepfile *f, const char *tag)
{
	char when[32];
	fmt_time(f->obj.mtime_ns, when, sizeof(when));
	const char *kind = f->variant == DWS_VAR_DENSE ? (f->complete ? (f->xv ? "full" : "anchor") : "overlay") : "delta";
	const char *comp = f->variant == DWS_VAR_DENSE ? (f->complete ? "complete" : "partial")
			   : f->variant == DWS_VAR_XOR || f->variant == DWS_VAR_OVERWRITE ? "dense" : "sparse";
	printf("%-8" PRIu64 " %-7s %-8s %-9s%s %12" PRIu64 " %12" PRIu64 " %s%s%s%s\n", f->step, kind, comp,
	       dws_variant_name(f->variant), f->compressed ? "+zst" : "    ", f->changed, f->obj.size, when, tag,
	       f->error[0] ? "  INVALID: " : "", f->error);
}

static int cmd_ls(int argc, char **argv)
{
	static const struct option lo[] = {{"all", no_argument, 0, OPT_ALL}, {"format", required_argument, 0, OPT_FORMAT}, {0}};
	bool all = false;
	dws_format fmt = DWS_FORMAT_AUTO;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == OPT_ALL)
			all = true;
		else if (c == OPT_FORMAT && dws_format_parse(optarg, &fmt))
			continue;
		else if (c == OPT_FORMAT)
			return bad_usage("--format is trl, skyrl or miles, not '%s'", optarg);
		else
			return 2;
	}
	if (argc - optind != 1)
		return bad_usage("ls takes one BUCKET");
	struct session s;
	dws_error err = {0};
	memset(&s, 0, sizeof(s));
	int orc = dws_bucket_open(argv[optind], &s.bucket, &err);
	dws_catalog_opts co;
	dws_catalog_opts_init(&co);
	co.format = fmt;
	if (!orc)
		orc = dws_catalog_load(s.bucket, &co, &s.cat, &err);
	if (orc) {
		session_close(&s);
		return die(&err);
	}
	if (dws_catalog_format(s.cat) != DWS_FORMAT_TRL)
		printf("# %s versions: CHANGED is the bytes of the tensors a version changes, BYTES its manifest's\n",
		       dws_format_name(dws_catalog_format(s.cat)));
	printf("%-8s %-7s %-8s %-13s %12s %12s %s\n", "STEP", "KIND", "STATE", "ENCODING", "CHANGED", "BYTES", "UPLOADED");
	for (size_t i = 0; i < dws_catalog_count(s.cat); i++)
		ls_line(dws_catalog_at(s.cat, i), "");
	if (all)
		for (size_t i = 0; i < dws_catalog_stale_count(s.cat); i++)
			ls_line(dws_catalog_stale_at(s.cat, i), "  (earlier run, ignored)");
	else if (dws_catalog_stale_count(s.cat))
		fprintf(stderr, "%s: %zu files of an earlier trainer run are ignored (--all lists them)\n", prog,
			dws_catalog_stale_count(s.cat));
	session_close(&s);
	return 0;
}

/* ---- extract ---- */

static int cmd_extract(int argc, char **argv)
{
	static const struct option lo[] = {
		{"step", required_argument, 0, OPT_STEP}, {"base", required_argument, 0, OPT_BASE},
		{"map-prefix", required_argument, 0, OPT_MAP}, {"verify", required_argument, 0, OPT_VERIFY},
		{"format", required_argument, 0, OPT_FORMAT}, {0}};
	struct build_args a = {.verify = true, .verify_state = true, .format = DWS_FORMAT_AUTO};
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1)
		if (parse_build_opt(c, &a))
			return 2;
	if (argc - optind != 2)
		return bad_usage("extract takes BUCKET OUTDIR");
	struct session s;
	dws_error err = {0};
	if (session_open_build(&s, argv[optind], &a, false, &err)) {
		session_close(&s);
		return die(&err);
	}
	struct progress p;
	const dws_progress *pr = progress_start(&p, prog, "extract");
	int rc = dws_extract_step(s.bl, a.step, argv[optind + 1], a.verify_state, pr, &err);
	progress_end(&p);
	session_close(&s);
	return rc ? die(&err) : 0;
}

/* ---- verify ---- */

static int cmd_verify(int argc, char **argv)
{
	static const struct option lo[] = {
		{"step", required_argument, 0, OPT_STEP}, {"base", required_argument, 0, OPT_BASE},
		{"map-prefix", required_argument, 0, OPT_MAP}, {"format", required_argument, 0, OPT_FORMAT}, {0}};
	struct build_args a = {.verify = true, .format = DWS_FORMAT_AUTO};
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1)
		if (parse_build_opt(c, &a))
			return 2;
	if (argc - optind != 1)
		return bad_usage("verify takes one BUCKET");
	struct session s;
	dws_error err = {0};
	if (session_open(&s, argv[optind], &a, &err)) {
		session_close(&s);
		return die(&err);
	}
	const dws_stepfile *f = dws_catalog_find(s.cat, a.step);
	const char *want = f->state_xxh3[0] ? f->state_xxh3 : NULL;
	char *what = NULL;
	if (asprintf(&what, "%s/%s", dws_bucket_uri(s.bucket), f->obj.key) < 0)
		what = NULL;
	struct progress p;
	const dws_progress *pr = progress_start(&p, prog, "verify");
	int rc = dws_step_check_state_progress(s.step, want, what ? what : argv[optind], pr, &err);
	progress_end(&p);
	free(what);
	if (!rc)
		printf("step %" PRIu64 ": %s (anchor %" PRIu64 ", %zu files applied, %" PRIu64 " patched elements)\n", a.step,
		       want ? "state checksum matches"
		       : dws_catalog_format(s.cat) != DWS_FORMAT_TRL ? "every tensor's checksum matches"
								      : "chain decodes; no producer checksum to compare",
		       dws_step_anchor(s.step), dws_step_chain_length(s.step), dws_step_patch_entries(s.step));
	session_close(&s);
	return rc ? die(&err) : 0;
}

/* ---- patch ---- */

static int cmd_patch(int argc, char **argv)
{
	static const struct option lo[] = {
		{"from", required_argument, 0, OPT_FROM}, {"to", required_argument, 0, OPT_TO},
		{"base", required_argument, 0, OPT_BASE}, {"map-prefix", required_argument, 0, OPT_MAP},
		{"verify", required_argument, 0, OPT_VERIFY}, {"format", required_argument, 0, OPT_FORMAT}, {0}};
	struct build_args a = {.verify = true, .format = DWS_FORMAT_AUTO};
	uint64_t from = 0, to = 0;
	bool has_from = false, has_to = false;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (c == OPT_FROM || c == OPT_TO) {
			if (parse_step(optarg, c == OPT_FROM ? &from : &to))
				return bad_usage("--%s needs a step number, not '%s'", c == OPT_FROM ? "from" : "to", optarg);
			*(c == OPT_FROM ? &has_from : &has_to) = true;
		} else if (parse_build_opt(c, &a)) {
			return 2;
		}
	}
	if (argc - optind != 2 || !has_from || !has_to)
		return bad_usage("patch takes BUCKET OUT --from M --to N");
	if (from >= to)
		return bad_usage("--from %" PRIu64 " must come before --to %" PRIu64, from, to);
	a.step = to;
	a.has_step = true;
	struct session s;
	dws_error err = {0};
	if (session_open_build(&s, argv[optind], &a, false, &err)) {
		session_close(&s);
		return die(&err);
	}
	uint64_t changed = 0;
	int rc = dws_patch_write(s.bl, from, to, argv[optind + 1], &changed, &err);
	session_close(&s);
	if (rc)
		return die(&err);
	printf("%s: %" PRIu64 " elements from step %" PRIu64 " to step %" PRIu64 "\n", argv[optind + 1], changed, from, to);
	return 0;
}

/* ---- publish ---- */

static int cmd_publish(int argc, char **argv)
{
	static const struct option lo[] = {
		{"step", required_argument, 0, OPT_STEP}, {"format", required_argument, 0, OPT_FORMAT},
		{"zstd", optional_argument, 0, OPT_ZSTD}, {"run-id", required_argument, 0, OPT_RUN},
		{"parent", required_argument, 0, OPT_PARENT}, {"force", no_argument, 0, OPT_FORCE}, {0}};
	dws_publish_opts o;
	dws_publish_opts_init(&o);
	bool has_step = false;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		uint64_t v;
		switch (c) {
		case OPT_STEP:
			if (parse_step(optarg, &o.step))
				return bad_usage("--step needs a step number, not '%s'", optarg);
			has_step = true;
			break;
		case OPT_PARENT:
			if (parse_step(optarg, &v) || v > INT64_MAX)
				return bad_usage("--parent needs a step number, not '%s'", optarg);
			o.parent_step = (int64_t)v;
			break;
		case OPT_FORMAT:
			if (!strcmp(optarg, "gap_delta"))
				o.format = DWS_PUB_GAP_DELTA;
			else if (!strcmp(optarg, "raw"))
				o.format = DWS_PUB_RAW;
			else if (!strcmp(optarg, "v1"))
				o.format = DWS_PUB_V1;
			else if (!strcmp(optarg, "anchor"))
				o.format = DWS_PUB_ANCHOR;
			else
				return bad_usage("--format is gap_delta, raw, v1 or anchor, not '%s'", optarg);
			break;
		case OPT_ZSTD:
			o.zstd = true;
			if (optarg && (parse_step(optarg, &v) || v < 1 || v > 19))
				return bad_usage("--zstd level is 1..19, not '%s'", optarg);
			if (optarg)
				o.zstd_level = (int)v;
			break;
		case OPT_RUN:
			o.run_id = optarg;
			break;
		case OPT_FORCE:
			o.force = true;
			break;
		default:
			return 2;
		}
	}
	if (argc - optind != 3 || !has_step)
		return bad_usage("publish takes PREV NEXT BUCKET and --step N (PREV may be '-' with --format anchor)");
	o.prev = strcmp(argv[optind], "-") ? argv[optind] : NULL;
	o.next = argv[optind + 1];
	o.bucket = argv[optind + 2];
	char written[4096];
	uint64_t changed = 0;
	dws_error err = {0};
	struct progress p;
	o.progress = progress_watch(&p, prog, "publish", "upload");
	o.stop = &stop_signal;
	watching = &p;
	struct sigaction sa = {.sa_handler = on_stop_signal};
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	int rc = dws_publish(&o, written, sizeof(written), &changed, &err);
	progress_end(&p);
	if (rc && stop_signal) { /* the upload was undone: now die of the signal */
		die(&err);
		signal(stop_signal, SIG_DFL);
		raise(stop_signal);
	}
	if (rc)
		return die(&err);
	printf("%s: step %" PRIu64 ", %" PRIu64 " elements\n", written, o.step, changed);
	return 0;
}

/* ---- status / wait (talk to a mount through .dwsfs/status) ---- */

static char *read_status(const char *mnt, char *why, size_t wl)
{
	char *path = NULL;
	if (asprintf(&path, "%s/.dwsfs/status", mnt) < 0)
		return NULL;
	FILE *fp = fopen(path, "r");
	if (!fp) {
		snprintf(why, wl, "%s: %s (is a dwsfs mount there?)", path, strerror(errno));
		free(path);
		return NULL;
	}
	size_t cap = 1 << 16, len;
	char *buf = malloc(cap);
	len = buf ? fread(buf, 1, cap - 1, fp) : 0;
	fclose(fp);
	free(path);
	if (buf)
		buf[len] = 0;
	return buf;
}

static bool status_step(const char *json, uint64_t *step)
{
	json_t *j = json_loads(json, 0, NULL);
	json_t *v = json_object_get(j, "step");
	bool ok = json_is_integer(v) && json_integer_value(v) >= 0;
	if (ok)
		*step = (uint64_t)json_integer_value(v);
	json_decref(j);
	return ok;
}

static int cmd_status(int argc, char **argv)
{
	if (argc != 2)
		return bad_usage("status takes one MOUNTPOINT");
	char why[512];
	char *s = read_status(argv[1], why, sizeof(why));
	if (!s) {
		fprintf(stderr, "%s: %s\n", prog, why);
		return 1;
	}
	fputs(s, stdout);
	free(s);
	return 0;
}

static int cmd_wait(int argc, char **argv)
{
	static const struct option lo[] = {{"timeout", required_argument, 0, 't'}, {0}};
	double timeout = 60;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char *end;
		if (c != 't' || (timeout = strtod(optarg, &end), *end) || timeout < 0)
			return bad_usage("--timeout takes seconds");
	}
	uint64_t want;
	if (argc - optind != 2 || parse_step(argv[optind + 1], &want))
		return bad_usage("wait takes MOUNTPOINT STEP");
	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		char why[512];
		char *s = read_status(argv[optind], why, sizeof(why));
		uint64_t step = 0;
		bool ok = s && status_step(s, &step);
		free(s);
		if (ok && step >= want) {
			printf("%" PRIu64 "\n", step);
			return 0;
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		double el = (double)(now.tv_sec - t0.tv_sec) + (double)(now.tv_nsec - t0.tv_nsec) / 1e9;
		if (el >= timeout) {
			fprintf(stderr, "%s: %s: step %" PRIu64 " did not arrive within %.1f s (%s)\n", prog, argv[optind], want,
				timeout, ok ? "the root serves an earlier step" : why);
			return 1;
		}
		struct timespec d = {0, 50 * 1000000};
		nanosleep(&d, NULL);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf("dwsctl %s (revision %s)\n", DWSFS_VERSION, DWSFS_REVISION);
		return 0;
	}
	const char *cmd = argv[1];
	argv[1] = argv[0];
	argc--;
	argv++;
	if (!strcmp(cmd, "ls"))
		return cmd_ls(argc, argv);
	if (!strcmp(cmd, "extract"))
		return cmd_extract(argc, argv);
	if (!strcmp(cmd, "verify"))
		return cmd_verify(argc, argv);
	if (!strcmp(cmd, "publish"))
		return cmd_publish(argc, argv);
	if (!strcmp(cmd, "patch"))
		return cmd_patch(argc, argv);
	if (!strcmp(cmd, "status"))
		return cmd_status(argc, argv);
	if (!strcmp(cmd, "wait"))
		return cmd_wait(argc, argv);
	fprintf(stderr, "%s: unknown command '%s'\n", prog, cmd);
	usage(stderr);
	return 2;
}
