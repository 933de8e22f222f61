/* Inode numbers (see inodes.h): step ids to small indexes, an open
 * addressing table under a lock, grown by doubling. */
#include "inodes.h"

#include <pthread.h>
#include <stdlib.h>

#define VIEW_ROOT (1ULL << 63)
#define NODE_BITS 24
#define NODE_MASK ((1ULL << NODE_BITS) - 1)
#define INDEX_MAX ((1ULL << 37) - 1) /* bits 61 and 62 stay clear */
#define PATCH_INO (1ULL << 61)

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

static struct {
	pthread_mutex_t lock;
	uint64_t (*pairs)[2];
	size_t n, cap;
} P = {.lock = PTHREAD_MUTEX_INITIALIZER};

fuse_ino_t ino_patch(uint64_t from, uint64_t to)
{
	pthread_mutex_lock(&P.lock);
	size_t i = 0;
	while (i < P.n && (P.pairs[i][0] != from || P.pairs[i][1] != to))
		i++;
	if (i == P.n) {
		if (P.n == P.cap) {
			P.cap = P.cap ? 2 * P.cap : 64;
			P.pairs = realloc(P.pairs, P.cap * sizeof(*P.pairs));
			if (!P.pairs)
				abort();
		}
		P.pairs[P.n][0] = from;
		P.pairs[P.n++][1] = to;
	}
	pthread_mutex_unlock(&P.lock);
	return PATCH_INO | (i + 1);
}

bool ino_patch_steps(fuse_ino_t ino, uint64_t *from, uint64_t *to)
{
	if ((ino & ~(PATCH_INO - 1)) != PATCH_INO)
		return false;
	uint64_t i = (ino & (PATCH_INO - 1)) - 1;
	pthread_mutex_lock(&P.lock);
	bool ok = i < P.n;
	if (ok) {
		*from = P.pairs[i][0];
		*to = P.pairs[i][1];
	}
	pthread_mutex_unlock(&P.lock);
	return ok;
}

fuse_ino_t ino_make(bool root_view, uint64_t id, uint32_t node)
{
	return (root_view ? VIEW_ROOT : 0) | ((index_of(id) & INDEX_MAX) << NODE_BITS) | (node & NODE_MASK);
}

bool ino_is_step(fuse_ino_t ino) { return (ino & ~VIEW_ROOT) > NODE_MASK && !(ino & PATCH_INO); }
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
	pthread_mutex_lock(&P.lock);
	free(P.pairs);
	P.pairs = NULL;
	P.n = P.cap = 0;
	pthread_mutex_unlock(&P.lock);
}
