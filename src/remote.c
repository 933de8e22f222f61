/* The block cache: remote objects are read in aligned blocks kept as files
 * under cache_dir/blocks, keyed by (content identity, block number), so a
 * rewritten object is never served from a stale block.
 *
 * - A fetched block goes into a small in-memory hot set first: the readers
 *   waiting for it are served from there at once, and the fetching thread
 *   then writes it to disk with O_DIRECT (no page cache filled, no copy) off
 *   the read path. Block buffers are pooled and page aligned, so a scan does
 *   not fault fresh memory in for every block.
 * - The files are src/blockstore.c's: folders opened without following a
 *   link and refused unless only the daemon's user can write them; a block
 *   written to a temporary file and renamed into place (a kill -9
 *   mid-download leaves no block); a trailer whose checksum covers the data
 *   and the block's key, checked on every load into the hot set, and for a
 *   read of part of a block when its file was not checked yet in this
 *   process or changed since.
 * - One fetch per block however many readers want it (single flight); readers
 *   wait with a deadline.
 * - A hard byte cap and a free-space floor, LRU eviction, room made for a
 *   block (and its bytes counted) before it is written; the index is rebuilt
 *   from the files at start, so the cache survives remounts.
 * - Readahead per blob: the window doubles on sequential reads up to
 *   max_window blocks and drops to nothing on a random read (mmap faults).
 * - memory_only: no disk at all, the hot set is the cache (a node whose disk
 *   is small or slower than its network). */
#include "remote.h"

#include "blockstore.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <xxhash.h>

#define ALIGN 4096 /* a block buffer's room past the data: its trailer and zeros on disk */
#define QUEUE_MAX 256
#define WRITES_MAX 64 /* write_backlog at most */
#define WRITERS 2     /* the disk takes two direct writes at once faster than one */

struct entry {
	char *key;          /* "<ident hash>-<block>" */
	uint64_t bytes;     /* on disk, trailer included */
	uint64_t last_use;
	dws_block_stamp checked; /* the file last checked whole in this process */
};

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
	struct job queue[QUEUE_MAX];
	size_t qhead, qlen;
	pthread_t *threads;
	unsigned nthreads;
	pthread_cond_t writes; /* blocks to write, stop */
	struct hot *wq[WRITES_MAX]; /* each held (refs) until written */
	unsigned wq_head, wq_len;
	unsigned nwriting;     /* blocks being written */
	pthread_t writer[WRITERS];
	unsigned nwriters;
	bool stop;
	uint64_t hits, misses, fetched;
	uint64_t unkept, unkept_bytes; /* fetched blocks the disk had no room for */
	uint64_t waits, wait_ms;       /* reads held up by a block in flight */
};

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

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- index (under lock) ---- */

static void rebuild_map(dws_cache *c)
{
	dws_strmap_free(&c->index);
	dws_strmap_init(&c->index);
	for (size_t i = 0; i < c->n; i++)
		dws_strmap_put(&c->index, c->e[i].key, i);
}

static void drop_locked(dws_cache *c, size_t i)
{
	dws_block_remove(c->store, c->e[i].key);
	c->total -= c->e[i].bytes;
	free(c->e[i].key);
	c->e[i] = c->e[--c->n];
	rebuild_map(c);
}

/* Make room for `need` more bytes on disk, under the cap beside the blocks
 * on disk and those being written, and above the free-space floor: evict
 * least recently used blocks. False if there is no room even so. */
static bool evict_locked(dws_cache *c, uint64_t need)
{
	for (;;) {
		bool room = c->total + c->reserved + need <= c->o.cap &&
			    dws_blockstore_free(c->store) >= c->o.free_floor + need;
		if (room || !c->n)
			return room;
		size_t old = 0;
		for (size_t i = 1; i < c->n; i++)
			if (c->e[i].last_use < c->e[old].last_use)
				old = i;
		drop_locked(c, old);
	}
}

static void insert_locked(dws_cache *c, const char *key, uint64_t bytes, const dws_block_stamp *checked)
{
	size_t i;
	if (dws_strmap_get(&c->index, key, &i)) {
		c->e[i].last_use = ++c->clock;
		return;
	}
	if (c->n == c->cap_e) {
		c->cap_e = c->cap_e ? c->cap_e * 2 : 256;
		c->e = dws_xrealloc(c->e, c->cap_e * sizeof(*c->e));
	}
	c->e[c->n] = (struct entry){dws_xstrdup(key), bytes, ++c->clock, *checked};
	dws_strmap_put(&c->index, c->e[c->n].key, c->n);
	c->n++;
	c->total += bytes;
}

/* ---- memory: pooled block buffers and the hot set (under lock) ---- */

static unsigned char *buf_get_locked(dws_cache *c)
{
	if (c->npool)
		return c->pool[--c->npool];
	/* on huge pages where the kernel gives them (THP "madvise"): the
	 * fetch's copy in, and the kernel pinning the pages of every reply
	 * that points here, walk fewer page tables (about 10% less CPU for a
	 * cold read) */
	void *p = NULL;
	size_t sz = (size_t)c->o.block_size + ALIGN, huge = 2u << 20;
	bool thp = c->o.block_size >= huge;
	if (posix_memalign(&p, thp ? huge : ALIGN, sz) != 0) {
		dws_log("out of memory for a %u byte block buffer", c->o.block_size);
		abort();
	}
	if (thp)
		madvise(p, sz & ~(huge - 1), MADV_HUGEPAGE);
	return p;
}

static void buf_put_locked(dws_cache *c, unsigned char *b)
{
	if (c->npool < c->pool_cap)
		c->pool[c->npool++] = b;
	else
		free(b);
}

static struct hot *hot_find_locked(dws_cache *c, const char *key)
{
	for (struct hot *h = c->hot; h; h = h->next)
		if (!strcmp(h->key, key))
			return h;
	return NULL;
}

/* A block read ahead that no reader has come to in this many clock ticks
 * (a tick per block touched: a scan ticks about once per FUSE read) was read
 * ahead for a reader that went elsewhere. */
static bool hot_stale(const dws_cache *c, const struct hot *h)
{
	return !h->used && c->clock - h->last_use > 16ull * c->hot_cap;
}

/* Room for one more: the least recently used blocks nobody is using go,
 * those a reader has had bytes of (or stale) first. A block read ahead and
 * not yet read stays: under plain LRU the block the reader just finished
 * (touched last) outlived the ones fetched for it ahead of it, which then
 * went to disk and came back with a read. Blocks held for the disk writers
 * are on top of `keep`. (With every block in use the set grows past its cap
 * for a moment.) */
static void hot_trim_locked(dws_cache *c, unsigned keep)
{
	keep += c->wq_len + c->nwriting;
	while (c->nhot > keep) {
		struct hot **victim = NULL;
		for (struct hot **pp = &c->hot; *pp; pp = &(*pp)->next) {
			struct hot *h = *pp, *v = victim ? *victim : NULL;
			bool hu = h->used || hot_stale(c, h), vu = v && (v->used || hot_stale(c, v));
			if (!h->refs && (!v || (hu && !vu) || (hu == vu && h->last_use < v->last_use)))
				victim = pp;
		}
		if (!victim)
			return;
		struct hot *h = *victim;
		*victim = h->next;
		buf_put_locked(c, h->buf);
		free(h);
		c->nhot--;
	}
}

/* Under lock: blocks read ahead and not read yet, being fetched, or queued
 * to be: what the readahead already has in hand. */
static unsigned ahead_locked(dws_cache *c)
{
	unsigned n = (unsigned)c->qlen;
	for (struct flight *f = c->flights; f; f = f->next)
		n++;
	for (struct hot *h = c->hot; h; h = h->next)
		n += !h->used && !hot_stale(c, h);
	return n;
}

static struct hot *hot_add_locked(dws_cache *c, const char *key, unsigned char *buf, uint64_t len)
{
	hot_trim_locked(c, c->hot_cap ? c->hot_cap - 1 : 0);
	struct hot *h = dws_xcalloc(1, sizeof(*h));
	snprintf(h->key, sizeof(h->key), "%s", key);
	h->buf = buf;
	h->len = len;
	h->last_use = ++c->clock;
	h->next = c->hot;
	c->hot = h;
	c->nhot++;
	return h;
}

/* ---- blocks ---- */

static struct flight *flight_find(dws_cache *c, const char *key)
{
	for (struct flight *f = c->flights; f; f = f->next)
		if (!strcmp(f->key, key))
			return f;
	return NULL;
}

static void flight_remove(dws_cache *c, struct flight *f)
{
	for (struct flight **pp = &c->flights; *pp; pp = &(*pp)->next)
		if (*pp == f) {
			*pp = f->next;
			break;
		}
}

/* Under lock: this thread gets the block; others wait for it. */
static struct flight *flight_start_locked(dws_cache *c, const char *key)
{
	struct flight *f = dws_xcalloc(1, sizeof(*f));
	f->key = dws_xstrdup(key);
	f->next = c->flights;
	c->flights = f;
	return f;
}

/* Under lock, which it releases: the flight is over with rc; its waiters
 * wake (the last one frees it). */
static void flight_end_unlock(dws_cache *c, struct flight *f, int rc)
{
	flight_remove(c, f);
	f->done = true;
	f->rc = rc;
	bool free_now = f->waiters == 0;
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	if (free_now) {
		free(f->key);
		free(f);
	}
}

static bool time_left(int64_t deadline) { return mono_ms() < deadline; }

static uint64_t block_len(const dws_blob *b, dws_cache *c, uint64_t blk)
{
	uint64_t off = blk * c->o.block_size;
	uint64_t n = dws_blob_size(b) - off;
	return n < c->o.block_size ? n : c->o.block_size;
}

static void store_block(dws_cache *c, struct hot *h);

/* A reader's pin on a hot block (dws_pin). */
static void hot_unpin(void *cv, void *hv)
{
	dws_cache *c = cv;
	struct hot *h = hv;
	pthread_mutex_lock(&c->lock);
	h->refs--;
	hot_trim_locked(c, c->hot_cap);
	pthread_mutex_unlock(&c->lock);
}

/* Under lock: the reader's bytes of hot block h, [off, off+len): into buf,
 * or, when ref is given, pointed to with h pinned (a reference the caller
 * holds already, h->refs counted, is handed over to the pin). Returns with
 * the lock released and the caller's reference dropped unless pinned. */
static void hot_give_unlock(dws_cache *c, struct hot *h, uint64_t off, void *buf, size_t len,
			    const void **ref, dws_pin *pin)
{
	h->used = true;
	if (ref) {
		*ref = h->buf + off;
		*pin = (dws_pin){hot_unpin, c, h};
		pthread_mutex_unlock(&c->lock);
		return;
	}
	pthread_mutex_unlock(&c->lock);
	memcpy(buf, h->buf + off, len);
	hot_unpin(c, h);
}

/* Bytes [off, off+len) of block blk of blob b into buf (buf may be NULL for a
 * prefetch), or, with ref, pointed to in the hot set when the block is (or
 * is made) hot, *pin keeping it there; ref is left alone when the bytes were
 * copied into buf instead. */
static int get_block(dws_blob *b, uint64_t blk, uint64_t off, void *buf, size_t len,
		     bool prefetch, bool whole, const void **ref, dws_pin *pin, dws_error *err)
{
	struct remote *r = dws_blob_priv(b);
	dws_cache *c = r->c;
	char key[64];
	snprintf(key, sizeof(key), "%s-%llu", r->ident_hash, (unsigned long long)blk);
	uint64_t blen = block_len(b, c, blk);
	int64_t deadline = mono_ms() + c->o.wait_ms;
	for (;;) {
		pthread_mutex_lock(&c->lock);
		size_t i;
		struct hot *h = hot_find_locked(c, key);
		if (h) {
			/* a prefetch finding the block here is no use of it: a job
			 * the reader overtook (it fetched the block itself) touching
			 * it would make a block the reader is done with look newer
			 * than the one it is in, and the next readahead to arrive
			 * would push out that one, not yet kept, for a fetch again */
			if (prefetch) {
				pthread_mutex_unlock(&c->lock);
				return DWS_OK;
			}
			h->last_use = ++c->clock;
			c->hits++;
			h->refs++;
			hot_give_unlock(c, h, off, buf, len, ref, pin);
			return DWS_OK;
		}
		if (dws_strmap_get(&c->index, key, &i) && !flight_find(c, key)) {
			c->e[i].last_use = ++c->clock;
			dws_block_stamp checked = c->e[i].checked;
			if (!prefetch)
				c->hits++;
			if (prefetch || whole) {
				/* a scan: the whole block into the hot set with one
				 * read, for this read and the ones that follow */
				struct flight *lf = flight_start_locked(c, key);
				unsigned char *data = buf_get_locked(c);
				pthread_mutex_unlock(&c->lock);
				bool ok = dws_block_load(c->store, key, blen, data, &checked);
				pthread_mutex_lock(&c->lock);
				struct hot *lh = NULL;
				if (ok) {
					lh = hot_add_locked(c, key, data, blen);
					lh->refs++;
					if (dws_strmap_get(&c->index, key, &i))
						c->e[i].checked = checked;
				} else {
					buf_put_locked(c, data);
					if (dws_strmap_get(&c->index, key, &i))
						drop_locked(c, i);
				}
				flight_end_unlock(c, lf, ok ? DWS_OK : DWS_ENOENT); /* waiters look again */
				if (!ok) {
					dws_log("cache: block %s of %s was bad on disk; fetching it again", key, dws_blob_name(b));
					continue;
				}
				pthread_mutex_lock(&c->lock);
				if (buf || ref) {
					hot_give_unlock(c, lh, off, buf, len, ref, pin);
					return DWS_OK;
				}
				lh->refs--;
				hot_trim_locked(c, c->hot_cap);
				pthread_mutex_unlock(&c->lock);
				return DWS_OK;
			}
			pthread_mutex_unlock(&c->lock);
			if (dws_block_read(c->store, key, blen, off, buf, len, &checked) == DWS_OK) {
				pthread_mutex_lock(&c->lock);
				if (dws_strmap_get(&c->index, key, &i))
					c->e[i].checked = checked;
				pthread_mutex_unlock(&c->lock);
				return DWS_OK;
			}
			/* gone or corrupt on disk: forget it and fetch again */
			pthread_mutex_lock(&c->lock);
			if (dws_strmap_get(&c->index, key, &i))
				drop_locked(c, i);
			pthread_mutex_unlock(&c->lock);
			dws_log("cache: block %s of %s was bad on disk; fetching it again", key, dws_blob_name(b));
			continue;
		}
		struct flight *f = flight_find(c, key);
		if (f) {
			if (prefetch) {
				pthread_mutex_unlock(&c->lock);
				return DWS_OK;
			}
			f->waiters++;
			int64_t t_wait = mono_ms();
			while (!f->done) {
				struct timespec ts;
				clock_gettime(CLOCK_MONOTONIC, &ts);
				int64_t left = deadline - mono_ms();
				if (left <= 0)
					break;
				ts.tv_sec += left / 1000;
				ts.tv_nsec += (left % 1000) * 1000000;
				if (ts.tv_nsec >= 1000000000) {
					ts.tv_sec++;
					ts.tv_nsec -= 1000000000;
				}
				pthread_cond_timedwait(&c->cond, &c->lock, &ts);
			}
			bool done = f->done;
			int frc = f->rc;
			c->waits++;
			c->wait_ms += (uint64_t)(mono_ms() - t_wait);
			if (--f->waiters == 0 && f->done) {
				free(f->key);
				free(f);
			}
			pthread_mutex_unlock(&c->lock);
			if (!done)
				return dws_fail(err, DWS_ETIMEDOUT, "%s: block %llu (bytes %llu+%llu) did not arrive within %u ms", dws_blob_name(b),
						(unsigned long long)blk, (unsigned long long)(blk * c->o.block_size),
						(unsigned long long)blen, c->o.wait_ms);
			if (frc == DWS_ENOENT && time_left(deadline))
				continue; /* a bad block on disk, or a 404: look again */
			if (frc && frc != DWS_OK)
				return dws_fail(err, frc, "%s: block %llu could not be fetched (see the log)", dws_blob_name(b), (unsigned long long)blk);
			continue; /* now in the index */
		}
		/* a prefetch the reader has overtaken (it read the block itself,
		 * and the block may have left memory since) is dropped; checked
		 * here, under the lock a reader takes to fetch, so a prefetching
		 * thread held up between its job and this point fetches nothing
		 * twice. (Lock order: c->lock, then r->lock; nothing takes
		 * c->lock holding r->lock.) */
		if (prefetch) {
			pthread_mutex_lock(&r->lock);
			bool passed = r->run_start <= blk * c->o.block_size && (blk + 1) * c->o.block_size <= r->last_end;
			pthread_mutex_unlock(&r->lock);
			if (passed) {
				pthread_mutex_unlock(&c->lock);
				return DWS_OK;
			}
		}
		/* this thread fetches */
		f = flight_start_locked(c, key);
		if (!prefetch)
			c->misses++;
		pthread_mutex_unlock(&c->lock);

		pthread_mutex_lock(&c->lock);
		unsigned char *data = buf_get_locked(c);
		pthread_mutex_unlock(&c->lock);
		dws_error ferr = {0};
		int rc = r->fetch(r->ctx, blk * c->o.block_size, (size_t)blen, data, &ferr);
		if (rc)
			dws_log("%s", ferr.msg);
		pthread_mutex_lock(&c->lock);
		h = NULL;
		if (!rc) {
			/* in memory for the waiters now; on disk in a moment */
			h = hot_add_locked(c, key, data, blen);
			h->refs++;
			c->fetched += blen;
			if (ref) {
				h->refs++;
				h->used = true;
				*ref = data + off;
				*pin = (dws_pin){hot_unpin, c, h};
			} else if (buf) {
				h->used = true;
				memcpy(buf, data + off, len);
			}
		} else {
			buf_put_locked(c, data);
		}
		flight_end_unlock(c, f, rc);
		if (!rc)
			store_block(c, h);
		if (rc && !prefetch) {
			if (err && !err->code)
				*err = ferr;
			return rc;
		}
		return rc;
	}
}

/* ---- writing blocks to disk ---- */

/* Write hot block h (held by the caller's reference, which this drops, and
 * counted in nwriting) to disk and index it. Room is made for it, and its
 * bytes counted against the cap, before it is written: made when it was
 * fetched and counted once it was written, the blocks fetched meanwhile
 * each made room for themselves alone, and the disk went past the cap. */
static void write_hot(dws_cache *c, struct hot *h)
{
	if (c->o.write_delay_ms)
		nanosleep(&(struct timespec){c->o.write_delay_ms / 1000, (long)(c->o.write_delay_ms % 1000) * 1000000}, NULL);
	uint64_t need = dws_block_disk_size(h->len);
	size_t i;
	pthread_mutex_lock(&c->lock);
	bool on_disk = dws_strmap_get(&c->index, h->key, &i), room = !on_disk && evict_locked(c, need);
	if (room) {
		c->reserved += need;
	} else if (!on_disk) { /* no room under the cap or above the floor */
		c->unkept++;
		c->unkept_bytes += h->len;
	}
	pthread_mutex_unlock(&c->lock);
	int wrc = DWS_EIO;
	dws_block_stamp written = {0};
	if (room) {
		dws_error werr = {0};
		wrc = dws_block_write(c->store, h->key, h->buf, (size_t)h->len, &written, &werr);
		if (wrc)
			dws_log("%s (the block is served from memory, not kept)", werr.msg);
	}
	pthread_mutex_lock(&c->lock);
	if (room) {
		c->reserved -= need;
		if (!wrc)
			insert_locked(c, h->key, need, &written);
	}
	c->nwriting--;
	h->refs--;
	hot_trim_locked(c, c->hot_cap);
	pthread_mutex_unlock(&c->lock);
}

/* A block just fetched (the caller's reference on it, which this drops)
 * goes to disk on a writer thread, so the fetching thread goes on to its
 * next fetch at once (the disk write and its XXH3 took about a third of a
 * fetching thread's time). The disk never holds a read back: with
 * write_backlog blocks already waiting for it, it is slower than the
 * network, and the block is served from memory and not kept (counted in
 * unkept; a remount fetches it again, at the network's speed, the faster
 * one). Once the cache is stopping, or without a writer thread, the
 * fetching thread writes it itself. */
static void store_block(dws_cache *c, struct hot *h)
{
	pthread_mutex_lock(&c->lock);
	if (c->o.memory_only || (c->nwriters && !c->stop && c->wq_len >= c->o.write_backlog)) {
		if (!c->o.memory_only) {
			c->unkept++;
			c->unkept_bytes += h->len;
		}
		h->refs--;
		hot_trim_locked(c, c->hot_cap);
		pthread_mutex_unlock(&c->lock);
		return;
	}
	if (c->nwriters && !c->stop) {
		c->wq[(c->wq_head + c->wq_len) % WRITES_MAX] = h;
		c->wq_len++;
		pthread_cond_signal(&c->writes);
		pthread_mutex_unlock(&c->lock);
		return;
	}
	c->nwriting++;
	pthread_mutex_unlock(&c->lock);
	write_hot(c, h);
}

static void *writer_main(void *arg)
{
	dws_cache *c = arg;
	pthread_mutex_lock(&c->lock);
	for (;;) {
		while (!c->stop && !c->wq_len)
			pthread_cond_wait(&c->writes, &c->lock);
		if (!c->wq_len)
			break; /* stopping, and every queued block written */
		struct hot *h = c->wq[c->wq_head];
		c->wq_head = (c->wq_head + 1) % WRITES_MAX;
		c->wq_len--;
		c->nwriting++;
		pthread_mutex_unlock(&c->lock);
		write_hot(c, h);
		pthread_mutex_lock(&c->lock);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* ---- prefetch ---- */

static void *prefetch_main(void *arg)
{
	dws_cache *c = arg;
	pthread_mutex_lock(&c->lock);
	for (;;) {
		while (!c->stop && !c->qlen)
			pthread_cond_wait(&c->jobs, &c->lock);
		if (c->stop)
			break;
		struct job j = c->queue[c->qhead];
		c->qhead = (c->qhead + 1) % QUEUE_MAX;
		c->qlen--;
		pthread_mutex_unlock(&c->lock);
		dws_error err = {0};
		get_block(j.blob, j.block, 0, NULL, 0, true, true, NULL, NULL, &err);
		dws_blob_unref(j.blob);
		pthread_mutex_lock(&c->lock);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

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
	for (unsigned k = 0; k < n && added < room && first + k < nblk && c->qlen < QUEUE_MAX; k++) {
		char key[64];
		size_t i;
		snprintf(key, sizeof(key), "%s-%llu", r->ident_hash, (unsigned long long)(first + k));
		(void)i; /* blocks on disk are loaded into memory ahead too */
		if (flight_find(c, key) || hot_find_locked(c, key))
			continue;
		bool queued = false;
		for (size_t q = 0; q < c->qlen; q++) {
			struct job *j = &c->queue[(c->qhead + q) % QUEUE_MAX];
			if (j->blob == b && j->block == first + k)
				queued = true;
		}
		if (queued)
			continue;
		c->queue[(c->qhead + c->qlen) % QUEUE_MAX] = (struct job){dws_blob_ref(b), first + k};
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

/* ---- the blob ---- */

static bool block_cached(dws_cache *c, const struct remote *r, uint64_t blk)
{
	char key[64];
	size_t i;
	snprintf(key, sizeof(key), "%s-%llu", r->ident_hash, (unsigned long long)blk);
	pthread_mutex_lock(&c->lock);
	bool hit = dws_strmap_get(&c->index, key, &i) || hot_find_locked(c, key);
	pthread_mutex_unlock(&c->lock);
	return hit;
}

/* [off, off+len) block by block into buf; whole: load blocks on disk whole
 * into the hot set (a scan). */
static int read_blocks(dws_blob *b, uint64_t off, size_t len, void *buf, bool whole, dws_error *err)
{
	struct remote *r = dws_blob_priv(b);
	uint64_t bs = r->c->o.block_size;
	char *dst = buf;
	for (uint64_t blk = off / bs; blk <= (off + len - 1) / bs; blk++) {
		uint64_t bo = blk * bs;
		uint64_t s = off > bo ? off - bo : 0;
		uint64_t e = off + len < bo + bs ? off + len - bo : bs;
		int rc = get_block(b, blk, s, dst, (size_t)(e - s), false, whole, NULL, NULL, err);
		if (rc)
			return rc;
		dst += e - s;
	}
	return DWS_OK;
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
	uint64_t ra_limit = h->ra_limit;

	if (h->mode == DWS_READ_DIRECT && first == last && !block_cached(c, r, first)) {
		int rc = r->fetch(r->ctx, off, len, buf, err);
		if (!rc) {
			pthread_mutex_lock(&c->lock);
			c->fetched += len;
			pthread_mutex_unlock(&c->lock);
		}
		return rc;
	}

	if (h->mode == DWS_READ_QUIET)
		return read_blocks(b, off, len, buf, false, err);

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
	} else if (ra_limit != r->last_limit) {
		r->tensor_start = off;
		if (r->crossed < 2)
			r->crossed++;
	}
	uint64_t scan_len = 4 * bs > (32u << 20) ? 4 * bs : (32u << 20);
	bool scan = r->crossed >= 2 && off + len - r->run_start >= scan_len;
	if (ra_limit != r->last_limit && !scan)
		seq = false; /* a new tensor, not yet a scan: a new window */
	r->last_limit = ra_limit;
	if (seq)
		r->window = r->window ? (r->window * 2 > c->o.max_window ? c->o.max_window : r->window * 2) : 1;
	else
		r->window = 0;
	r->last_end = seq && r->last_end > off + len ? r->last_end : off + len;
	unsigned window = r->window;
	pthread_mutex_unlock(&r->lock);

	/* the blocks this read needs beyond the first go to the prefetchers so
	 * several transfers run at once, as many as the hot set has room for
	 * (more would push each other out before this read got to them) */
	if (last > first)
		prefetch(b, first + 1, last - first < c->hot_cap - 1 ? (unsigned)(last - first) : c->hot_cap - 1);
	if (window && ra_limit != UINT64_MAX && !scan) {
		uint64_t lim_blk = ra_limit ? (ra_limit - 1) / bs : 0; /* last block worth having */
		window = lim_blk > last ? (unsigned)(lim_blk - last < window ? lim_blk - last : window) : 0;
		/* and no more ahead than this tensor has been read, less a block:
		 * the kernel's own readahead running past a tensor's end does not
		 * pull in the next one */
		uint64_t read_blocks = (off + len - r->tensor_start) / bs;
		uint64_t cap = read_blocks ? read_blocks - 1 : 0;
		if (window > cap)
			window = (unsigned)cap;
	}
	if (window)
		prefetch(b, last + 1, window);

	/* one block's bytes in a scan: pointed to in the hot set, not copied */
	if (ref && first == last && (window > 0 || scan))
		return get_block(b, first, off - first * bs, buf, len, false, true, ref, pin, err);
	return read_blocks(b, off, len, buf, window > 0 || scan, err);
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
	dws_blob *b = dws_blob_new(&remote_ops, name, size, r);
	return b;
}

/* ---- life cycle ---- */

static char *default_dir(void)
{
	const char *d = getenv("DWSFS_CACHE_DIR");
	if (d && *d)
		return dws_xstrdup(d);
	d = getenv("XDG_CACHE_HOME");
	if (d && *d)
		return dws_xasprintf("%s/dwsfs", d);
	d = getenv("HOME");
	return dws_xasprintf("%s/.cache/dwsfs", d && *d ? d : "/var/cache");
}

/* A block a previous mount left (dws_blockstore_scan), under lock. */
static void found_block(void *cv, const char *key, uint64_t bytes, uint64_t atime)
{
	dws_cache *c = cv;
	insert_locked(c, key, bytes, &(dws_block_stamp){0}); /* checked when first read */
	c->e[c->n - 1].last_use = atime; /* oldest first in LRU order */
}

/* The blocks a previous mount left, indexed. */
static int scan(dws_cache *c, dws_error *err)
{
	int rc = dws_blockstore_scan(c->store, found_block, c, err);
	uint64_t maxuse = 0;
	for (size_t i = 0; i < c->n; i++)
		if (c->e[i].last_use > maxuse)
			maxuse = c->e[i].last_use;
	c->clock = maxuse;
	evict_locked(c, 0);
	return rc;
}

int dws_cache_open(const dws_cache_opts *o, dws_cache **out, dws_error *err)
{
	dws_cache *c = dws_xcalloc(1, sizeof(*c));
	c->o = *o;
	if (!c->o.cap)
		c->o.cap = 16ULL << 30;
	if (!c->o.free_floor)
		c->o.free_floor = 1ULL << 30;
	if (!c->o.block_size)
		c->o.block_size = 8u << 20;
	if (!c->o.prefetch_threads)
		c->o.prefetch_threads = 4;
	if (!c->o.max_window)
		c->o.max_window = 8;
	if (!c->o.wait_ms)
		c->o.wait_ms = 60000;
	if (!c->o.write_backlog)
		c->o.write_backlog = 4;
	if (c->o.write_backlog > WRITES_MAX)
		c->o.write_backlog = WRITES_MAX;
	/* the readahead window and the blocks being read fit in memory: the
	 * kernel has two reads of up to 1 MiB (FUSE's largest) out at once on a
	 * scan, often out of order, and they straddle block ends. Counted as 2
	 * blocks when blocks were smaller than that, the blocks a later read
	 * had fetched pushed out the one an earlier read had yet to finish. */
	uint64_t span = ((2u << 20) + c->o.block_size - 1) / c->o.block_size + 1;
	c->reading = span > 64 ? 64 : (unsigned)span; /* 2 at least */
	c->hot_cap = c->o.max_window + c->reading;
	/* free buffers kept for reuse: those of the hot set, of the blocks
	 * waiting for the disk writers (on top of it) and of the fetchers */
	c->pool_cap = c->hot_cap + c->o.write_backlog + c->o.prefetch_threads + 2;
	c->pool = dws_xcalloc(c->pool_cap, sizeof(*c->pool));
	c->dir = o->dir ? dws_xstrdup(o->dir) : default_dir();
	int rc = c->o.memory_only ? DWS_OK : dws_blockstore_open(c->dir, &c->store, err);
	if (rc) {
		free(c->dir);
		free(c->pool);
		free(c);
		return rc;
	}
	dws_strmap_init(&c->index);
	pthread_mutex_init(&c->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cond, &ca);
	pthread_cond_init(&c->jobs, &ca);
	pthread_cond_init(&c->writes, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_lock(&c->lock);
	if (c->store)
		rc = scan(c, err);
	pthread_mutex_unlock(&c->lock);
	if (rc) {
		dws_cache_close(c);
		return rc;
	}
	c->threads = dws_xcalloc(c->o.prefetch_threads, sizeof(pthread_t));
	for (unsigned i = 0; i < c->o.prefetch_threads; i++)
		if (pthread_create(&c->threads[i], NULL, prefetch_main, c) == 0)
			c->nthreads++;
	for (unsigned i = 0; i < (c->o.memory_only ? 0 : WRITERS); i++)
		if (pthread_create(&c->writer[c->nwriters], NULL, writer_main, c) == 0)
			c->nwriters++;
	*out = c;
	return DWS_OK;
}

void dws_cache_stats(dws_cache *c, dws_cache_counts *out)
{
	pthread_mutex_lock(&c->lock);
	*out = (dws_cache_counts){
		.hits = c->hits,
		.misses = c->misses,
		.bytes = c->total,
		.blocks = c->n,
		.unkept_blocks = c->unkept,
		.unkept_bytes = c->unkept_bytes,
		.waits = c->waits,
		.wait_ms = c->wait_ms,
	};
	pthread_mutex_unlock(&c->lock);
}

static pthread_mutex_t shared_lock = PTHREAD_MUTEX_INITIALIZER;
static struct shared_cache {
	char *dir;
	dws_cache *c;
	int refs;
} shared[8];

int dws_cache_acquire(const dws_bucket_opts *bo, dws_cache **out, dws_error *err)
{
	const char *dir = bo && bo->cache_dir ? bo->cache_dir : "";
	bool mem = bo && bo->memory_cache;
	pthread_mutex_lock(&shared_lock);
	for (size_t i = 0; i < DWS_ARRAY_LEN(shared); i++)
		if (shared[i].c && !strcmp(shared[i].dir, dir) && shared[i].c->o.memory_only == mem) {
			shared[i].refs++;
			*out = shared[i].c;
			pthread_mutex_unlock(&shared_lock);
			return DWS_OK;
		}
	dws_cache_opts co = {.dir = *dir ? dir : NULL};
	if (bo) {
		co.cap = bo->cache_size;
		co.memory_only = bo->memory_cache;
		co.block_size = bo->block_size;
		co.wait_ms = bo->read_deadline_ms;
	}
	int rc = dws_cache_open(&co, out, err);
	bool kept = false;
	for (size_t i = 0; !rc && i < DWS_ARRAY_LEN(shared) && !kept; i++)
		if (!shared[i].c) {
			shared[i] = (struct shared_cache){dws_xstrdup(dir), *out, 1};
			kept = true;
		}
	pthread_mutex_unlock(&shared_lock);
	if (!rc && !kept) {
		dws_cache_close(*out);
		return dws_fail(err, DWS_EINVAL, "more than %zu cache folders in one process", DWS_ARRAY_LEN(shared));
	}
	return rc;
}

void dws_cache_release(dws_cache *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&shared_lock);
	for (size_t i = 0; i < DWS_ARRAY_LEN(shared); i++)
		if (shared[i].c == c && --shared[i].refs == 0) {
			dws_cache_close(c);
			free(shared[i].dir);
			shared[i].c = NULL;
		}
	pthread_mutex_unlock(&shared_lock);
}

void dws_cache_close(dws_cache *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->lock);
	c->stop = true;
	pthread_cond_broadcast(&c->cond);
	pthread_cond_broadcast(&c->jobs);
	pthread_cond_broadcast(&c->writes);
	pthread_mutex_unlock(&c->lock);
	for (unsigned i = 0; i < c->nthreads; i++)
		pthread_join(c->threads[i], NULL);
	for (unsigned i = 0; i < c->nwriters; i++)
		pthread_join(c->writer[i], NULL); /* after the fetchers: they drain their last blocks */
	for (size_t q = 0; q < c->qlen; q++)
		dws_blob_unref(c->queue[(c->qhead + q) % QUEUE_MAX].blob);
	for (size_t i = 0; i < c->n; i++)
		free(c->e[i].key);
	free(c->e);
	dws_strmap_free(&c->index);
	free(c->threads);
	while (c->hot) {
		struct hot *h = c->hot;
		c->hot = h->next;
		free(h->buf);
		free(h);
	}
	for (unsigned i = 0; i < c->npool; i++)
		free(c->pool[i]);
	free(c->pool);
	dws_blockstore_close(c->store);
	free(c->dir);
	pthread_mutex_destroy(&c->lock);
	pthread_cond_destroy(&c->cond);
	pthread_cond_destroy(&c->jobs);
	pthread_cond_destroy(&c->writes);
	free(c);
}
