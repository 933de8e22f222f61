/* The XOR-delta formats (SkyRL checkpoint-delta, miles disk-delta; spec:
 * shared/spec/xor-delta-formats.md) behind one interface the catalog and the
 * builder use. A format module (fmt_skyrl.c, fmt_miles.c) reads a listing
 * into versions: each one a manifest or index, the payload objects it names
 * and one record per tensor it changes. The catalog keeps them as steps (a
 * dws_stepfile with its version), the builder applies them (xorapply.c).
 *
 * Layering: format modules read objects through the bucket and parse
 * safetensors headers; they never call the catalog or the builder. */
#ifndef DWSFS_FORMAT_H
#define DWSFS_FORMAT_H

#include "internal.h"

#include <jansson.h>
#include <stdatomic.h>

typedef enum dws_xenc {
	DWS_XENC_XOR,       /* zstd frame: new XOR old over the whole tensor */
	DWS_XENC_OVERWRITE, /* zstd frame: u32 K, K u32 byte offsets, K bytes */
	DWS_XENC_PLAIN,     /* a full version's tensor, stored as it is */
} dws_xenc;

typedef enum dws_xsum {
	DWS_XSUM_NONE, DWS_XSUM_XXH3_128, DWS_XSUM_SHA256, DWS_XSUM_ADLER32, DWS_XSUM_BLAKE3
} dws_xsum;

/* One tensor of a version. */
typedef struct dws_xrec {
	char *name;          /* checkpoint tensor name */
	dws_dtype dtype;     /* DWS_DT_INVALID: the format does not say (miles) */
	uint32_t ndim;       /* with dtype: the shape the record declares */
	uint64_t *shape;
	uint64_t nbytes;     /* the tensor's byte length the record declares; 0: not said */
	size_t obj;          /* index of its payload object in the version */
	uint64_t off, len;   /* its bytes in that object (absolute) */
	dws_xenc enc;
	dws_xsum sum;
	char want[65];       /* lowercase hex of the resulting tensor's checksum */
} dws_xrec;

/* One version: immutable once read, shared by catalogs (refcounted). */
typedef struct dws_xver {
	atomic_long refs;
	uint64_t version;
	bool full;           /* a whole checkpoint (miles): the chain starts here */
	char *folder;        /* "delta-00000005" */
	dws_object *objs;    /* [0] the manifest or index, then the payloads */
	size_t nobjs;
	dws_xrec *recs;
	size_t nrecs;
	uint64_t payload_bytes; /* compressed bytes it lists */
} dws_xver;

dws_xver *dws_xver_ref(dws_xver *v);
void dws_xver_unref(dws_xver *v);

/* What reading a listing into versions found for one version number. */
typedef enum dws_xstate {
	DWS_XV_OK,          /* a version: every payload there with its size */
	DWS_XV_INCOMPLETE,  /* not a version yet (manifest or a payload missing or short) */
	DWS_XV_BAD,         /* there, and wrong: never served */
} dws_xstate;

/* The versions of a listing, as one format reads them. Objects are sorted by
 * key. prev_find (may be NULL) returns a version read before whose objects
 * are all unchanged (same keys and identities), to be reused unread. */
typedef struct dws_xload {
	dws_bucket *bucket;
	const dws_object *objs;
	size_t nobjs;
	/* a payload the listing lacks is looked up by HEAD (a listing reused
	 * from the last poll plus the manifests the poller found) */
	bool head_missing;
	dws_xver *(*prev_find)(void *ctx, const dws_object *index, uint64_t version);
	void *prev_ctx;
} dws_xload;

/* One version number's result. */
typedef struct dws_xfound {
	uint64_t version;
	dws_xstate state;
	dws_xver *v;         /* OK, and BAD where the index itself was read */
	dws_object index;    /* the manifest or index object (key borrowed from the listing) */
	int code;            /* BAD: its dws_code */
	char error[768];     /* BAD: one line naming the version and the reason */
} dws_xfound;

struct dws_format_ops {
	dws_format id;
	const char *name;
	/* Whether key names a version's manifest or index; *version: its number. */
	bool (*is_index)(const char *key, uint64_t *version);
	/* The key of version v's manifest or index (malloc'd). */
	char *(*index_key)(uint64_t version);
	/* Read version `version`, whose index object is `index`. */
	void (*read)(const dws_xload *ld, const dws_object *index, uint64_t version, dws_xfound *out);
};

extern const struct dws_format_ops dws_fmt_skyrl, dws_fmt_miles;
/* The ops of an XOR format, NULL for TRL (and AUTO). */
const struct dws_format_ops *dws_format_ops_of(dws_format f);
/* Which format a listing's keys show: TRL unless one of the XOR formats' indexes
 * is there; DWS_EINVAL naming both when two are. */
int dws_format_detect(const char *uri, const dws_object *objs, size_t n, dws_format *out, dws_error *err);

/* The versions of the listing ld, in order, as catalog entries (*out
 * malloc'd, each with its key malloc'd and a reference to its version): a
 * chain from version 1 or from a full version, up to a gap or a version
 * not complete yet (the next full version starts again). A bad version is
 * listed, with its error. */
int dws_xversions(const struct dws_format_ops *fo, const dws_xload *ld, dws_stepfile **out, size_t *n,
		  dws_error *err);

/* ---- helpers the format modules share (fmt_common.c) ---- */

/* A number of at least `width` digits, canonical (no leading zero past the
 * width), at most 2^63-1. */
bool dws_parse_version(const char *s, size_t len, size_t width, uint64_t *out);
/* key is pre + a version (dws_parse_version, `width`) + suf: its version. */
bool dws_key_version(const char *key, const char *pre, const char *suf, size_t width, uint64_t *version);
/* The listed object with this key, or NULL (objs sorted by key). */
const dws_object *dws_xload_find(const dws_object *objs, size_t n, const char *key);
/* A listed payload (or, with head_missing, one found by HEAD) into *out (key
 * copied): DWS_OK, or DWS_ENOENT when it is not there. */
int dws_xload_object(const dws_xload *ld, const char *key, dws_object *out, dws_error *err);
/* The safetensors header of a payload object, against the object's listed
 * size: DWS_XV_INCOMPLETE when the object is shorter than its header says
 * (still being written), DWS_XV_BAD (err set) when it is wrong. */
dws_xstate dws_xload_header(dws_bucket *b, const dws_object *o, dws_st_file **st, dws_error *err);
/* A version's manifest or index, read whole (at most cap bytes) and parsed:
 * the JSON document, or NULL with err set and out->state INCOMPLETE where
 * the failure may pass (read again later), else BAD. */
json_t *dws_xload_json(dws_bucket *b, const dws_object *o, size_t cap, const char *what, dws_xfound *out,
		       dws_error *err);
/* The end of reading a version: out takes v where its state is OK, else
 * err's code and line (and v goes). */
void dws_xfound_finish(dws_xfound *out, dws_xver *v, const dws_error *err);
/* The checksum algorithm named s and whether want (its hex) has its form. */
int dws_xsum_parse(const char *s, const char *want, dws_xsum *out, const char *what, dws_error *err);
const char *dws_xsum_name(dws_xsum s);
/* A dtype by its torch name ("bfloat16", "float32", ...). */
dws_dtype dws_dtype_from_torch(const char *s);
/* A new version with room for nrecs records; v->objs[0] = *index (key copied). */
dws_xver *dws_xver_new(uint64_t version, const char *folder, const dws_object *index, size_t nrecs);
/* Add a payload object (key copied) unless it is there: its index. */
size_t dws_xver_add_obj(dws_xver *v, const dws_object *o);

#endif
