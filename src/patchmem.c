/* Patch memory under a cap (see patchmem.h): anonymous blocks while the
 * count stays under it, unlinked shared file mappings past it. */
#include "patchmem.h"
#include "internal.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

/* Each spilled block is a mapping of its own: stay well under the kernel's
 * vm.max_map_count (65530 by default); past this, blocks stay in memory. */
enum { MAX_SPILLED = 16384 };

static struct {
	atomic_uint_least64_t cap, memory, disk, failures, blocks;
	atomic_uint_least64_t build_peak; /* the largest block a build asked for */
	atomic_uint fail_next;
	atomic_bool warned, warned_tmpfs;
	pthread_mutex_t lock;
	char dir[PATH_MAX];
	/* the spilled mappings, for dws_pmem_trim (under lock) */
	struct mapping { void *p; size_t len; } *maps;
	size_t nmaps, capmaps;
	atomic_uint_least64_t read_since_trim;
} pm = {.cap = UINT64_MAX, .lock = PTHREAD_MUTEX_INITIALIZER};

static void maps_add(void *p, size_t len)
{
	pthread_mutex_lock(&pm.lock);
	if (pm.nmaps == pm.capmaps) {
		pm.capmaps = pm.capmaps ? 2 * pm.capmaps : 64;
		pm.maps = dws_xrealloc(pm.maps, pm.capmaps * sizeof(*pm.maps));
	}
	pm.maps[pm.nmaps++] = (struct mapping){p, len};
	pthread_mutex_unlock(&pm.lock);
}

static void maps_remove(void *p)
{
	pthread_mutex_lock(&pm.lock);
	for (size_t i = 0; i < pm.nmaps; i++)
		if (pm.maps[i].p == p) {
			pm.maps[i] = pm.maps[--pm.nmaps];
			break;
		}
	pthread_mutex_unlock(&pm.lock);
}

void dws_pmem_trim(uint64_t read)
{
	if (!atomic_load(&pm.disk))
		return;
	uint64_t since = atomic_fetch_add(&pm.read_since_trim, read) + read;
	if (since < DWS_PMEM_TRIM_EVERY || !atomic_compare_exchange_strong(&pm.read_since_trim, &since, 0))
		return;
	pthread_mutex_lock(&pm.lock);
	for (size_t i = 0; i < pm.nmaps; i++)
		madvise(pm.maps[i].p, pm.maps[i].len, MADV_DONTNEED);
	pthread_mutex_unlock(&pm.lock);
}

void dws_pmem_configure(uint64_t cap, const char *dir)
{
	pthread_mutex_lock(&pm.lock);
	snprintf(pm.dir, sizeof(pm.dir), "%s", dir ? dir : "");
	pthread_mutex_unlock(&pm.lock);
	atomic_store(&pm.cap, cap);
}

/* The cgroup's memory limit (v2, as a container sees its own), or 0. */
static uint64_t cgroup_limit(void)
{
	FILE *f = fopen("/sys/fs/cgroup/memory.max", "re");
	unsigned long long v = 0;
	if (f) {
		if (fscanf(f, "%llu", &v) != 1) /* "max" */
			v = 0;
		fclose(f);
	}
	return v;
}

uint64_t dws_pmem_default_cap(void)
{
	long pages = sysconf(_SC_PHYS_PAGES), pg = sysconf(_SC_PAGESIZE);
	uint64_t mem = pages > 0 && pg > 0 ? (uint64_t)pages * (uint64_t)pg : 0, cg = cgroup_limit();
	if (cg && (cg < mem || !mem))
		mem = cg;
	uint64_t cap = mem / 8;
	return cap < (256ull << 20) ? 256ull << 20 : cap;
}

/* The spill folder: the configured one, else $TMPDIR, else /var/tmp. */
static void spill_dir(char *out, size_t n)
{
	pthread_mutex_lock(&pm.lock);
	snprintf(out, n, "%s", pm.dir);
	pthread_mutex_unlock(&pm.lock);
	if (!*out) {
		const char *t = getenv("TMPDIR");
		snprintf(out, n, "%s", t && *t ? t : "/var/tmp");
	}
}

static int spill_file(const char *dir)
{
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
		char *t = dws_xasprintf("%s/.dwsfs-patch-XXXXXX", dir);
		fd = mkostemp(t, O_CLOEXEC);
		if (fd >= 0)
			unlink(t);
		free(t);
	}
	return fd;
}

/* A shared mapping of a new unlinked file of n bytes (whole pages, zeroed,
 * its blocks allocated so a write never meets a full disk), or NULL with
 * errno-like *why set. */
static void *spill(size_t n, size_t *maplen, int *why, char *dir, size_t dirn)
{
	spill_dir(dir, dirn);
	if (atomic_load(&pm.fail_next)) {
		atomic_fetch_sub(&pm.fail_next, 1);
		*why = ENOSPC;
		return NULL;
	}
	if (atomic_load(&pm.blocks) >= MAX_SPILLED) {
		*why = EMFILE;
		return NULL;
	}
	long pg = sysconf(_SC_PAGESIZE);
	size_t len = (n + (size_t)pg - 1) & ~((size_t)pg - 1);
	int fd = spill_file(dir);
	if (fd < 0) {
		*why = errno;
		return NULL;
	}
	struct statfs sf;
	if (fstatfs(fd, &sf) == 0 && sf.f_type == TMPFS_MAGIC && !atomic_exchange(&pm.warned_tmpfs, true))
		dws_log_warn("patch memory: the spill folder %s is a tmpfs: spilled patches still take memory (or swap); "
			     "set cache_dir to a folder on disk", dir);
	void *p = MAP_FAILED;
	int rc = posix_fallocate(fd, 0, (off_t)len);
	if (rc == 0)
		p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	*why = rc ? rc : errno;
	close(fd); /* the mapping keeps the file; munmap ends it */
	if (p == MAP_FAILED)
		return NULL;
	*maplen = len;
	return p;
}

/* Room under limit for n more anonymous bytes: taken. */
static bool take_memory(uint64_t n, uint64_t limit)
{
	uint64_t cur = atomic_load(&pm.memory);
	do {
		if (cur > limit || n > limit - cur)
			return false;
	} while (!atomic_compare_exchange_weak(&pm.memory, &cur, cur + n));
	return true;
}

static void *anon(dws_pmem *b, size_t n, unsigned flags)
{
	void *p = flags & DWS_PMEM_HUGE ? dws_big_alloc(n ? n : 1) : dws_big_alloc_unhinted(n ? n : 1);
	if (flags & DWS_PMEM_ZERO)
		memset(p, 0, n);
	*b = (dws_pmem){.p = p, .len = n};
	return p;
}

void *dws_pmem_alloc(dws_pmem *b, size_t n, unsigned flags)
{
	uint64_t cap = atomic_load(&pm.cap);
	if (n < DWS_PMEM_SPILL_MIN || cap == UINT64_MAX) {
		atomic_fetch_add(&pm.memory, n);
		return anon(b, n, flags);
	}
	/* a merged run leaves room for the next delta's arena: builds decode
	 * into memory, the big long-lived runs are what spills; and an arena
	 * leaves room for what decoding it holds besides (the delta file's
	 * bytes, about its size): the cap bounds the daemon's memory, not only
	 * the patches' */
	uint64_t limit = cap, peak = atomic_load(&pm.build_peak);
	if (flags & DWS_PMEM_MERGED) {
		limit -= 3 * peak < cap / 2 ? 3 * peak : cap / 2;
	} else {
		while (n > peak && !atomic_compare_exchange_weak(&pm.build_peak, &peak, n))
			;
		limit -= n < cap / 4 ? n : cap / 4;
	}
	if (take_memory(n, limit))
		return anon(b, n, flags);
	char dir[PATH_MAX];
	size_t maplen = 0;
	int why = 0;
	void *p = spill(n, &maplen, &why, dir, sizeof(dir));
	if (!p) {
		atomic_fetch_add(&pm.failures, 1);
		if (!atomic_exchange(&pm.warned, true))
			dws_log_warn("patch memory: cannot spill %zu bytes to %s (%s): keeping them in memory, past patch_mem; "
				     "later failures are counted in status patch_spill_failures",
				     n, dir, why == EMFILE ? "too many spilled blocks" : strerror(why));
		atomic_fetch_add(&pm.memory, n);
		return anon(b, n, flags);
	}
	atomic_fetch_add(&pm.disk, n);
	atomic_fetch_add(&pm.blocks, 1);
	maps_add(p, maplen);
	*b = (dws_pmem){.p = p, .len = n, .disk = true};
	return p;
}

void dws_pmem_adopt(dws_pmem *b, void *p, size_t n)
{
	atomic_fetch_add(&pm.memory, n);
	*b = (dws_pmem){.p = p, .len = n};
}

void dws_pmem_shrink(dws_pmem *b, size_t n)
{
	if (b->disk || n >= b->len)
		return;
	b->p = dws_xrealloc(b->p, n ? n : 1);
	atomic_fetch_sub(&pm.memory, b->len - n);
	b->len = n;
}

void dws_pmem_written(dws_pmem *b)
{
	if (b->disk)
		madvise(b->p, b->len, MADV_DONTNEED); /* shared: the page cache keeps the bytes */
}

void dws_pmem_release(dws_pmem *b, void *p, size_t n)
{
	long pg = sysconf(_SC_PAGESIZE);
	uintptr_t a = ((uintptr_t)p + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
	uintptr_t e = ((uintptr_t)p + n) & ~((uintptr_t)pg - 1);
	if (pg <= 0 || e <= a)
		return;
	/* spilled: a hole in the file (the bytes read back as zeros, never
	 * read again); else, or where the file system cannot, just the pages */
	if (!b->disk || madvise((void *)a, e - a, MADV_REMOVE) != 0)
		madvise((void *)a, e - a, MADV_DONTNEED);
	size_t got = (size_t)(e - a);
	size_t gone = atomic_fetch_add(&b->gone, got) + got;
	if (gone <= b->len)
		atomic_fetch_sub(b->disk ? &pm.disk : &pm.memory, got);
}

void dws_pmem_free(dws_pmem *b)
{
	if (!b->p)
		return;
	size_t gone = atomic_load(&b->gone), left = gone < b->len ? b->len - gone : 0;
	if (b->disk) {
		long pg = sysconf(_SC_PAGESIZE);
		maps_remove(b->p); /* before the unmap: a trim never meets an address reused */
		munmap(b->p, (b->len + (size_t)pg - 1) & ~((size_t)pg - 1));
		atomic_fetch_sub(&pm.disk, left);
		atomic_fetch_sub(&pm.blocks, 1);
	} else {
		free(b->p);
		atomic_fetch_sub(&pm.memory, left);
	}
	b->p = NULL;
}

void dws_pmem_get(dws_pmem_counts *c)
{
	c->cap = atomic_load(&pm.cap);
	c->memory = atomic_load(&pm.memory);
	c->disk = atomic_load(&pm.disk);
	c->spill_failures = atomic_load(&pm.failures);
}

void dws_pmem_fail_spills(unsigned n) { atomic_store(&pm.fail_next, n); }
