/* The block cache's blocks in memory: pooled block buffers and the hot set.
 *
 * A fetched block (or one loaded from disk for a scan) is held here, so the
 * readers waiting for it are served at once and a reply can point into it
 * (a pin keeps it); the disk writers take it from here. Buffers are pooled
 * and page aligned, so a scan does not fault fresh memory in for every
 * block. Everything here runs under c->lock but dws_hot_unpin, which takes
 * it (see cache_int.h). */
#include "cache_int.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

unsigned char *dws_buf_get_locked(dws_cache *c)
{
	if (c->npool)
		return c->pool[--c->npool];
	/* on huge pages where the kernel gives them (THP "madvise"): the
	 * fetch's copy in, and the kernel pinning the pages of every reply
	 * that points here, walk fewer page tables (about 10% less CPU for a
	 * cold read) */
	void *p = NULL;
	size_t sz = (size_t)c->o.block_size + DWS_BLOCK_ROOM, huge = 2u << 20;
	bool thp = c->o.block_size >= huge;
	if (posix_memalign(&p, thp ? huge : DWS_BLOCK_ROOM, sz) != 0) {
		dws_log("out of memory for a %u byte block buffer", c->o.block_size);
		abort();
	}
	if (thp)
		madvise(p, sz & ~(huge - 1), MADV_HUGEPAGE);
	return p;
}

void dws_buf_put_locked(dws_cache *c, unsigned char *b)
{
	if (c->npool < c->pool_cap)
		c->pool[c->npool++] = b;
	else
		free(b);
}

struct hot *dws_hot_find_locked(dws_cache *c, const char *key)
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

unsigned dws_hot_unread_locked(dws_cache *c)
{
	unsigned n = 0;
	for (struct hot *h = c->hot; h; h = h->next)
		n += !h->used && !hot_stale(c, h);
	return n;
}

/* Room for one more: the least recently used blocks nobody is using go,
 * those a reader has had bytes of (or stale) first. A block read ahead and
 * not yet read stays: under plain LRU the block the reader just finished
 * (touched last) outlived the ones fetched for it ahead of it, which then
 * went to disk and came back with a read. Blocks held for the disk writers
 * are on top of `keep`. (With every block in use the set grows past its cap
 * for a moment.) */
void dws_hot_trim_locked(dws_cache *c, unsigned keep)
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
		dws_buf_put_locked(c, h->buf);
		free(h);
		c->nhot--;
	}
}

struct hot *dws_hot_add_locked(dws_cache *c, const char *key, unsigned char *buf, uint64_t len)
{
	dws_hot_trim_locked(c, c->hot_cap ? c->hot_cap - 1 : 0);
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

void dws_hot_unpin(void *cv, void *hv)
{
	dws_cache *c = cv;
	struct hot *h = hv;
	pthread_mutex_lock(&c->lock);
	h->refs--;
	dws_hot_trim_locked(c, c->hot_cap);
	pthread_mutex_unlock(&c->lock);
}

void dws_hot_give_unlock(dws_cache *c, struct hot *h, uint64_t off, void *buf, size_t len,
			 const void **ref, dws_pin *pin)
{
	h->used = true;
	if (ref) {
		*ref = h->buf + off;
		*pin = (dws_pin){dws_hot_unpin, c, h};
		pthread_mutex_unlock(&c->lock);
		return;
	}
	pthread_mutex_unlock(&c->lock);
	memcpy(buf, h->buf + off, len);
	dws_hot_unpin(c, h);
}
