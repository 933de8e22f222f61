/* The block cache: remote objects are read in aligned blocks kept as files
 * under cache_dir/blocks, keyed by (content identity, block number), so a
 * rewritten object is never served from a stale block.
 *
 * - A fetched block goes into a small in-memory hot set first (hotset.c):
 *   the readers waiting for it are served from there at once, and a writer
 *   thread then writes it to disk with O_DIRECT (no page cache filled, no
 *   copy) off the read path.
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
 * - Readahead per blob and the prefetching threads: readahead.c.
 * - memory_only: no disk at all, the hot set is the cache (a node whose disk
 *   is small or slower than its network).
 *
 * This file: the index of blocks on disk, getting a block (dws_block_get),
 * the disk writers, and the cache's life. */
#include "cache_int.h"

#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

/* ---- blocks ---- */

struct flight *dws_flight_find_locked(dws_cache *c, const char *key)
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

/* Under lock: a wait for a flight to end, until the deadline; false once
 * it has passed. */
static bool wait_until_locked(dws_cache *c, int64_t deadline)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	int64_t left = deadline - mono_ms();
	if (left <= 0)
		return false;
	ts.tv_sec += left / 1000;
	ts.tv_nsec += (left % 1000) * 1000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	pthread_cond_timedwait(&c->cond, &c->lock, &ts);
	return true;
}

static uint64_t block_len(const dws_blob *b, dws_cache *c, uint64_t blk)
{
	uint64_t off = blk * c->o.block_size;
	uint64_t n = dws_blob_size(b) - off;
	return n < c->o.block_size ? n : c->o.block_size;
}

static void store_block(dws_cache *c, struct hot *h);

/* A dws_block_get under way. It looks for the block in memory, on disk,
 * in flight, and fetches it where it is nowhere; each step below either
 * ends the call (a code, the lock released) or says why not. */
struct get {
	dws_blob *b;
	struct remote *r;
	dws_cache *c;
	const dws_block_req *q;
	char key[64];
	uint64_t blen;       /* the block's length */
	int64_t deadline;    /* a reader waits for a block in flight until then */
	dws_error *err;
};

enum {
	NOT_HERE = 1, /* not this step's: the lock still held */
	AGAIN = 2,    /* the lock released: look again (a flight ended, or a
			 block on disk was bad and is forgotten) */
};

/* Under lock: the block in memory. */
static int from_hot_locked(struct get *g)
{
	dws_cache *c = g->c;
	struct hot *h = dws_hot_find_locked(c, g->key);
	if (!h)
		return NOT_HERE;
	/* a prefetch finding the block here is no use of it: a job the reader
	 * overtook (it fetched the block itself) touching it would make a block
	 * the reader is done with look newer than the one it is in, and the
	 * next readahead to arrive would push out that one, not yet kept, for
	 * a fetch again */
	if (g->q->use == DWS_BLOCK_PREFETCH) {
		pthread_mutex_unlock(&c->lock);
		return DWS_OK;
	}
	h->last_use = ++c->clock;
	c->hits++;
	h->refs++;
	dws_hot_give_unlock(c, h, g->q->off, g->q->buf, g->q->len, g->q->ref, g->q->pin);
	return DWS_OK;
}

/* Under lock, which it releases: the block from disk whole into the hot
 * set with one read (a scan: for this read and the ones that follow), the
 * reader's bytes from there. */
static int load_whole_unlock(struct get *g, dws_block_stamp checked)
{
	dws_cache *c = g->c;
	const dws_block_req *q = g->q;
	size_t i;
	struct flight *f = flight_start_locked(c, g->key);
	unsigned char *data = dws_buf_get_locked(c);
	pthread_mutex_unlock(&c->lock);
	bool ok = dws_block_load(c->store, g->key, g->blen, data, &checked);
	pthread_mutex_lock(&c->lock);
	struct hot *h = NULL;
	if (ok) {
		h = dws_hot_add_locked(c, g->key, data, g->blen);
		h->refs++;
		if (dws_strmap_get(&c->index, g->key, &i))
			c->e[i].checked = checked;
	} else {
		dws_buf_put_locked(c, data);
		if (dws_strmap_get(&c->index, g->key, &i))
			drop_locked(c, i);
	}
	flight_end_unlock(c, f, ok ? DWS_OK : DWS_ENOENT); /* waiters look again */
	if (!ok) {
		dws_log("cache: block %s of %s was bad on disk; fetching it again", g->key, dws_blob_name(g->b));
		return AGAIN;
	}
	pthread_mutex_lock(&c->lock);
	if (q->buf || q->ref) {
		dws_hot_give_unlock(c, h, q->off, q->buf, q->len, q->ref, q->pin);
		return DWS_OK;
	}
	h->refs--;
	dws_hot_trim_locked(c, c->hot_cap);
	pthread_mutex_unlock(&c->lock);
	return DWS_OK;
}

/* Under lock, which it releases: the reader's bytes read from the block's
 * file. */
static int read_part_unlock(struct get *g, dws_block_stamp checked)
{
	dws_cache *c = g->c;
	const dws_block_req *q = g->q;
	size_t i;
	pthread_mutex_unlock(&c->lock);
	bool ok = dws_block_read(c->store, g->key, g->blen, q->off, q->buf, q->len, &checked) == DWS_OK;
	pthread_mutex_lock(&c->lock);
	if (dws_strmap_get(&c->index, g->key, &i)) {
		if (ok)
			c->e[i].checked = checked;
		else
			drop_locked(c, i); /* gone or corrupt on disk: forget it and fetch again */
	}
	pthread_mutex_unlock(&c->lock);
	if (ok)
		return DWS_OK;
	dws_log("cache: block %s of %s was bad on disk; fetching it again", g->key, dws_blob_name(g->b));
	return AGAIN;
}

/* Under lock: the block on disk, nobody loading it. */
static int from_disk_locked(struct get *g)
{
	dws_cache *c = g->c;
	size_t i;
	if (!dws_strmap_get(&c->index, g->key, &i) || dws_flight_find_locked(c, g->key))
		return NOT_HERE;
	c->e[i].last_use = ++c->clock;
	dws_block_stamp checked = c->e[i].checked;
	if (g->q->use != DWS_BLOCK_PREFETCH)
		c->hits++;
	if (g->q->use == DWS_BLOCK_PART)
		return read_part_unlock(g, checked);
	return load_whole_unlock(g, checked);
}

/* Under lock: the block being fetched (or loaded). A reader waits for it
 * up to the deadline, then looks again; a prefetch leaves it. */
static int wait_flight_locked(struct get *g)
{
	dws_cache *c = g->c;
	struct flight *f = dws_flight_find_locked(c, g->key);
	if (!f)
		return NOT_HERE;
	if (g->q->use == DWS_BLOCK_PREFETCH) {
		pthread_mutex_unlock(&c->lock);
		return DWS_OK;
	}
	f->waiters++;
	int64_t t_wait = mono_ms();
	while (!f->done && wait_until_locked(c, g->deadline))
		;
	bool done = f->done;
	int frc = f->rc;
	c->waits++;
	c->wait_ms += (uint64_t)(mono_ms() - t_wait);
	if (--f->waiters == 0 && f->done) {
		free(f->key);
		free(f);
	}
	pthread_mutex_unlock(&c->lock);
	const char *name = dws_blob_name(g->b);
	if (!done)
		return dws_fail(g->err, DWS_ETIMEDOUT, "%s: block %llu (bytes %llu+%llu) did not arrive within %u ms", name,
				(unsigned long long)g->q->blk, (unsigned long long)(g->q->blk * c->o.block_size),
				(unsigned long long)g->blen, c->o.wait_ms);
	if (frc == DWS_ENOENT && mono_ms() < g->deadline)
		return AGAIN; /* a bad block on disk, or a 404: look again */
	if (frc)
		return dws_fail(g->err, frc, "%s: block %llu could not be fetched (see the log)", name,
				(unsigned long long)g->q->blk);
	return AGAIN; /* now in the index */
}

/* Whether the reader of r has read past [start, end) already (its run
 * covers it): a prefetch of it is late. */
static bool reader_passed(struct remote *r, uint64_t start, uint64_t end)
{
	pthread_mutex_lock(&r->lock);
	bool passed = r->run_start <= start && end <= r->last_end;
	pthread_mutex_unlock(&r->lock);
	return passed;
}

/* Under lock, which it releases: the block is nowhere; this thread fetches
 * it into the hot set (the reader's bytes and the waiters served from
 * there), then to disk. */
static int fetch_unlock(struct get *g)
{
	dws_cache *c = g->c;
	const dws_block_req *q = g->q;
	bool prefetch = q->use == DWS_BLOCK_PREFETCH;
	uint64_t at = q->blk * c->o.block_size;
	/* a prefetch the reader has overtaken (it read the block itself, and
	 * the block may have left memory since) is dropped; checked here,
	 * under the lock a reader takes to fetch, so a prefetching thread held
	 * up between its job and this point fetches nothing twice */
	if (prefetch && reader_passed(g->r, at, at + c->o.block_size)) {
		pthread_mutex_unlock(&c->lock);
		return DWS_OK;
	}
	struct flight *f = flight_start_locked(c, g->key);
	if (!prefetch)
		c->misses++;
	unsigned char *data = dws_buf_get_locked(c);
	pthread_mutex_unlock(&c->lock);
	dws_error ferr = {0};
	int rc = g->r->fetch(g->r->ctx, at, (size_t)g->blen, data, &ferr);
	if (rc)
		dws_log("%s", ferr.msg);
	pthread_mutex_lock(&c->lock);
	struct hot *h = NULL;
	if (!rc) {
		/* in memory for the waiters now; on disk in a moment */
		h = dws_hot_add_locked(c, g->key, data, g->blen);
		h->refs++;
		c->fetched += g->blen;
		if (q->ref) {
			h->refs++;
			h->used = true;
			*q->ref = data + q->off;
			*q->pin = (dws_pin){dws_hot_unpin, c, h};
		} else if (q->buf) {
			h->used = true;
			memcpy(q->buf, data + q->off, q->len);
		}
	} else {
		dws_buf_put_locked(c, data);
	}
	flight_end_unlock(c, f, rc);
	if (rc) {
		if (!prefetch && g->err && !g->err->code)
			*g->err = ferr;
		return rc;
	}
	store_block(c, h);
	return DWS_OK;
}

int dws_block_get(dws_blob *b, const dws_block_req *q, dws_error *err)
{
	struct remote *r = dws_blob_priv(b);
	struct get g = {.b = b, .r = r, .c = r->c, .q = q, .err = err};
	dws_block_key(g.key, r, q->blk);
	g.blen = block_len(b, g.c, q->blk);
	g.deadline = mono_ms() + g.c->o.wait_ms;
	for (;;) {
		pthread_mutex_lock(&g.c->lock);
		int rc = from_hot_locked(&g);
		if (rc == NOT_HERE)
			rc = from_disk_locked(&g);
		if (rc == NOT_HERE)
			rc = wait_flight_locked(&g);
		if (rc == NOT_HERE)
			rc = fetch_unlock(&g);
		if (rc != AGAIN)
			return rc;
	}
}

/* A prefetching thread: the jobs readahead.c queues. */
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
		c->qhead = (c->qhead + 1) % DWS_QUEUE_MAX;
		c->qlen--;
		pthread_mutex_unlock(&c->lock);
		dws_error err = {0};
		dws_block_get(j.blob, &(dws_block_req){.blk = j.block, .use = DWS_BLOCK_PREFETCH}, &err);
		dws_blob_unref(j.blob);
		pthread_mutex_lock(&c->lock);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
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
	dws_hot_trim_locked(c, c->hot_cap);
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
		dws_hot_trim_locked(c, c->hot_cap);
		pthread_mutex_unlock(&c->lock);
		return;
	}
	if (c->nwriters && !c->stop) {
		c->wq[(c->wq_head + c->wq_len) % DWS_WRITES_MAX] = h;
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
		c->wq_head = (c->wq_head + 1) % DWS_WRITES_MAX;
		c->wq_len--;
		c->nwriting++;
		pthread_mutex_unlock(&c->lock);
		write_hot(c, h);
		pthread_mutex_lock(&c->lock);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* ---- life cycle ---- */

char *dws_cache_default_dir(void)
{
	const char *d = getenv("DWSFS_CACHE_DIR");
	if (d && *d)
		return dws_xstrdup(d);
	d = getenv("XDG_CACHE_HOME");
	if (d && *d)
		return dws_xasprintf("%s/dwsfs", d);
	d = getenv("HOME");
	if (d && *d)
		return dws_xasprintf("%s/.cache/dwsfs", d);
	/* no HOME (a system service): root's is the system's cache; another
	 * user's, under the home the password database names */
	if (geteuid() == 0)
		return dws_xstrdup("/var/cache/dwsfs");
	struct passwd *pw = getpwuid(geteuid());
	if (pw && pw->pw_dir && pw->pw_dir[0] == '/' && strcmp(pw->pw_dir, "/"))
		return dws_xasprintf("%s/.cache/dwsfs", pw->pw_dir);
	return dws_xasprintf("/var/tmp/dwsfs-%u", (unsigned)geteuid());
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
	if (c->o.write_backlog > DWS_WRITES_MAX)
		c->o.write_backlog = DWS_WRITES_MAX;
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
	c->dir = o->dir ? dws_xstrdup(o->dir) : dws_cache_default_dir();
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
	for (unsigned i = 0; i < (c->o.memory_only ? 0 : DWS_WRITERS); i++)
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
		dws_blob_unref(c->queue[(c->qhead + q) % DWS_QUEUE_MAX].blob);
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
