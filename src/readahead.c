/* Remote blobs: reads through the block cache (remote.c), with readahead
 * per blob and the prefetching threads that carry it out.
 *
 * - The window doubles on sequential reads up to max_window blocks and
 *   drops to nothing on a random read (mmap faults).
 * - It stays inside the tensor being read (the read's hint names its end),
 *   so one tensor costs about its bytes, until a long contiguous run has
 *   crossed two tensor boundaries: a scan of the file, read ahead across
 *   tensors.
 * - A read's hint may also ask for a direct read (a miss within one block
 *   fetches just its bytes, keeps nothing) or a quiet one (no readahead,
 *   and the blob's readahead state left alone). See dws_read_hint.
 * - Prefetching goes through a bounded queue to a few threads (remote.c),
 *   never more blocks ahead than the hot set holds beside the blocks being
 *   read. */
#include "cache_int.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* ---- prefetch ---- */

/* Under lock: blocks read ahead and not read yet, being fetched, or queued
 * to be: what the readahead already has in hand. */
static unsigned ahead_locked(dws_cache *c)
{
	unsigned n = (unsigned)c->qlen;
	for (struct flight *f = c->flights; f; f = f->next)
		n++;
	return n + dws_hot_unread_locked(c);
}

static bool queued_locked(dws_cache *c, const dws_blob *b, uint64_t blk)
{
	for (size_t q = 0; q < c->qlen; q++) {
		struct job *j = &c->queue[(c->qhead + q) % DWS_QUEUE_MAX];
		if (j->blob == b && j->block == blk)
			return true;
	}
	return false;
}

/* Blocks [first, first+n) of b to the prefetchers, those not in memory, in
 * flight or queued already (blocks on disk are loaded into memory ahead
 * too). */
static void prefetch(dws_blob *b, uint64_t first, unsigned n)
{
	struct remote *r = dws_blob_priv(b);
	dws_cache *c = r->c;
	uint64_t nblk = (dws_blob_size(b) + c->o.block_size - 1) / c->o.block_size;
	pthread_mutex_lock(&c->lock);
	/* no more ahead than the hot set holds beside the blocks being read: a
	 * block fetched beyond that pushes out one read ahead before it, which
	 * is then fetched again */
	unsigned ahead = ahead_locked(c), added = 0;
	unsigned room = c->hot_cap > c->reading + ahead ? c->hot_cap - c->reading - ahead : 0;
	for (unsigned k = 0; k < n && added < room && first + k < nblk && c->qlen < DWS_QUEUE_MAX; k++) {
		char key[64];
		dws_block_key(key, r, first + k);
		if (dws_flight_find_locked(c, key) || dws_hot_find_locked(c, key) || queued_locked(c, b, first + k))
			continue;
		c->queue[(c->qhead + c->qlen) % DWS_QUEUE_MAX] = (struct job){dws_blob_ref(b), first + k};
		c->qlen++;
		added++;
	}
	/* a thread per job: every FUSE read comes here, and most add nothing
	 * (a broadcast then woke every idle prefetcher to find an empty queue:
	 * a third of a cold read's context switches) */
	for (unsigned k = 0; k < added; k++)
		pthread_cond_signal(&c->jobs);
	pthread_mutex_unlock(&c->lock);
}

/* ---- the readahead policy ---- */

/* What a read makes of the readahead. */
struct ra {
	unsigned window;       /* blocks to read ahead past the read */
	bool scan;             /* a scan of the file: across tensors */
	uint64_t tensor_start; /* where the run entered the read's tensor */
};

/* The read [off, off+len) with readahead limit `limit` follows the ones
 * before it: r's readahead state moves on. */
static struct ra readahead_follow(struct remote *r, uint64_t off, size_t len, uint64_t limit)
{
	uint64_t bs = r->c->o.block_size;
	unsigned max_window = r->c->o.max_window;
	pthread_mutex_lock(&r->lock);
	/* sequential: at or near where the last read ended (the kernel's
	 * readahead sends several requests at once; they arrive out of order) */
	bool seq = r->last_end && off + bs >= r->last_end && off <= r->last_end + bs;
	/* Readahead stays inside the tensor being read, so reading one tensor
	 * costs about its bytes, until a contiguous run has crossed two tensor
	 * boundaries and is long (page-aligned kernel reads straddle the ends of
	 * even a single tensor): then this is a scan of the file (a loader's
	 * cat, or safetensors touching every tensor in order), and the window
	 * runs on across tensors. A jump elsewhere starts over. */
	if (!seq) {
		r->crossed = 0;
		r->run_start = off;
		r->tensor_start = off;
	} else if (limit != r->last_limit) {
		r->tensor_start = off;
		if (r->crossed < 2)
			r->crossed++;
	}
	uint64_t scan_len = 4 * bs > (32u << 20) ? 4 * bs : (32u << 20);
	bool scan = r->crossed >= 2 && off + len - r->run_start >= scan_len;
	if (limit != r->last_limit && !scan)
		seq = false; /* a new tensor, not yet a scan: a new window */
	r->last_limit = limit;
	if (seq)
		r->window = r->window ? (r->window * 2 > max_window ? max_window : r->window * 2) : 1;
	else
		r->window = 0;
	r->last_end = seq && r->last_end > off + len ? r->last_end : off + len;
	struct ra ra = {r->window, scan, r->tensor_start};
	pthread_mutex_unlock(&r->lock);
	return ra;
}

/* The window past block `last` of a read ending at end, kept inside the
 * tensor that ends at limit. */
static unsigned window_in_tensor(const struct ra *ra, uint64_t bs, uint64_t last, uint64_t end, uint64_t limit)
{
	unsigned window = ra->window;
	uint64_t lim_blk = limit ? (limit - 1) / bs : 0; /* last block worth having */
	window = lim_blk > last ? (unsigned)(lim_blk - last < window ? lim_blk - last : window) : 0;
	/* and no more ahead than this tensor has been read, less a block: the
	 * kernel's own readahead running past a tensor's end does not pull in
	 * the next one */
	uint64_t read_blocks = (end - ra->tensor_start) / bs;
	uint64_t cap = read_blocks ? read_blocks - 1 : 0;
	return window > cap ? (unsigned)cap : window;
}

/* ---- the blob ---- */

static bool block_cached(dws_cache *c, const struct remote *r, uint64_t blk)
{
	char key[64];
	size_t i;
	dws_block_key(key, r, blk);
	pthread_mutex_lock(&c->lock);
	bool hit = dws_strmap_get(&c->index, key, &i) || dws_hot_find_locked(c, key);
	pthread_mutex_unlock(&c->lock);
	return hit;
}

/* [off, off+len) block by block into buf. */
static int read_blocks(dws_blob *b, uint64_t off, size_t len, void *buf, dws_block_use use, dws_error *err)
{
	struct remote *r = dws_blob_priv(b);
	uint64_t bs = r->c->o.block_size;
	char *dst = buf;
	for (uint64_t blk = off / bs; blk <= (off + len - 1) / bs; blk++) {
		uint64_t bo = blk * bs;
		uint64_t s = off > bo ? off - bo : 0;
		uint64_t e = off + len < bo + bs ? off + len - bo : bs;
		int rc = dws_block_get(b, &(dws_block_req){.blk = blk, .use = use, .off = s, .len = (size_t)(e - s), .buf = dst},
				       err);
		if (rc)
			return rc;
		dst += e - s;
	}
	return DWS_OK;
}

/* Just these bytes, fetched, kept nowhere (DWS_READ_DIRECT). */
static int read_direct(struct remote *r, uint64_t off, size_t len, void *buf, dws_error *err)
{
	int rc = r->fetch(r->ctx, off, len, buf, err);
	if (!rc) {
		pthread_mutex_lock(&r->c->lock);
		r->c->fetched += len;
		pthread_mutex_unlock(&r->c->lock);
	}
	return rc;
}

static bool remote_cached(dws_blob *b, uint64_t off, uint64_t len)
{
	struct remote *r = dws_blob_priv(b);
	uint64_t bs = r->c->o.block_size;
	if (!len)
		return true;
	for (uint64_t blk = off / bs; blk <= (off + len - 1) / bs; blk++)
		if (!block_cached(r->c, r, blk))
			return false;
	return true;
}

static int remote_read_ref(dws_blob *b, uint64_t off, void *buf, size_t len,
			   const dws_read_hint *h, const void **ref, dws_pin *pin, dws_error *err)
{
	struct remote *r = dws_blob_priv(b);
	dws_cache *c = r->c;
	uint64_t bs = c->o.block_size;
	uint64_t first = off / bs, last = (off + len - 1) / bs;
	if (h->mode == DWS_READ_DIRECT && first == last && !block_cached(c, r, first))
		return read_direct(r, off, len, buf, err);
	if (h->mode == DWS_READ_QUIET)
		return read_blocks(b, off, len, buf, DWS_BLOCK_PART, err);

	struct ra ra = readahead_follow(r, off, len, h->ra_limit);
	/* the blocks this read needs beyond the first go to the prefetchers so
	 * several transfers run at once, as many as the hot set has room for
	 * (more would push each other out before this read got to them) */
	if (last > first)
		prefetch(b, first + 1, last - first < c->hot_cap - 1 ? (unsigned)(last - first) : c->hot_cap - 1);
	unsigned window = ra.window;
	if (window && h->ra_limit != UINT64_MAX && !ra.scan)
		window = window_in_tensor(&ra, bs, last, off + len, h->ra_limit);
	if (window)
		prefetch(b, last + 1, window);

	dws_block_use use = window > 0 || ra.scan ? DWS_BLOCK_WHOLE : DWS_BLOCK_PART;
	/* one block's bytes in a scan: pointed to in the hot set, not copied */
	if (ref && first == last && use == DWS_BLOCK_WHOLE)
		return dws_block_get(b, &(dws_block_req){.blk = first, .use = use, .off = off - first * bs, .len = len, .buf = buf,
							 .ref = ref, .pin = pin},
				     err);
	return read_blocks(b, off, len, buf, use, err);
}

static int remote_read(dws_blob *b, uint64_t off, void *buf, size_t len, const dws_read_hint *h,
		       dws_error *err)
{
	return remote_read_ref(b, off, buf, len, h, NULL, NULL, err);
}

static void remote_destroy(dws_blob *b)
{
	struct remote *r = dws_blob_priv(b);
	if (r->free_ctx)
		r->free_ctx(r->ctx);
	pthread_mutex_destroy(&r->lock);
	free(r->ident_hash);
	free(r);
}

static const struct dws_blob_ops remote_ops = {.read = remote_read, .read_ref = remote_read_ref,
					       .cached = remote_cached, .destroy = remote_destroy};

dws_blob *dws_remote_blob(dws_cache *c, const char *name, const char *ident,
			  uint64_t size, dws_fetch_fn fetch, void *ctx,
			  void (*free_ctx)(void *ctx))
{
	struct remote *r = dws_xcalloc(1, sizeof(*r));
	XXH128_hash_t h = XXH3_128bits(ident, strlen(ident));
	r->ident_hash = dws_xasprintf("%016llx%016llx", (unsigned long long)h.high64, (unsigned long long)h.low64);
	r->c = c;
	r->fetch = fetch;
	r->ctx = ctx;
	r->free_ctx = free_ctx;
	pthread_mutex_init(&r->lock, NULL);
	return dws_blob_new(&remote_ops, name, size, r);
}
