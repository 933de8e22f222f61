/* The block cache's insides, private to its three files: remote.c (blocks:
 * the disk index, fetches, the disk writers, the cache's life), hotset.c
 * (blocks in memory) and readahead.c (remote blobs: readahead and
 * prefetching). Everyone else goes through remote.h.
 *
 * One lock, c->lock, guards everything in struct dws_cache; a blob's
 * r->lock guards its readahead state. Lock order: c->lock, then r->lock;
 * nothing takes c->lock holding r->lock. */
#ifndef DWSFS_CACHE_INT_H
#define DWSFS_CACHE_INT_H

#include "remote.h"

#include "blockstore.h"

#include <pthread.h>
#include <stdio.h>

#define DWS_BLOCK_ROOM 4096  /* a block buffer's room past the data: its trailer and zeros on disk */
#define DWS_QUEUE_MAX 256    /* prefetch jobs queued at most */
#define DWS_WRITES_MAX 64    /* write_backlog at most */
#define DWS_WRITERS 2        /* the disk takes two direct writes at once faster than one */

/* A block on disk. */
struct entry {
	char *key;          /* "<ident hash>-<block>" */
	uint64_t bytes;     /* on disk, trailer included */
	uint64_t last_use;
	dws_block_stamp checked; /* the file last checked whole in this process */
};

/* A block being fetched (or loaded from disk): its readers wait for it. */
struct flight {
	char *key;
	bool done;
	int rc;
	int waiters;
	struct flight *next;
};

/* A block held in memory: just fetched, or being written to disk. */
struct hot {
	char key[64];
	unsigned char *buf;     /* a pool buffer */
	uint64_t len;
	int refs;               /* readers copying out, the writer */
	uint64_t last_use;
	bool used;              /* a reader has had bytes of it */
	struct hot *next;
};

struct job {
	dws_blob *blob;
	uint64_t block;
};

struct dws_cache {
	dws_cache_opts o;
	char *dir;
	dws_blockstore *store; /* NULL: memory only */
	pthread_mutex_t lock;
	pthread_cond_t cond;   /* flights finishing */
	pthread_cond_t jobs;   /* prefetch jobs queued, stop */
	struct entry *e;
	size_t n, cap_e;
	dws_strmap index;      /* key -> entry index */
	uint64_t total, clock;
	uint64_t reserved;     /* of the cap: blocks being written */
	struct flight *flights;
	struct hot *hot;
	unsigned nhot, hot_cap;
	unsigned reading;       /* of hot_cap: blocks the reads in progress touch */
	unsigned char **pool;  /* free block buffers */
	unsigned npool, pool_cap;
	struct job queue[DWS_QUEUE_MAX];
	size_t qhead, qlen;
	pthread_t *threads;
	unsigned nthreads;
	pthread_cond_t writes; /* blocks to write, stop */
	struct hot *wq[DWS_WRITES_MAX]; /* each held (refs) until written */
	unsigned wq_head, wq_len;
	unsigned nwriting;     /* blocks being written */
	pthread_t writer[DWS_WRITERS];
	unsigned nwriters;
	bool stop;
	uint64_t hits, misses, fetched;
	uint64_t unkept, unkept_bytes; /* fetched blocks the disk had no room for */
	uint64_t waits, wait_ms;       /* reads held up by a block in flight */
};

/* A remote blob's state (its dws_blob_priv). */
struct remote {
	dws_cache *c;
	char *ident_hash;       /* hex of XXH3-128(ident) */
	dws_fetch_fn fetch;
	void *ctx;
	void (*free_ctx)(void *);
	pthread_mutex_t lock;   /* readahead state */
	uint64_t last_end;
	uint64_t last_limit;    /* readahead limit of the last read: its tensor */
	unsigned window;
	unsigned crossed;       /* tensor boundaries crossed by contiguous reads */
	uint64_t run_start;     /* where the current contiguous run began */
	uint64_t tensor_start;  /* where it entered the current tensor */
};

static inline void dws_block_key(char key[64], const struct remote *r, uint64_t blk)
{
	snprintf(key, 64, "%s-%llu", r->ident_hash, (unsigned long long)blk);
}

/* ---- remote.c: blocks ---- */

/* What a caller wants of one block of a remote blob. */
typedef enum dws_block_use {
	DWS_BLOCK_PART,     /* a reader: a block on disk is read in part */
	DWS_BLOCK_WHOLE,    /* a reader in a scan: a block on disk is loaded
			       whole into the hot set, for the reads to come */
	DWS_BLOCK_PREFETCH, /* no reader: the block into the hot set, nothing
			       copied; given up where a reader came first */
} dws_block_use;

typedef struct dws_block_req {
	uint64_t blk;
	dws_block_use use;
	uint64_t off;        /* the reader's bytes [off, off+len) of the block */
	size_t len;
	void *buf;           /* copied here */
	const void **ref;    /* or, when given, pointed to where the block is
				(or is made) hot, *pin keeping it there; ref is
				left alone when the bytes were copied instead */
	dws_pin *pin;
} dws_block_req;

int dws_block_get(dws_blob *b, const dws_block_req *q, dws_error *err);
/* Under lock: the block being fetched under key, if one is. */
struct flight *dws_flight_find_locked(dws_cache *c, const char *key);

/* ---- hotset.c: blocks in memory (all under lock but dws_hot_unpin) ---- */

unsigned char *dws_buf_get_locked(dws_cache *c);
void dws_buf_put_locked(dws_cache *c, unsigned char *b);
struct hot *dws_hot_find_locked(dws_cache *c, const char *key);
/* Blocks read ahead that no reader has had bytes of yet (nor gave up). */
unsigned dws_hot_unread_locked(dws_cache *c);
/* A new hot block over pool buffer buf, room made for it. */
struct hot *dws_hot_add_locked(dws_cache *c, const char *key, unsigned char *buf, uint64_t len);
/* Down to keep blocks beside those held for the disk writers. */
void dws_hot_trim_locked(dws_cache *c, unsigned keep);
/* The reader's bytes [off, off+len) of h, on a reference the caller holds
 * (h->refs counted): into buf, or, when ref is given, pointed to with h
 * pinned (the reference handed over to the pin). Returns with the lock
 * released and the reference dropped unless pinned. */
void dws_hot_give_unlock(dws_cache *c, struct hot *h, uint64_t off, void *buf, size_t len,
			 const void **ref, dws_pin *pin);
/* A reader's pin on a hot block (dws_pin's release; takes the lock). */
void dws_hot_unpin(void *cv, void *hv);

#endif
