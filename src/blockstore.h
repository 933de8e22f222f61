/* The block cache's files on disk (for src/remote.c; see blockstore.c). */
#ifndef DWSFS_BLOCKSTORE_H
#define DWSFS_BLOCKSTORE_H

#include "internal.h"

typedef struct dws_blockstore dws_blockstore;

/* The file a block was last checked in: a later read of part of it reads
 * only its bytes while the file is still this one. Zero: never checked. */
typedef struct dws_block_stamp {
	uint64_t ino, size;
	int64_t ctime_ns;
} dws_block_stamp;

/* Creates or opens cache folder dir and checks it (no links followed, the
 * daemon's user's, writable by no one else), else fails with one line naming
 * the folder and the reason. Empties dir/tmp (half-written blocks). */
int dws_blockstore_open(const char *dir, dws_blockstore **out, dws_error *err);
void dws_blockstore_close(dws_blockstore *s);

/* Each block file on disk: its key, its size, its last access (seconds).
 * Fails as open does on a blocks/XX subfolder that does not check out. */
typedef void (*dws_block_found_fn)(void *ctx, const char *key, uint64_t bytes, uint64_t atime);
int dws_blockstore_scan(dws_blockstore *s, dws_block_found_fn found, void *ctx, dws_error *err);

/* Free bytes on the folder's filesystem (UINT64_MAX if unknown). */
uint64_t dws_blockstore_free(dws_blockstore *s);

/* Bytes on disk of a block of len data bytes: data, trailer, zeros to 4 KiB. */
uint64_t dws_block_disk_size(uint64_t len);

/* Writes block key of len bytes from buf (room for dws_block_disk_size(len)
 * bytes: this fills in the trailer and zeros) through tmp, renamed into
 * place; *stamp: the file written. */
int dws_block_write(dws_blockstore *s, const char *key, unsigned char *buf, size_t len,
		    dws_block_stamp *stamp, dws_error *err);
/* [off, off+len) of block key (want_len bytes) into buf. The whole block is
 * checked first unless its file is still *stamp's; *stamp is updated.
 * DWS_ENOENT: the file is gone or bad. */
int dws_block_read(dws_blockstore *s, const char *key, uint64_t want_len, uint64_t off,
		   void *buf, size_t len, dws_block_stamp *stamp);
/* The whole block key (want_len bytes) into data (room for
 * dws_block_disk_size(want_len) bytes), always checked; *stamp: its file. False if gone or bad. */
bool dws_block_load(dws_blockstore *s, const char *key, uint64_t want_len, unsigned char *data,
		    dws_block_stamp *stamp);
void dws_block_remove(dws_blockstore *s, const char *key);

#endif
