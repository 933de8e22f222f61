/* Patch memory under a cap: the large arrays of patch runs (delta arenas,
 * merged runs, dense and whole-tensor copies) are anonymous memory while the
 * process's patch memory stays under the cap; past it, each new array is an
 * unlinked file of its own in the spill folder, mapped shared, so its pages
 * are page cache the kernel writes back and drops instead of memory it must
 * keep. A spill that fails (disk full, a folder that cannot hold files) falls
 * back to memory with one warning line. Every block records which kind it
 * is; the free path never guesses. */
#ifndef DWSFS_PATCHMEM_H
#define DWSFS_PATCHMEM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct dws_pmem {
	void *p;
	size_t len;          /* bytes asked (a spilled block maps whole pages) */
	bool disk;           /* a shared mapping of an unlinked file; else malloc'd */
	atomic_size_t gone;  /* bytes given back early (dws_pmem_release) */
} dws_pmem;

/* Blocks smaller than this stay in memory (a file each costs an inode and a
 * page at least). */
#define DWS_PMEM_SPILL_MIN (16u << 10)

enum {
	DWS_PMEM_ZERO = 1,   /* zeroed */
	DWS_PMEM_HUGE = 2,   /* the huge page hint at once (anonymous blocks) */
	DWS_PMEM_MERGED = 4, /* a merged or dense run (long-lived): it leaves room
			      * under the cap for the next delta's arena, which a
			      * build decodes into (blocks asked without this) */
};

/* The cap on anonymous patch memory (UINT64_MAX: none, the default of a
 * process that never calls this) and the folder spilled blocks go to (NULL:
 * $TMPDIR, else /var/tmp). Process-wide: the last call wins. */
void dws_pmem_configure(uint64_t cap, const char *dir);
/* The default cap: 1/8 of the machine's memory (or of the cgroup's limit,
 * when lower), at least 256 MiB. */
uint64_t dws_pmem_default_cap(void);

/* n bytes into *b (never fails: out of memory aborts as dws_xmalloc does). */
void *dws_pmem_alloc(dws_pmem *b, size_t n, unsigned flags);
/* A malloc'd array of n bytes, counted as anonymous patch memory and
 * free()d by dws_pmem_free. */
void dws_pmem_adopt(dws_pmem *b, void *p, size_t n);
/* An anonymous block cut to n bytes (it may move); a spilled one keeps its
 * pages until freed. */
void dws_pmem_shrink(dws_pmem *b, size_t n);
/* The block's producer is done with it: a spilled block's pages leave the
 * process (they stay in the page cache, dirty until written back). */
void dws_pmem_written(dws_pmem *b);
/* The whole pages of [p, p+n) inside b are no longer needed: anonymous ones
 * go back to the kernel, spilled ones are punched out of the file. */
void dws_pmem_release(dws_pmem *b, void *p, size_t n);
void dws_pmem_free(dws_pmem *b);
/* `read` more bytes read: each DWS_PMEM_TRIM_EVERY of them, every spilled
 * block's pages leave the process (readers fault them in again from the
 * page cache), so its resident memory stays within the cap and that much
 * however much spilled data is read. Cheap when it is not yet time. */
#define DWS_PMEM_TRIM_EVERY (16ull << 20)
void dws_pmem_trim(uint64_t read);

typedef struct dws_pmem_counts {
	uint64_t cap;         /* UINT64_MAX: none */
	uint64_t memory;      /* anonymous bytes */
	uint64_t disk;        /* spilled bytes */
	uint64_t spill_failures;
} dws_pmem_counts;
void dws_pmem_get(dws_pmem_counts *c);

/* Tests: the next n spills fail as a full disk would. */
void dws_pmem_fail_spills(unsigned n);

#endif
