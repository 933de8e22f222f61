/* dwsfs's command line (see options.h). One table says each option's kind
 * and range: sizes take K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024),
 * durations take ms, s, m, h or d (a plain number is seconds). Options that
 * are not dwsfs's are libfuse's to judge, which it does before the bucket
 * is opened (fuse_session_new); a near miss of one of ours is named here. */
#include "options.h"
#include "metrics.h"
#include "revision.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

enum kind { K_STR, K_FLAG, K_SIZE, K_DURATION, K_UINT, K_ENUM, K_MAP, K_ADDR };

enum opt_id {
	O_BASE, O_FORMAT, O_POLL, O_INFO_POLL, O_SWAP_IDLE, O_SWAP_MAX_DELAY, O_ON_SWAP, O_ON_SWAP_TIMEOUT,
	O_ON_SWAP_KEEP_SECRETS, O_PATCH_AHEAD, O_VERIFY, O_MAP_PREFIX, O_MAX_STEPS, O_READ_AHEAD, O_CACHE_DIR,
	O_CACHE_SIZE, O_BLOCK_SIZE, O_READ_TIMEOUT, O_STALL_TIMEOUT, O_CA_FILE, O_MAT_MAX, O_MAT_DIR,
	O_PATCH_MEM, O_LOG_LEVEL, O_LOG_FILE, O_NONEMPTY, O_METRICS_ADDR, O_TOKEN_FILE, O_COUNT
};

struct optdef {
	const char *name;
	enum kind kind;
	int64_t min, max;    /* bytes, ms or a count */
	bool never;          /* a duration that may be "never" */
	const char *takes;   /* what the error line says it accepts */
};

#define DAY_MS (86400LL * 1000)

static const struct optdef defs[O_COUNT] = {
	[O_BASE] = {"base", K_STR, 0, 0, false, "a folder or a bucket URI"},
	[O_FORMAT] = {"format", K_ENUM, 0, 0, false, "trl, skyrl, miles or auto"},
	[O_POLL] = {"poll", K_DURATION, 100, DAY_MS, false, "a duration from 100ms to 1d (2s, 500ms; plain: seconds)"},
	[O_INFO_POLL] = {"info_poll", K_DURATION, 1000, DAY_MS, false, "a duration from 1s to 1d"},
	[O_SWAP_IDLE] = {"swap_idle", K_DURATION, 0, DAY_MS, false, "a duration from 0 to 1d"},
	[O_SWAP_MAX_DELAY] = {"swap_max_delay", K_DURATION, 0, DAY_MS, true, "a duration from 0 to 1d, or never"},
	[O_ON_SWAP] = {"on_swap", K_STR, 0, 0, false, "a shell command"},
	[O_ON_SWAP_TIMEOUT] = {"on_swap_timeout", K_DURATION, 1000, DAY_MS, true, "a duration from 1s to 1d, or never"},
	[O_ON_SWAP_KEEP_SECRETS] = {"on_swap_keep_secrets", K_FLAG, 0, 0, false, "no value"},
	[O_PATCH_AHEAD] = {"patch_ahead", K_ENUM, 0, 0, false, "auto, on or off"},
	[O_VERIFY] = {"verify", K_ENUM, 0, 0, false, "none, payload or state"},
	[O_MAP_PREFIX] = {"map_prefix", K_MAP, 0, 0, false, "FROM=TO (up to 16 of them)"},
	[O_MAX_STEPS] = {"max_steps", K_UINT, 1, 1024, false, "a count from 1 to 1024"},
	[O_READ_AHEAD] = {"read_ahead", K_UINT, 0, 1 << 20, false, "kilobytes from 0 to 1048576"},
	[O_CACHE_DIR] = {"cache_dir", K_STR, 0, 0, false, "a folder"},
	[O_CACHE_SIZE] = {"cache_size", K_SIZE, 0, 1LL << 60, false, "a size: bytes, or K, M, G, T (KiB..TiB: powers of 1024), 0: memory only"},
	[O_BLOCK_SIZE] = {"block_size", K_SIZE, 4096, 1 << 30, false, "a multiple of 4K from 4K to 1G"},
	[O_READ_TIMEOUT] = {"read_timeout", K_DURATION, 1000, DAY_MS, false, "a duration from 1s to 1d"},
	[O_STALL_TIMEOUT] = {"stall_timeout", K_DURATION, 1000, 3600 * 1000, false, "a duration from 1s to 1h"},
	[O_CA_FILE] = {"ca_file", K_STR, 0, 0, false, "a readable CA bundle file"},
	[O_MAT_MAX] = {"materialize_max", K_SIZE, 0, 1LL << 60, false, "a size: bytes, or K, M, G, T (KiB..TiB: powers of 1024), 0: never"},
	[O_MAT_DIR] = {"materialize_dir", K_STR, 0, 0, false, "an existing folder"},
	[O_PATCH_MEM] = {"patch_mem", K_SIZE, 0, 1LL << 60, false, "a size: bytes, or K, M, G, T (KiB..TiB: powers of 1024), 0: spill all but small arrays"},
	[O_LOG_LEVEL] = {"log_level", K_ENUM, 0, 0, false, "error, warn, info or debug"},
	[O_LOG_FILE] = {"log_file", K_STR, 0, 0, false, "a file path"},
	[O_NONEMPTY] = {"nonempty", K_FLAG, 0, 0, false, "no value"},
	[O_METRICS_ADDR] = {"metrics_addr", K_ADDR, 0, 0, false, METRICS_ADDR_TAKES},
	[O_TOKEN_FILE] = {"token_file", K_STR, 0, 0, false, "a readable file holding a Hub token"},
};

/* What the command line said, before it is checked (copies: libfuse hands
 * out the pieces of an -o list in a buffer it frees). */
struct raw {
	struct config *c;
	const char *val[O_COUNT];   /* last value of each option */
	bool set[O_COUNT];
	const char *maps[MAX_MAPS + 1];
	size_t nmaps;
	char *nonopt[2];
	size_t nnonopt;
	const char *bad;            /* "--poll" and the like */
	bool help;
};

static char *keep(struct config *c, char *s);

static int opt_lookup(const char *arg, const char **val)
{
	size_t n = strcspn(arg, "=");
	for (int i = 0; i < O_COUNT; i++)
		if (strlen(defs[i].name) == n && !strncmp(arg, defs[i].name, n)) {
			*val = arg[n] ? arg + n + 1 : NULL;
			return i;
		}
	return -1;
}

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	(void)outargs;
	struct raw *r = data;
	if (key == FUSE_OPT_KEY_NONOPT) {
		if (r->nnonopt < 2)
			r->nonopt[r->nnonopt] = keep(r->c, strdup(arg));
		r->nnonopt++;
		return r->nnonopt == 2 ? 1 : 0; /* fuse_parse_cmdline takes the mountpoint */
	}
	if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
		r->help = true;
		return 0;
	}
	const char *val;
	int id = opt_lookup(arg[0] == '-' && arg[1] == '-' ? arg + 2 : arg, &val);
	if (id >= 0 && arg[0] == '-') {
		r->bad = keep(r->c, strdup(arg)); /* --poll 2: an option of ours outside -o */
		return 0;
	}
	if (id < 0)
		return 1; /* libfuse's */
	if (val)
		val = keep(r->c, strdup(val));
	if (id == O_MAP_PREFIX && r->nmaps <= MAX_MAPS)
		r->maps[r->nmaps++] = val;
	r->val[id] = val;
	r->set[id] = true;
	return 0;
}

/* ---- values ---- */

static bool parse_size(const char *s, int64_t *out)
{
	uint64_t v;
	if (!dws_parse_size(s, &v))
		return false;
	*out = (int64_t)v;
	return true;
}

/* ms; "never" is -1 where allowed. */
static bool parse_duration(const char *s, bool never, int64_t *out)
{
	if (never && s && !strcmp(s, "never")) {
		*out = -1;
		return true;
	}
	if (!s || !*s || *s == '-' || *s == '+')
		return false;
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (end == s || errno || !(v >= 0 && v < 1e15))
		return false;
	static const struct { const char *u; double ms; } units[] = {
		{"", 1000}, {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000}};
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++)
		if (!strcmp(end, units[i].u)) {
			double ms = v * units[i].ms;
			if (ms > (double)INT64_MAX / 2)
				return false;
			*out = (int64_t)(ms + 0.5);
			return true;
		}
	return false;
}

static bool parse_uint(const char *s, int64_t *out)
{
	if (!s || *s < '0' || *s > '9')
		return false;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (*end || errno || v > INT64_MAX)
		return false;
	*out = (int64_t)v;
	return true;
}

static bool enum_ok(int id, const char *s)
{
	dws_log_level lv;
	if (id == O_LOG_LEVEL)
		return dws_log_level_parse(s, &lv);
	if (id == O_PATCH_AHEAD)
		return s && (!strcmp(s, "auto") || !strcmp(s, "on") || !strcmp(s, "off"));
	dws_format f;
	if (id == O_FORMAT)
		return dws_format_parse(s, &f);
	return s && (!strcmp(s, "none") || !strcmp(s, "payload") || !strcmp(s, "state"));
}

/* Checks option id's value; *num: its number (bytes, ms, a count). */
static bool value_ok(int id, const struct raw *r, int64_t *num)
{
	const struct optdef *d = &defs[id];
	const char *v = r->val[id];
	*num = 0;
	switch (d->kind) {
	case K_FLAG:
		return v == NULL;
	case K_STR:
		return v && *v;
	case K_ENUM:
		return enum_ok(id, v);
	case K_ADDR: {
		struct sockaddr_storage ss;
		socklen_t len;
		return metrics_addr_parse(v, &ss, &len);
	}
	case K_MAP:
		for (size_t i = 0; i < r->nmaps; i++) {
			const char *m = r->maps[i], *eq = m ? strchr(m, '=') : NULL;
			if (!eq || eq == m || r->nmaps > MAX_MAPS)
				return false;
		}
		return true;
	case K_SIZE:
		return parse_size(v, num) && *num >= d->min && *num <= d->max &&
		       (id != O_BLOCK_SIZE || *num % 4096 == 0);
	case K_DURATION:
		return parse_duration(v, d->never, num) && (*num == -1 || (*num >= d->min && *num <= d->max));
	case K_UINT:
		return parse_uint(v, num) && *num >= d->min && *num <= d->max;
	}
	return false;
}

/* ---- what the values become ---- */

/* s, owned by the config from now on. */
static char *keep(struct config *c, char *s)
{
	if (!s)
		return NULL;
	if (c->nstrings == sizeof(c->strings) / sizeof(c->strings[0])) {
		fprintf(stderr, "dwsfs: too many options\n");
		exit(1);
	}
	return c->strings[c->nstrings++] = s;
}

static int apply_paths(struct config *c, const struct raw *r)
{
	const char *ca = r->val[O_CA_FILE];
	if (ca && access(ca, R_OK) != 0) {
		fprintf(stderr, "dwsfs: ca_file %s: %s (it takes %s)\n", ca, strerror(errno), defs[O_CA_FILE].takes);
		return 1;
	}
	const char *tf = r->val[O_TOKEN_FILE];
	if (tf && access(tf, R_OK) != 0) {
		fprintf(stderr, "dwsfs: token_file %s: %s (it takes %s)\n", tf, strerror(errno), defs[O_TOKEN_FILE].takes);
		return 1;
	}
	if (tf) /* absolute: the daemon works from / */
		c->bo.token_file = keep(c, realpath(tf, NULL));
	/* absolute: the daemon works from / */
	const char *want = r->val[O_MAT_DIR] ? r->val[O_MAT_DIR] : r->val[O_CACHE_DIR] ? r->val[O_CACHE_DIR]
			 : getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	c->mat_dir = keep(c, realpath(want, NULL));
	if (!c->mat_dir && r->val[O_MAT_DIR] && c->mat_max) {
		fprintf(stderr, "dwsfs: materialize_dir %s: %s (it takes %s)\n", want, strerror(errno), defs[O_MAT_DIR].takes);
		return 1;
	}
	if (!c->mat_dir) { /* cache_dir, made later */
		char cwd[PATH_MAX], *abs = NULL;
		if (want[0] != '/' && getcwd(cwd, sizeof(cwd)) && asprintf(&abs, "%s/%s", cwd, want) < 0)
			abs = NULL;
		c->mat_dir = keep(c, abs ? abs : strdup(want));
	}
	if (r->val[O_LOG_FILE] && r->val[O_LOG_FILE][0] != '/') {
		char cwd[PATH_MAX];
		if (getcwd(cwd, sizeof(cwd)) && asprintf(&c->log_file, "%s/%s", cwd, r->val[O_LOG_FILE]) >= 0)
			keep(c, c->log_file);
	} else {
		c->log_file = (char *)r->val[O_LOG_FILE];
	}
	return 0;
}

static void apply_verify(struct config *c, const char *v)
{
	if (!v)
		return;
	c->mo.verify = !strcmp(v, "none") ? DWS_VERIFY_NONE : !strcmp(v, "payload") ? DWS_VERIFY_PAYLOAD : DWS_VERIFY_STATE;
}

static void apply(struct config *c, const struct raw *r, const int64_t *n)
{
	dws_mount_opts *mo = &c->mo;
	dws_bucket_opts *bo = &c->bo;
	if (r->set[O_POLL])
		mo->poll_ms = n[O_POLL];
	if (r->set[O_INFO_POLL])
		mo->info_poll_ms = n[O_INFO_POLL];
	if (r->set[O_SWAP_IDLE])
		mo->swap_idle_ms = n[O_SWAP_IDLE];
	if (r->set[O_SWAP_MAX_DELAY])
		mo->swap_max_delay_ms = n[O_SWAP_MAX_DELAY];
	if (r->set[O_ON_SWAP_TIMEOUT])
		mo->on_swap_timeout_ms = n[O_ON_SWAP_TIMEOUT] < 0 ? 0 : n[O_ON_SWAP_TIMEOUT];
	if (r->set[O_MAX_STEPS])
		mo->max_steps = (size_t)n[O_MAX_STEPS];
	mo->base = r->val[O_BASE];
	if (r->val[O_FORMAT])
		dws_format_parse(r->val[O_FORMAT], &mo->format);
	mo->on_swap = r->val[O_ON_SWAP];
	mo->on_swap_keep_secrets = r->set[O_ON_SWAP_KEEP_SECRETS];
	mo->tmpdir = r->val[O_CACHE_DIR];
	apply_verify(c, r->val[O_VERIFY]);
	if (r->val[O_PATCH_AHEAD])
		mo->patch_ahead = !strcmp(r->val[O_PATCH_AHEAD], "on") ? 1 : !strcmp(r->val[O_PATCH_AHEAD], "off") ? 0 : -1;
	for (size_t i = 0; i < r->nmaps; i++) {
		char *m = keep(c, strdup(r->maps[i])), *eq = strchr(m, '=');
		*eq = 0;
		c->maps[i] = (dws_prefix_map){m, eq + 1};
	}
	mo->maps = r->nmaps ? c->maps : NULL;
	mo->nmaps = r->nmaps;
	bo->cache_dir = r->val[O_CACHE_DIR];
	bo->ca_file = r->val[O_CA_FILE];
	if (r->set[O_BLOCK_SIZE])
		bo->block_size = (uint32_t)n[O_BLOCK_SIZE];
	if (r->set[O_CACHE_SIZE]) {
		bo->memory_cache = n[O_CACHE_SIZE] == 0;
		bo->cache_size = (uint64_t)n[O_CACHE_SIZE];
	}
	if (r->set[O_READ_TIMEOUT])
		bo->read_deadline_ms = (unsigned)n[O_READ_TIMEOUT];
	if (r->set[O_STALL_TIMEOUT])
		bo->stall_timeout_ms = (unsigned)n[O_STALL_TIMEOUT];
	if (r->set[O_PATCH_MEM])
		mo->patch_mem = n[O_PATCH_MEM];
	c->mat_max = r->set[O_MAT_MAX] ? (uint64_t)n[O_MAT_MAX] : UINT64_MAX; /* the disk decides (dws_step_materialize) */
	c->read_ahead_kb = r->set[O_READ_AHEAD] ? (int)n[O_READ_AHEAD] : 1024;
	c->nonempty = r->set[O_NONEMPTY];
	c->metrics_addr = r->val[O_METRICS_ADDR];
	dws_log_level lv;
	if (r->val[O_LOG_LEVEL] && dws_log_level_parse(r->val[O_LOG_LEVEL], &lv))
		dws_log_set_level(lv);
}

/* ---- unknown options ---- */

static size_t edit_distance(const char *a, size_t na, const char *b)
{
	size_t nb = strlen(b), row[64];
	if (na >= 63 || nb >= 63)
		return 99;
	for (size_t j = 0; j <= nb; j++)
		row[j] = j;
	for (size_t i = 1; i <= na; i++) {
		size_t diag = row[0];
		row[0] = i;
		for (size_t j = 1; j <= nb; j++) {
			size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			diag = up;
			row[j] = best;
		}
	}
	return row[nb];
}

/* An option left for libfuse that looks like a misspelt one of ours. */
static bool near_miss(const struct fuse_args *a)
{
	for (int i = 1; i < a->argc; i++) {
		if (strcmp(a->argv[i], "-o") || i + 1 >= a->argc)
			continue;
		for (const char *p = a->argv[++i]; *p;) {
			size_t n = strcspn(p, "=,");
			for (int k = 0; k < O_COUNT; k++)
				if (edit_distance(p, n, defs[k].name) <= (n > 4 ? 2u : 1u)) {
					fprintf(stderr, "dwsfs: unknown option '%.*s': did you mean %s? (it takes %s; dwsfs -h lists them)\n",
						(int)n, p, defs[k].name, defs[k].takes);
					return true;
				}
			p += strcspn(p, ",");
			p += *p == ',';
		}
	}
	return false;
}

static void usage(const char *prog)
{
	printf("usage: %s [-f] [-d] [-o OPTIONS] BUCKET MOUNTPOINT\n\n"
	       "BUCKET: a local folder, hf://buckets/NS/NAME[/PREFIX] or s3://BUCKET[/PREFIX].\n"
	       "Sizes take K, M, G, T (or KiB..TiB: powers of 1024); durations ms, s, m, h, d\n"
	       "(a plain number is seconds). The reference: docs/options.md, man dwsfs.\n"
	       "dwsfs options:\n", prog);
	static const char *const help[O_COUNT] = {
		[O_BASE] = "base model folder or URI (default: the bucket's base/)",
		[O_FORMAT] = "the bucket's layout: trl, skyrl, miles (auto: from the layout)",
		[O_POLL] = "how often to look for new steps (1s; remote 6s)",
		[O_INFO_POLL] = "remote: bucket-info probe for anything else (60s)",
		[O_SWAP_IDLE] = "swap the root once it was idle this long (1s)",
		[O_SWAP_MAX_DELAY] = "swap anyway this long after a step is ready, root files open or not (30s); never",
		[O_ON_SWAP] = "run `sh -c CMD` after each swap, one run at a time (docs/inference.md)",
		[O_ON_SWAP_TIMEOUT] = "kill an on_swap run past this (10m); never",
		[O_ON_SWAP_KEEP_SECRETS] = "pass HF_TOKEN and AWS_* keys on to on_swap",
		[O_PATCH_AHEAD] = "make the patch from the root with each step: auto (once one was read), on, off",
		[O_VERIFY] = "none, payload or state (state; payload for remote buckets)",
		[O_MAP_PREFIX] = "FROM=TO: trainer name prefix FROM is TO in the checkpoint",
		[O_MAX_STEPS] = "step views kept in memory for steps/ (8)",
		[O_READ_AHEAD] = "the kernel's readahead for this mount, KB (1024; 0: the kernel's)",
		[O_CACHE_DIR] = "block cache of remote buckets, decompressed anchors",
		[O_CACHE_SIZE] = "byte cap of the block cache (16G; 0: memory only)",
		[O_BLOCK_SIZE] = "fetch unit of remote objects (8M)",
		[O_READ_TIMEOUT] = "a read not served by then fails with EIO (60s)",
		[O_STALL_TIMEOUT] = "a transfer that sends nothing this long is retried (10s)",
		[O_CA_FILE] = "extra CA bundle for TLS (verification is always on)",
		[O_MAT_MAX] = "largest step materialized for FUSE passthrough (no cap: free disk decides; 0: never)",
		[O_MAT_DIR] = "where (cache_dir, else $TMPDIR, else /var/tmp)",
		[O_PATCH_MEM] = "patch memory kept in RAM; past it patches spill to files in cache_dir, else $TMPDIR, else /var/tmp (1/8 of RAM, >= 256M)",
		[O_LOG_LEVEL] = "error, warn, info or debug (info)",
		[O_LOG_FILE] = "append the log here, reopened on SIGHUP",
		[O_NONEMPTY] = "mount over a folder that is not empty",
		[O_METRICS_ADDR] = "serve Prometheus metrics at http://HOST:PORT/metrics (off)",
		[O_TOKEN_FILE] = "hf://: the Hub token, re-read when the file changes",
	};
	static const char *const meta[O_COUNT] = {
		[O_BASE] = "SRC", [O_FORMAT] = "FMT", [O_POLL] = "TIME", [O_INFO_POLL] = "TIME", [O_SWAP_IDLE] = "TIME",
		[O_SWAP_MAX_DELAY] = "TIME", [O_ON_SWAP] = "CMD", [O_ON_SWAP_TIMEOUT] = "TIME", [O_VERIFY] = "MODE",
		[O_PATCH_AHEAD] = "WHEN",
		[O_MAP_PREFIX] = "FROM=TO", [O_MAX_STEPS] = "N", [O_READ_AHEAD] = "KB", [O_CACHE_DIR] = "DIR",
		[O_CACHE_SIZE] = "SIZE", [O_BLOCK_SIZE] = "SIZE", [O_READ_TIMEOUT] = "TIME", [O_STALL_TIMEOUT] = "TIME",
		[O_CA_FILE] = "FILE", [O_MAT_MAX] = "SIZE", [O_MAT_DIR] = "DIR", [O_PATCH_MEM] = "SIZE", [O_LOG_LEVEL] = "LEVEL",
		[O_LOG_FILE] = "PATH", [O_METRICS_ADDR] = "HOST:PORT", [O_TOKEN_FILE] = "PATH",
	};
	for (int i = 0; i < O_COUNT; i++) {
		char col[48];
		snprintf(col, sizeof(col), "%s%s%s", defs[i].name, meta[i] ? "=" : "", meta[i] ? meta[i] : "");
		printf("    -o %-24s %s\n", col, help[i]);
	}
	printf("\n");
}

/* ---- the whole command line ---- */

static int check_values(const struct raw *r, int64_t *num)
{
	for (int i = 0; i < O_COUNT; i++)
		if (r->set[i] && !value_ok(i, r, &num[i])) {
			const char *v = i == O_MAP_PREFIX ? "" : r->val[i];
			fprintf(stderr, "dwsfs: %s%s%s%s: it takes %s\n", defs[i].name, v ? "='" : " (no value)",
				v ? v : "", v ? "'" : "", defs[i].takes);
			return 1;
		}
	return 0;
}

int config_parse(int argc, char **argv, struct config *c)
{
	memset(c, 0, sizeof(*c));
	c->metrics_fd = -1;
	c->args = (struct fuse_args)FUSE_ARGS_INIT(argc, argv);
	dws_mount_opts_init(&c->mo);
	dws_bucket_opts_init(&c->bo);
	struct raw r = {.c = c};
	int64_t num[O_COUNT] = {0};
	if (fuse_opt_parse(&c->args, &r, NULL, opt_proc) != 0)
		return 1;
	if (r.help) {
		usage(argv[0]);
		fuse_lowlevel_help();
		return 2;
	}
	if (r.bad) {
		fprintf(stderr, "dwsfs: %s: dwsfs options go in -o, as in -o %s=VALUE\n", r.bad, r.bad + 2);
		return 1;
	}
	if (fuse_parse_cmdline(&c->args, &c->cmd) != 0)
		return 1;
	if (c->cmd.show_version) {
		printf("dwsfs %s (revision %s), libfuse %s\n", DWSFS_VERSION, DWSFS_REVISION, fuse_pkgversion());
		return 2;
	}
	if (r.nnonopt != 2 || !c->cmd.mountpoint) {
		fprintf(stderr, "dwsfs: usage: dwsfs [-f] [-o OPTIONS] BUCKET MOUNTPOINT (dwsfs -h for options)\n");
		return 1;
	}
	if (check_values(&r, num) || near_miss(&c->args))
		return 1;
	c->bucket = r.nonopt[0];
	apply(c, &r, num);
	if (apply_paths(c, &r))
		return 1;
	c->mountpoint = keep(c, realpath(c->cmd.mountpoint, NULL));
	if (!c->mountpoint && errno != ENOTCONN) { /* ENOTCONN: a stale mount, cleaned later */
		fprintf(stderr, "dwsfs: mountpoint %s: %s\n", c->cmd.mountpoint, strerror(errno));
		return 1;
	}
	if (!c->mountpoint)
		c->mountpoint = keep(c, strdup(c->cmd.mountpoint));
	c->mo.bucket = c->bucket;
	c->mo.bucket_opts = &c->bo;
	c->mo.mountpoint = c->mountpoint;
	return 0;
}

void config_free(struct config *c)
{
	for (size_t i = 0; i < c->nstrings; i++)
		free(c->strings[i]);
	free(c->cmd.mountpoint);
	fuse_opt_free_args(&c->args);
	if (c->metrics_fd >= 0)
		close(c->metrics_fd);
}

/* ---- the mountpoint ---- */

/* Whether path is a mount point, from /proc/self/mountinfo (field 5, with
 * its octal escapes); *fuse: a FUSE one. */
static bool is_mounted(const char *path, bool *fuse)
{
	FILE *f = fopen("/proc/self/mountinfo", "r");
	if (!f)
		return false;
	char line[4096], mp[4096];
	bool found = false;
	while (!found && fgets(line, sizeof(line), f)) {
		const char *p = line;
		for (int k = 0; k < 4 && p; k++)
			p = strchr(p, ' '), p = p ? p + 1 : NULL;
		size_t o = 0;
		for (; p && *p && *p != ' ' && o + 1 < sizeof(mp); p++) {
			if (p[0] == '\\' && p[1] && p[2] && p[3]) {
				mp[o++] = (char)((p[1] - '0') * 64 + (p[2] - '0') * 8 + (p[3] - '0'));
				p += 3;
			} else {
				mp[o++] = *p;
			}
		}
		mp[o] = 0;
		found = p && !strcmp(mp, path);
		const char *sep = found ? strstr(p, " - ") : NULL; /* then the fs type */
		*fuse = sep && !strncmp(sep + 3, "fuse", 4);
	}
	fclose(f);
	return found;
}

/* A FUSE mount whose daemon was just killed answers a little longer: gone
 * (ENOTCONN, cleaned by the daemon) within half a second, or live. */
static bool live_fuse_mount(const char *path)
{
	for (int i = 0; i < 25; i++) {
		struct statvfs sv;
		if (statvfs(path, &sv) != 0 && errno == ENOTCONN)
			return false;
		struct timespec ts = {0, 20 * 1000000};
		nanosleep(&ts, NULL);
	}
	return true;
}

static bool in_path(const char *prog)
{
	const char *path = getenv("PATH");
	char buf[PATH_MAX];
	for (const char *p = path ? path : "/usr/bin:/bin"; *p;) {
		size_t n = strcspn(p, ":");
		if (n && snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, p, prog) < (int)sizeof(buf) && access(buf, X_OK) == 0)
			return true;
		p += n + (p[n] == ':');
	}
	return false;
}

int config_check_mountpoint(const struct config *c)
{
	const char *mp = c->mountpoint;
	struct stat st;
	if (stat(mp, &st) != 0) {
		if (errno == ENOTCONN)
			return 0; /* a daemon killed: its stale mount is cleaned */
		fprintf(stderr, "dwsfs: mountpoint %s: %s\n", mp, strerror(errno));
		return 1;
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "dwsfs: mountpoint %s: not a folder\n", mp);
		return 1;
	}
	bool fuse = false;
	if (is_mounted(mp, &fuse) && (!fuse || live_fuse_mount(mp))) {
		fprintf(stderr, "dwsfs: mountpoint %s: something is mounted there already (unmount it first: fusermount3 -u %s)\n",
			mp, mp);
		return 1;
	}
	DIR *d = opendir(mp);
	struct dirent *de;
	bool empty = true;
	while (d && empty && (de = readdir(d)))
		empty = !strcmp(de->d_name, ".") || !strcmp(de->d_name, "..");
	if (d)
		closedir(d);
	if (!empty && !c->nonempty) {
		fprintf(stderr, "dwsfs: mountpoint %s: not empty (its files would be hidden; -o nonempty mounts anyway)\n", mp);
		return 1;
	}
	if (access("/dev/fuse", R_OK | W_OK) != 0) {
		fprintf(stderr, "dwsfs: /dev/fuse: %s (%s)\n", strerror(errno),
			errno == EACCES ? "run as root, or as a user the device lets in"
					: "load the fuse module, or give the container the device");
		return 1;
	}
	if (geteuid() != 0 && !in_path("fusermount3")) {
		fprintf(stderr, "dwsfs: not root and no fusermount3 in PATH: cannot mount (run as root or install fuse3)\n");
		return 1;
	}
	return 0;
}
