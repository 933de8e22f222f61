/* Inode numbers (see inodes.h): step ids to small indexes, an open
 * addressing table under a lock, grown by doubling. */
#include "inodes.h"

#include <pthread.h>
#include <stdlib.h>

#define VIEW_ROOT (1ULL << 63)
#define NODE_BITS 24
#define NODE_MASK ((1ULL << NODE_BITS) - 1)
#define INDEX_MAX ((1ULL << 39) - 1)

static struct {
	pthread_mutex_t lock;
	uint64_t *ids;      /* by index - 1 */
	size_t n, cap;
	uint32_t *slots;    /* hash of id -> index (0: empty) */
	size_t nslots;
} T = {.lock = PTHREAD_MUTEX_INITIALIZER};

static size_t slot_of(uint64_t id, size_t nslots)
{
	id ^= id >> 33;
	id *= 0xff51afd7ed558ccdULL;
	id ^= id >> 33;
	return (size_t)(id & (nslots - 1));
}

static void grow_locked(void)
{
	size_t ns = T.nslots ? T.nslots * 2 : 1024;
	uint32_t *s = calloc(ns, sizeof(*s));
	if (!s)
		abort();
	for (size_t i = 0; i < T.n; i++) {
		size_t k = slot_of(T.ids[i], ns);
		while (s[k])
			k = (k + 1) & (ns - 1);
		s[k] = (uint32_t)(i + 1);
	}
	free(T.slots);
	T.slots = s;
	T.nslots = ns;
}

/* The index of id, given one on first sight. */
static uint64_t index_of(uint64_t id)
{
	pthread_mutex_lock(&T.lock);
	if ((T.n + 1) * 2 > T.nslots)
		grow_locked();
	size_t k = slot_of(id, T.nslots);
	while (T.slots[k] && T.ids[T.slots[k] - 1] != id)
		k = (k + 1) & (T.nslots - 1);
	if (!T.slots[k]) {
		if (T.n == T.cap) {
			T.cap = T.cap ? 2 * T.cap : 256;
			T.ids = realloc(T.ids, T.cap * sizeof(*T.ids));
			if (!T.ids)
				abort();
		}
		T.ids[T.n++] = id;
		T.slots[k] = (uint32_t)T.n;
	}
	uint64_t idx = T.slots[k];
	pthread_mutex_unlock(&T.lock);
	return idx;
}

fuse_ino_t ino_make(bool root_view, uint64_t id, uint32_t node)
{
	return (root_view ? VIEW_ROOT : 0) | ((index_of(id) & INDEX_MAX) << NODE_BITS) | (node & NODE_MASK);
}

bool ino_is_step(fuse_ino_t ino) { return (ino & ~VIEW_ROOT) > NODE_MASK; }
uint32_t ino_node(fuse_ino_t ino) { return (uint32_t)(ino & NODE_MASK); }
bool ino_root_view(fuse_ino_t ino) { return (ino & VIEW_ROOT) != 0; }

bool ino_id(fuse_ino_t ino, uint64_t *id)
{
	uint64_t idx = (ino & ~VIEW_ROOT) >> NODE_BITS;
	pthread_mutex_lock(&T.lock);
	bool ok = idx >= 1 && idx <= T.n;
	if (ok)
		*id = T.ids[idx - 1];
	pthread_mutex_unlock(&T.lock);
	return ok;
}

void ino_table_free(void)
{
	pthread_mutex_lock(&T.lock);
	free(T.ids);
	free(T.slots);
	T.ids = NULL;
	T.slots = NULL;
	T.n = T.cap = T.nslots = 0;
	pthread_mutex_unlock(&T.lock);
}
