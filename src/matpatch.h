/* A materialized copy of a step brought forward in place: the catch-up
 * patch from its step to a later one of the same chain written into its
 * files (only the changed elements; the pages holding them are what the
 * kernel writes back). Only for a copy no open file and no mapping uses:
 * passthrough reads and mmaps see the copy's pages themselves. */
#ifndef DWSFS_MATPATCH_H
#define DWSFS_MATPATCH_H

#include "internal.h"

/* Patch p (its TO step: `to`) into the copy's files fds[0..n) (the files
 * of `to`'s layout, in order). On failure the copy is part old, part new:
 * the caller drops it. */
int dws_matpatch_apply(dws_patchfile *p, dws_step *to, const int *fds, size_t n, dws_error *err);
/* A descriptor of the copy's file fd to hand out (to the kernel, for
 * passthrough): a new open of it, read-write, so that while it or anything
 * made from it lives (a backing file, a mapping of a passed-through file,
 * which outlives the file's handles) the file counts one more writer. -1
 * on failure. */
int dws_matpatch_reopen(int fd);
/* Whether anything but the copy's own descriptors fds[0..n) (read-write)
 * still has one of its files open: a write lease is refused then (or
 * leases are off, and nobody can tell). A copy in use is never changed in
 * place. */
bool dws_matpatch_in_use(const int *fds, size_t n);

#endif
