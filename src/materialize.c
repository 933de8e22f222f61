/* Materialized files: a step's file written whole into an unnamed file, for
 * a mount to hand the kernel (FUSE passthrough). Reads of such a file go to
 * the kernel's page cache of a local file, in large folios, and never reach
 * the daemon; the bytes are exactly dws_step_read's. */
#include "step.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* Large writes: the page cache takes them in large folios (a later mmap maps
 * a folio per fault instead of a 64 KiB window of small pages). */
#define MAT_CHUNK (8u << 20)

int dws_step_materialize(dws_step *s, size_t fi, const char *dir, uint64_t min_free,
			 const _Atomic bool *stop, int *fd_out, dws_error *err)
{
	*fd_out = -1;
	const dws_file_info *info = dws_step_file(s, fi);
	if (!info)
		return dws_fail(err, DWS_ENOENT, "step %llu: no file %zu", (unsigned long long)dws_step_number(s), fi);
	struct statvfs sv;
	if (statvfs(dir, &sv) != 0)
		return dws_fail(err, DWS_EIO, "materialize %s: %s: %s", info->path, dir, strerror(errno));
	uint64_t avail, need;
	if (!dws_mul_ok((uint64_t)sv.f_bavail, (uint64_t)sv.f_frsize, &avail) ||
	    !dws_add_ok(info->size, min_free, &need))
		avail = 0, need = 1;
	if (avail < need)
		return dws_fail(err, DWS_EIO, "materialize %s of step %llu: %s has %llu bytes free, %llu needed with the floor",
				info->path, (unsigned long long)dws_step_number(s), dir, (unsigned long long)avail,
				(unsigned long long)need);
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0)
		return dws_fail(err, DWS_EIO, "materialize %s: unnamed file in %s: %s", info->path, dir, strerror(errno));
	char *buf = NULL;
	int rc = DWS_OK;
	if (info->size && (errno = posix_fallocate(fd, 0, (off_t)info->size)) != 0 && errno != EOPNOTSUPP) {
		rc = dws_fail(err, DWS_EIO, "materialize %s: reserve %llu bytes in %s: %s", info->path,
			      (unsigned long long)info->size, dir, strerror(errno));
		goto out;
	}
	size_t cap = info->size < MAT_CHUNK ? (size_t)info->size : MAT_CHUNK;
	buf = dws_xmalloc(cap ? cap : 1);
	for (uint64_t off = 0; off < info->size;) {
		if (stop && atomic_load(stop)) {
			rc = dws_fail(err, DWS_EIO, "materialize %s: cancelled", info->path);
			goto out;
		}
		int64_t n = dws_step_read(s, fi, off, buf, cap, err);
		if (n < 0) {
			rc = (int)n;
			goto out;
		}
		if (n == 0) {
			rc = dws_fail(err, DWS_EIO, "materialize %s: short read at %llu of %llu", info->path,
				      (unsigned long long)off, (unsigned long long)info->size);
			goto out;
		}
		if (!dws_pwrite_all(fd, buf, (size_t)n, off)) {
			rc = dws_fail(err, DWS_EIO, "materialize %s: write in %s: %s", info->path, dir, strerror(errno));
			goto out;
		}
		off += (uint64_t)n;
	}
out:
	free(buf);
	if (rc) {
		close(fd);
		return rc;
	}
	*fd_out = fd;
	return DWS_OK;
}
