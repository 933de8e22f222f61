/* libdwsfs — reconstruct the steps of a Delta Weight Sync bucket.
 *
 * Ownership: every open, new or build function returns an object the caller
 * owns and releases with the matching close, free or unref (which accept NULL).
 * Refcounted objects (dws_step, dws_patchfile) are safe to share between threads;
 * everything else belongs to one thread at a time.
 *
 * Errors: functions return DWS_OK (0) or a negative dws_code, and fill a
 * caller-provided dws_error with one line that names the object and the reason.
 */
#ifndef DWSFS_DWSFS_H
#define DWSFS_DWSFS_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define DWSFS_VERSION "0.1.0"

typedef enum dws_code {
	DWS_OK = 0,
	DWS_EIO = -1,      /* a read or write failed */
	DWS_EFORMAT = -2,  /* input violates the format: never served */
	DWS_EUNSUP = -3,   /* valid but unsupported (nvcomp, dtype pairs) */
	DWS_ENOENT = -4,   /* no such step, object or file */
	DWS_ENOMEM = -5,
	DWS_EINVAL = -6,   /* bad argument from the user */
	DWS_ETIMEDOUT = -7,
	DWS_EVERIFY = -8,  /* checksum or chain check failed */
} dws_code;

typedef struct dws_error {
	int code;
	char msg[768];
} dws_error;


/* The one size syntax of every size option and setting: a byte count, or a
 * number with K, M, G or T (powers of 1024; KiB..TiB too), at most 2^63-1. */
bool dws_parse_size(const char *s, uint64_t *out);

/* ---- logging: one line per event ------------------------------------- */

typedef enum dws_log_level { DWS_LOG_ERROR, DWS_LOG_WARN, DWS_LOG_INFO, DWS_LOG_DEBUG } dws_log_level;

/* "dwsfs <ISO 8601 UTC time> <level> <text>" on stderr (the default), a log
 * file or syslog; lines above the set level (info by default) are dropped. */
void dws_log_at(dws_log_level lv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void dws_log(const char *fmt, ...) __attribute__((format(printf, 1, 2))); /* info */
void dws_log_set_level(dws_log_level lv);
bool dws_log_level_parse(const char *s, dws_log_level *out); /* error|warn|info|debug */
/* From now on to syslog (a daemon in the background); false, and stderr
 * kept, where the machine has no syslog socket (a container). A log file
 * set before takes precedence. */
bool dws_log_to_syslog(const char *ident);
/* From now on appended to path (created 0640, no symlink followed). */
int dws_log_to_file(const char *path, dws_error *err);
/* Reopen the log file before the next line (log rotation): async-signal-safe,
 * for a SIGHUP handler. */
void dws_log_reopen(void);

/* ---- dtypes ------------------------------------------------------------ */




/* ---- safetensors -------------------------------------------------------- */

#define DWS_ST_MAX_HEADER (100u * 1024 * 1024) /* same cap as the safetensors library */




/* Parse and validate a header. `prefix` holds at least the first 8 bytes; if
 * it does not hold the whole header, *need is set to the byte count needed and
 * DWS_EFORMAT is not returned (returns 1). `file_size` is the whole file's
 * size: every tensor must lie inside it, and the file must end where the last
 * tensor does (the safetensors library's rule: no trailing bytes). With
 * DWS_ST_SIZE_UNKNOWN (a compressed stream whose size is not known yet) only
 * the header itself is checked. `what` names the file in errors. */
#define DWS_ST_SIZE_UNKNOWN UINT64_MAX


/* ---- blobs and buckets -------------------------------------------------- */

typedef struct dws_object {
	char *key;          /* relative to the bucket root, '/'-separated */
	uint64_t size;
	int64_t mtime_ns;   /* upload time where known */
	char ident[96];     /* content identity: xetHash, ETag+size, or mtime+size */
} dws_object;


/* Bytes held in memory by a blob's cache, kept there until released. */
typedef struct dws_pin {
	void (*release)(void *a, void *b);
	void *a, *b;
} dws_pin;
void dws_pin_release(dws_pin *p); /* no-op on a pin that holds nothing */

typedef struct dws_bucket dws_bucket;

/* Options structs: set up with their dws_*_opts_init first, which fills in
 * every default and `size` (the struct's size in the caller's build: the
 * library refuses a struct of another size, so a program built against
 * another version fails cleanly). Every value then means what it says, 0
 * included. */
typedef struct dws_bucket_opts {
	uint32_t size;
	const char *cache_dir;     /* block cache of remote buckets; NULL: none */
	uint64_t cache_size;       /* its byte cap; 16 GiB */
	bool memory_cache;         /* no disk cache: blocks in memory only */
	uint32_t block_size;       /* fetch unit, a multiple of 4 KiB; 8 MiB */
	const char *ca_file;       /* extra CA bundle (TLS verification stays on) */
	const char *token_file;    /* hf://: the Hub token's file (re-read when it
				      changes); NULL: HF_TOKEN, HF_TOKEN_PATH, the
				      hf CLI's file */
	unsigned stall_timeout_ms; /* a transfer that sends nothing this long fails; 10000 */
	unsigned read_deadline_ms; /* a read that cannot be served by then: EIO; 60000 */
	/* s3:// only; else AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID... */
	const char *s3_endpoint, *s3_region, *s3_key, *s3_secret;
} dws_bucket_opts;
void dws_bucket_opts_init(dws_bucket_opts *o);

/* "/path", "file:///path", "hf://buckets/NS/NAME[/PREFIX]",
 * "hf://NS/REPO[@REVISION]" (a model repo), "s3://BUCKET[/PREFIX]". */
int dws_bucket_open(const char *uri, dws_bucket **out, dws_error *err);
void dws_bucket_close(dws_bucket *b);
const char *dws_bucket_uri(const dws_bucket *b);

/* ---- step names ---------------------------------------------------------- */

/* A step's number as the bucket and the mount name it: six digits or more
 * ("000012", "1234567"), 0 to 2^63-1. buf: at least 21 bytes. */
void dws_step_dir_name(uint64_t step, char *buf, size_t len);
/* The canonical name only ("12" and "0000012" are not step 12). */
bool dws_parse_step_dir(const char *name, uint64_t *step);

/* ---- catalog ------------------------------------------------------------ */

typedef enum dws_variant {
	DWS_VAR_DENSE = 0,
	DWS_VAR_V1,        /* .indices/.values */
	DWS_VAR_RAW,       /* v2/v3 .idx I32 */
	DWS_VAR_GAP_DELTA, /* v2/v3 .idx U16/U32 gaps */
	DWS_VAR_NVCOMP,    /* refused when applied */
	DWS_VAR_XOR,       /* SkyRL or miles: dense XOR against the version before */
	DWS_VAR_OVERWRITE, /* miles: new byte values at byte offsets */
} dws_variant;

const char *dws_variant_name(dws_variant v);

/* The layouts dwsfs reads (docs/format.md): TRL's Delta Weight Sync bucket,
 * SkyRL's checkpoint-delta sync folder, miles' disk-delta folder. */
typedef enum dws_format {
	DWS_FORMAT_AUTO = -1, /* from the layout */
	DWS_FORMAT_TRL = 0,
	DWS_FORMAT_SKYRL,
	DWS_FORMAT_MILES,
} dws_format;
/* "auto", "trl", "skyrl", "miles". */
bool dws_format_parse(const char *s, dws_format *out);
const char *dws_format_name(dws_format f);

struct dws_xver; /* a SkyRL or miles version: its manifest, payloads, records */

typedef struct dws_stepfile {
	uint64_t step;
	dws_object obj;
	bool compressed;      /* .safetensors.zst */
	bool in_anchors;      /* lies under anchors/ (informative only) */
	dws_variant variant;
	bool complete;        /* dense and holds every parameter */
	uint64_t nparams;     /* tensors (dense) or changed params (sparse) */
	uint64_t changed;     /* changed elements (sparse), numel (dense) */
	uint64_t total_elements; /* metadata total_elements, 0 if absent */
	char run_id[64];      /* dwsfs.run_id, "" if absent */
	int64_t parent_step;  /* dwsfs.parent_step, -1 if absent */
	char state_xxh3[17];  /* dwsfs.state_xxh3, "" if absent */
	char error[768];      /* non-empty: the header could not be read; the step is invalid */
	int error_code;       /* its dws_code: a transient one (dws_code_transient) is
			       * read again by the next catalog load, a bad file is not */
	struct dws_xver *xv;  /* SkyRL and miles: the version (obj is its manifest or
			       * index); NULL for TRL files */
} dws_stepfile;

typedef struct dws_catalog_opts {
	uint32_t size;
	int64_t run_tolerance_ns; /* restart detection slack; 60 s */
	const struct dws_catalog *prev; /* reuse headers of unchanged objects */
	/* No listing: prev's objects plus these (found by dws_bucket_head). */
	bool reuse_listing;
	const dws_object *extra;
	size_t nextra;
	/* Read again the headers prev could not read for a passing reason (a
	 * retry is due); else they keep their error until they change. */
	bool reread_failed;
	dws_format format;        /* DWS_FORMAT_AUTO: from the layout (prev's, when given) */
} dws_catalog_opts;
void dws_catalog_opts_init(dws_catalog_opts *o);

typedef struct dws_catalog dws_catalog;

/* List the bucket, read every step file's header, keep the current run. */
int dws_catalog_load(dws_bucket *b, const dws_catalog_opts *opts,
		     dws_catalog **out, dws_error *err);
void dws_catalog_free(dws_catalog *c);
size_t dws_catalog_count(const dws_catalog *c);
/* Steps of the current run, ascending. */
const dws_stepfile *dws_catalog_at(const dws_catalog *c, size_t i);
const dws_stepfile *dws_catalog_find(const dws_catalog *c, uint64_t step);
/* The format the catalog was read as. */
dws_format dws_catalog_format(const dws_catalog *c);
/* Files of older runs that were left out (for `ls --all`). */
size_t dws_catalog_stale_count(const dws_catalog *c);
const dws_stepfile *dws_catalog_stale_at(const dws_catalog *c, size_t i);

/* ---- steps -------------------------------------------------------------- */

typedef struct dws_prefix_map {
	const char *from; /* trainer name prefix */
	const char *to;   /* checkpoint name prefix */
} dws_prefix_map;

typedef struct dws_build_opts {
	uint32_t size;
	const char *base;          /* base folder or URI; NULL: bucket's base/ if any */
	const dws_bucket_opts *bucket_opts; /* for opening the base */
	const dws_prefix_map *maps;
	size_t nmaps;
	const char *tmpdir;        /* where decompressed anchors are spilled */
	uint64_t max_delta_bytes;  /* cap for one decompressed delta; 64 GiB */
	bool verify;               /* check dwsfs.* checksums while building */
} dws_build_opts;
void dws_build_opts_init(dws_build_opts *o);

typedef struct dws_step dws_step;
typedef struct dws_builder dws_builder;

typedef enum dws_file_kind { DWS_FILE_PLAIN, DWS_FILE_SAFETENSORS } dws_file_kind;

typedef struct dws_file_info {
	const char *path; /* relative to the model folder */
	uint64_t size;
	dws_file_kind kind;
} dws_file_info;

/* A builder turns catalog steps into dws_step values. It keeps the layout
 * (base or anchor), the previous step and the blobs it opened. */
int dws_builder_new(dws_catalog *c, const dws_build_opts *opts,
		    dws_builder **out, dws_error *err);
void dws_builder_free(dws_builder *bl);
/* Build step N (any step of the catalog). Reuses the previous build when N
 * follows it in the same chain. Returns a new reference. */
int dws_builder_build(dws_builder *bl, uint64_t step, dws_step **out,
		      dws_error *err);

dws_step *dws_step_ref(dws_step *s);
void dws_step_unref(dws_step *s);
uint64_t dws_step_number(const dws_step *s);
uint64_t dws_step_id(const dws_step *s); /* see dws_catalog_step_id */
uint64_t dws_step_anchor(const dws_step *s);     /* 0: base only */
size_t dws_step_chain_length(const dws_step *s); /* files applied since anchor */
uint64_t dws_step_patch_entries(dws_step *s);
const dws_file_info *dws_step_file(const dws_step *s, size_t i);
/* The folder tree of a step: node 0 is its top folder. Children of a folder
 * are linked through `next`. */
typedef struct dws_node {
	const char *name;
	uint32_t parent;
	uint32_t child;   /* first child, or UINT32_MAX */
	uint32_t next;    /* next sibling, or UINT32_MAX */
	int64_t file;     /* file index, or -1 for a folder */
} dws_node;
#define DWS_NODE_NONE UINT32_MAX
size_t dws_step_node_count(const dws_step *s);
const dws_node *dws_step_node(const dws_step *s, size_t i);
/* Child of folder node dir named name, or DWS_NODE_NONE. */
uint32_t dws_step_node_lookup(const dws_step *s, uint32_t dir, const char *name);
/* dws_step_read for a reply without a copy: the bytes as up to *niov pieces
 * (in: room, at least 1; out: used) in iov. Unpatched source bytes the
 * cache holds in memory are pointed to, each with a pin in pins (room for
 * as many as iov; *npins out) to release once the reply is sent; the rest
 * is produced into buf, at its offset in the range. */
int64_t dws_step_read_iov(dws_step *s, size_t file, uint64_t off, void *buf,
			  size_t len, struct iovec *iov, size_t *niov,
			  dws_pin *pins, size_t *npins, dws_error *err);
/* What dws_step_materialize leaves free on the filesystem it writes to. */
#define DWS_MAT_FREE_FLOOR (1ull << 30)
/* Write file i of s whole into an unnamed file (O_TMPFILE) in dir, in large
 * writes, and return it open read-write in *fd (the caller closes it). It
 * never appears in dir and is gone with its last reference. Refused when
 * dir's filesystem would keep less than min_free bytes free; *stop (may be
 * NULL) cancels. The bytes are dws_step_read's. */
int dws_step_materialize(dws_step *s, size_t file, const char *dir, uint64_t min_free,
			 const _Atomic bool *stop, int *fd, dws_error *err);
/* The step's state digest against the producer's checksum `want` (the
 * catalog's state_xxh3; "" or NULL: nothing to check). DWS_EVERIFY with one
 * line naming `what` on a mismatch. The one check the mount and dwsctl make. */
int dws_step_check_state(dws_step *s, const char *want, const char *what, dws_error *err);

/* ---- tools (dwsctl) ----------------------------------------------------- */

typedef struct dws_progress {
	void (*fn)(void *ctx, const char *what, uint64_t done, uint64_t total);
	void *ctx;
} dws_progress;

/* dws_step_check_state telling pr ("verify", bytes read as BF16, of all). */
int dws_step_check_state_progress(dws_step *s, const char *want, const char *what, const dws_progress *pr,
				  dws_error *err);


/* Extract step N of bl's catalog. Same result as dws_builder_build +
 * dws_extract; when N is an anchor plus sparse deltas it is streamed instead:
 * the anchor is read window by window, the deltas' encoded indices applied
 * to each window in chain order and checked as they go, on every core, with
 * no patch index built. With verify, the folder written is checked against
 * the producer's state checksum (when the step has one) before it is moved
 * into place: a step that fails is never extracted. */
int dws_extract_step(dws_builder *bl, uint64_t step, const char *outdir, bool verify,
		     const dws_progress *pr, dws_error *err);

/* A catch-up patch: what differs between two steps, as one safetensors file
 * in the coordinates of the served model (format: docs/patches.md). */
typedef struct dws_patchfile dws_patchfile;
/* The patch from step `from` to step `to` (from < to) of bl's catalog,
 * written to path atomically. *changed: elements in it. */
int dws_patch_write(dws_builder *bl, uint64_t from, uint64_t to, const char *path, uint64_t *changed,
		    dws_error *err);
uint64_t dws_patchfile_size(const dws_patchfile *p);
/* Bytes [off, off+len): the count (short only at the end), or < 0. */
int64_t dws_patchfile_read(dws_patchfile *p, uint64_t off, void *buf, size_t len, dws_error *err);
/* The open file holding the whole patch (for the kernel to read it
 * directly); owned by p, valid while p is referenced. */
int dws_patchfile_fd(const dws_patchfile *p);
void dws_patchfile_unref(dws_patchfile *p);

typedef enum dws_pub_format {
	DWS_PUB_GAP_DELTA = 0, DWS_PUB_RAW, DWS_PUB_V1, DWS_PUB_ANCHOR
} dws_pub_format;

typedef struct dws_publish_opts {
	uint32_t size;
	const char *prev;        /* previous checkpoint folder (NULL with anchor) */
	const char *next;        /* next checkpoint folder */
	const char *bucket;      /* where: a local folder (made if missing) or
				    s3://BUCKET[/PREFIX]; hf:// is refused (its
				    uploads go through Xet, which has no C client) */
	uint64_t step;
	int64_t parent_step;     /* -1 (the default): none */
	dws_pub_format format;   /* DWS_PUB_GAP_DELTA */
	bool zstd;
	int zstd_level;          /* 1 to 19; 3 */
	const char *run_id;      /* NULL: the bucket's current run, else a fresh one */
	bool force;              /* replace a step the bucket holds (else refused) */
	const dws_progress *progress; /* phases "checksum", "compare", "payload
				    checksum", "write", "upload"; NULL: none */
	/* set (from a signal handler) while the step uploads: the upload ends
	 * and is undone (an S3 multipart upload aborted) and dws_publish fails
	 * with "interrupted"; NULL: never. The "upload" phase starts with
	 * progress 0, before any request. */
	const volatile sig_atomic_t *stop;
} dws_publish_opts;
void dws_publish_opts_init(dws_publish_opts *o);

int dws_publish(const dws_publish_opts *o, char *written, size_t written_len,
		uint64_t *changed_out, dws_error *err);

/* ---- mount engine (what the FUSE daemon serves; no FUSE here) ---------- */

typedef enum dws_verify_mode {
	DWS_VERIFY_AUTO = -1,  /* state; payload for a remote bucket (a state
				* checksum reads the whole model: a download) */
	DWS_VERIFY_NONE = 0,   /* structure checks only */
	DWS_VERIFY_PAYLOAD,    /* + producer payload checksums and parent steps */
	DWS_VERIFY_STATE,      /* + state checksum of the whole new step */
} dws_verify_mode;

typedef struct dws_mount dws_mount;

/* -1 where noted picks the default for the bucket. Times in ms. */
typedef struct dws_mount_opts {
	uint32_t size;
	const char *bucket;
	const dws_bucket_opts *bucket_opts;
	const char *base;
	dws_format format;          /* DWS_FORMAT_AUTO */
	const dws_prefix_map *maps;
	size_t nmaps;
	int64_t poll_ms;            /* -1: 1000, remote buckets 6000 */
	int64_t info_poll_ms;       /* remote: bucket-info probe; 60000 */
	int64_t relist_ms;          /* remote: full listing at least; 600000 */
	int64_t swap_idle_ms;       /* 1000 */
	int64_t swap_max_delay_ms;  /* 30000; -1: never while a root file is open */
	size_t max_steps;           /* step views kept for steps/N; 8 */
	dws_verify_mode verify;     /* DWS_VERIFY_AUTO */
	const char *tmpdir;
	const char *on_swap;        /* sh -c command after each swap */
	int64_t on_swap_timeout_ms; /* a run is killed past it; 0: never; 600000 */
	bool on_swap_keep_secrets;  /* pass HF_TOKEN and AWS_* keys on to it */
	int patch_ahead;            /* the patch root -> new step made before it is
				     * ready: 1 yes, 0 no, -1 once a patch was read */
	const char *mountpoint;     /* absolute: for the hook's environment and logs */
	int64_t patch_mem;          /* the cap on patch memory, process-wide: past it
				     * merged patches spill to unlinked files under
				     * tmpdir ($TMPDIR, else /var/tmp); -1: 1/8 of
				     * the machine's memory, at least 256 MiB */
	/* Called by the sync thread after a swap, holding no lock. */
	void (*swapped)(void *ctx, dws_step *old_root, dws_step *new_root);
	void *ctx;
} dws_mount_opts;

void dws_mount_opts_init(dws_mount_opts *o);

/* A field the caller adds to the status: str, or num when str is NULL. */
typedef struct dws_status_field {
	const char *key;
	const char *str;
	int64_t num;
} dws_status_field;

/* Load the catalog and build the latest good step: any error here is one
 * line, before anything is mounted. */
int dws_mount_open(const dws_mount_opts *o, dws_mount **out, dws_error *err);
int dws_mount_start(dws_mount *m, dws_error *err); /* the sync thread */
void dws_mount_close(dws_mount *m);
/* The step the root serves (a new reference). */
dws_step *dws_mount_root(dws_mount *m);
/* The same, for a lookup of a root entry: counts as root use, under the lock
 * that decides a swap, so a loader's lookups either defer a swap or see it. */
dws_step *dws_mount_root_lookup(dws_mount *m);
/* Root view use: an open of a root file, and its release. The root swaps only
 * after swap_idle ms without an open handle or an open. */
void dws_mount_root_opened(dws_mount *m);
void dws_mount_root_released(dws_mount *m);
/* A file of the step with content id `id` was opened (any view): a reader
 * uses that step. */
void dws_mount_step_opened(dws_mount *m, uint64_t id);
/* Steps of the current catalog, ascending (a malloc'd array). */
size_t dws_mount_steps(dws_mount *m, uint64_t **out);
/* Step N of the catalog, built on first use; a new reference. */
int dws_mount_get_step(dws_mount *m, uint64_t step, dws_step **out,
		       dws_error *err);
/* A step by content id (for inode numbers minted earlier); a new reference. */
int dws_mount_get_step_by_id(dws_mount *m, uint64_t id, dws_step **out,
			     dws_error *err);
/* The producer's state checksum of a step, "" if none. */
void dws_mount_step_checksum(dws_mount *m, uint64_t step, char out[17]);
/* Materialize the root's files under dir from now on (see mount.c), for a
 * step of at most max_bytes; status materialized_step says which step is.
 * The first call wins. */
void dws_mount_materialize(dws_mount *m, const char *dir, uint64_t max_bytes);
/* A new descriptor of file i of the materialized step with this id, or -1
 * when that step is not the one materialized. */
int dws_mount_materialized_fd(dws_mount *m, uint64_t id, size_t file);
/* The descriptor's hold on its copy given back (the last passthrough open
 * of it closed): the copy may then be brought forward in place. */
void dws_mount_materialized_put(dws_mount *m, uint64_t id);
bool dws_mount_is_materialized(dws_mount *m, uint64_t id);
/* The catch-up patch from step `from` to step `to` of the catalog (a new
 * reference): made on first use (both steps verified), the last few kept.
 * DWS_EINVAL when from >= to, DWS_ENOENT for a step not in the bucket. */
int dws_mount_patch(dws_mount *m, uint64_t from, uint64_t to, dws_patchfile **out, dws_error *err);
/* The patches to list in .dwsfs/patches: from the root's last steps (up to
 * max, newest first, into from) to the root's step (*to). */
size_t dws_mount_patch_list(dws_mount *m, uint64_t *from, size_t max, uint64_t *to);
/* .dwsfs/status as a JSON document (malloc'd), with extra fields last. */
char *dws_mount_status_json(dws_mount *m, const dws_status_field *extra, size_t nextra);

/* ---- a snapshot of a mount (for metrics) ------------------------------ */

/* The block cache of a remote bucket (all zero for a local one). */
typedef struct dws_cache_counts {
	uint64_t hits, misses;      /* block reads served by the cache; fetched */
	uint64_t bytes, blocks;     /* on disk now */
	uint64_t unkept_blocks;     /* fetched, and gone from memory before the */
	uint64_t unkept_bytes;      /* disk took them (it was slower than the network) */
	uint64_t waits, wait_ms;    /* reads that waited for a block being fetched
				     * (read ahead, or for another reader), and how long */
} dws_cache_counts;
/* Why an HTTP attempt failed: an error status (408, 5xx, another 4xx), 429,
 * 404/410, the network (connect, reset, stall, timeout), an answer shorter
 * than the range asked, anything else (an answer too large, a Range
 * ignored, a redirect loop). */
typedef enum dws_http_error_kind {
	DWS_HTTP_ERR_STATUS, DWS_HTTP_ERR_THROTTLED, DWS_HTTP_ERR_NOT_FOUND, DWS_HTTP_ERR_NETWORK,
	DWS_HTTP_ERR_TRUNCATED, DWS_HTTP_ERR_OTHER, DWS_HTTP_NERR
} dws_http_error_kind;
/* What a bucket has read since it was opened. */
typedef struct dws_bucket_stats {
	uint64_t bytes_fetched;       /* local: bytes read from its files (and a base
				       * model folder read beside it); remote: the
				       * bytes of its HTTP answers */
	uint64_t requests[4], bytes[4]; /* HTTP by class: api, resolve, cdn, s3 */
	uint64_t retries[DWS_HTTP_NERR];  /* attempts tried again, by why */
	uint64_t failures[DWS_HTTP_NERR]; /* requests that failed for good (retries
					   * used up, or not worth one), by the last why */
	dws_cache_counts cache;       /* its block cache (all zero for a local one) */
} dws_bucket_stats;

/* Step builds take ~10 ms (a small delta on a warm cache) to a minute (a
 * large model's anchor fetched cold): bounds from 10 ms to 60 s. */
#define DWS_HIST_NBOUNDS 12
extern const double dws_hist_bounds[DWS_HIST_NBOUNDS];

typedef struct dws_histogram {
	uint64_t le[DWS_HIST_NBOUNDS]; /* observations <= dws_hist_bounds[i] */
	uint64_t count;                /* all of them (the +Inf bucket) */
	double sum;                    /* seconds */
} dws_histogram;

/* The on_swap hook's runs. */
typedef struct dws_hook_stats {
	uint64_t runs;
	uint64_t failures;       /* runs that did not exit 0 (timeouts included) */
	bool running;
	bool has_last;
	uint64_t last_step;
	int last_exit;           /* exit status; 128 + N for signal N; 124 timed out */
	int64_t last_ms;
} dws_hook_stats;

typedef struct dws_status {
	uint64_t step, anchor;
	size_t chain_length;
	const char *bucket;
	int64_t last_poll_wall;       /* seconds since the epoch, 0: none */
	uint64_t latest_step;
	size_t lag_steps, steps;
	bool has_pending;
	uint64_t pending_step;
	uint64_t swaps;
	int64_t root_since_ns, last_build_ms;
	bool merging, materializing, has_materialized;
	uint64_t materialized_step, materialized_bytes;
	char materialize_note[200];   /* why the root is not materialized; "" */
	uint64_t materialized_in_place, materialized_whole;
	int root_open_handles;
	uint64_t patched_elements, whole_tensor_bytes, patch_bytes;
	size_t whole_tensors;
	uint64_t patch_mem_cap;       /* UINT64_MAX: none */
	uint64_t patch_bytes_memory, patch_bytes_disk, patch_spill_failures;
	bool remote;
	uint64_t bytes_fetched, cache_hits, cache_misses;
	dws_cache_counts cache;       /* remote */
	uint64_t requests[4];         /* remote: api, resolve, cdn, s3 */
	const char *last_error;       /* NULL: none */
	bool has_hook;
	dws_hook_stats hook;
	/* not in the document: for the metrics (docs/metrics.md) */
	dws_bucket_stats io;          /* the bucket's own counts */
	dws_histogram builds;         /* build + verify of each step built */
	uint64_t build_failures[2];   /* step builds failed: may pass, for good */
	uint64_t poll_failures;
} dws_status;

/* A snapshot of the engine, each part under its lock, taken by a reader
 * that must not wait long (the status file, the metrics): last_error NULL,
 * bucket the mount's own (valid while it is open). */
void dws_mount_status(dws_mount *m, dws_status *st);

#endif
