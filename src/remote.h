/* Remote objects read lazily through a disk block cache. */
#ifndef DWSFS_REMOTE_H
#define DWSFS_REMOTE_H

#include "internal.h"

typedef struct dws_cache dws_cache;

typedef struct dws_cache_opts {
	const char *dir;          /* NULL: dws_cache_default_dir() */
	uint64_t cap;             /* byte cap; default 16 GiB */
	uint64_t free_floor;      /* keep this much free on the filesystem; default 1 GiB */
	uint32_t block_size;      /* default 8 MiB */
	unsigned prefetch_threads;/* default 4 */
	unsigned max_window;      /* readahead blocks at most; default 8 */
	unsigned wait_ms;         /* a reader waits this long for a block; default 60000 */
	bool memory_only;         /* nothing written to or read from dir */
	unsigned write_backlog;   /* blocks held for the disk past the readers' need;
				     default 4, then they are not kept */
	unsigned write_delay_ms;  /* tests: a disk this much slower per block */
} dws_cache_opts;

int dws_cache_open(const dws_cache_opts *o, dws_cache **out, dws_error *err);
/* Where the cache lives without a cache_dir (malloc'd): $DWSFS_CACHE_DIR,
 * else $XDG_CACHE_HOME/dwsfs, else $HOME/.cache/dwsfs, else (no HOME, a
 * system service) /var/cache/dwsfs for root. */
char *dws_cache_default_dir(void);
/* One cache per folder in a process, shared by every bucket using it. */
int dws_cache_acquire(const dws_bucket_opts *bo, dws_cache **out, dws_error *err);
void dws_cache_release(dws_cache *c);
void dws_cache_close(dws_cache *c);
void dws_cache_stats(dws_cache *c, dws_cache_counts *out);

/* Fetches [off, off+len) of an object into dst (exactly len bytes). */
typedef int (*dws_fetch_fn)(void *ctx, uint64_t off, size_t len, void *dst,
			    dws_error *err);

/* A blob whose bytes come from fetch(ctx, ...) through the cache, keyed by
 * ident (content identity: a rewritten object has a new ident). The blob owns
 * ctx and calls free_ctx on it with the last reference. */
dws_blob *dws_remote_blob(dws_cache *c, const char *name, const char *ident,
			  uint64_t size, dws_fetch_fn fetch, void *ctx,
			  void (*free_ctx)(void *ctx));

#endif
