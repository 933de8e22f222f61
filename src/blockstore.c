/* The block cache's files on disk: cache_dir/blocks/XX/<key>.blk (XX: the
 * key's first two characters), each written to cache_dir/tmp and renamed
 * into place, so a kill -9 mid-write leaves nothing that is served.
 *
 * The daemon runs as root, and a cache may live where others can write (a
 * /tmp path made by another user): nothing there may make it delete or
 * write elsewhere, or serve bytes that are not the block's.
 * - cache_dir, blocks, tmp and every blocks/XX are opened without following
 *   a link (O_NOFOLLOW | O_DIRECTORY) and must be owned by the daemon's
 *   effective user and writable by no one else: else the cache is refused
 *   with one line naming the folder and the reason. cache_dir itself may be
 *   a link (the admin's choice: another disk) if the link is the daemon's
 *   user's or root's, in a parent others cannot write to unless sticky.
 * - cache_dir, blocks and tmp are held open for the cache's life; every file
 *   is reached relative to them (openat, mkdirat, renameat, unlinkat,
 *   fstatat), never by a path, never through a link. A blocks/XX is opened
 *   and checked each time (256 more descriptors per cache, up to 8 caches in
 *   a process, would pass a 1024 descriptor limit).
 * - A block file: the data, a trailer (length, checksum, magic), zeros to the
 *   next 4 KiB. The checksum is XXH3-64 of the block's key (content identity
 *   and block number) seeded with the XXH3-64 of the data: a block file
 *   under another block's name does not check out. A changed trailer format
 *   gets a new magic, and older blocks are dropped and fetched again.
 * - Checked when: a whole block loaded (into the hot set) every time; a read
 *   of part of a block checks the whole block first unless its file is the
 *   one checked last in this process (inode, size and ctime unchanged: any
 *   write or rename changes the ctime).
 */
#include "blockstore.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#define BLK_MAGIC "DWSBLK3" /* 2: the checksum covered the data only */
#define TRAILER 24          /* length, checksum, magic */
#define ALIGN 4096

struct dws_blockstore {
	char *dir;
	int root, blocks, tmp; /* held open */
	atomic_uint tmp_seq;
};

/* ---- folders ---- */

/* Owned by the daemon's user, writable by no one else. what: NULL for
 * cache_dir, else its name inside it. */
static int check_owner(const dws_blockstore *s, int fd, const char *what, dws_error *err)
{
	struct stat st;
	char is[80] = "";
	if (what)
		snprintf(is, sizeof(is), "%s is ", what);
	if (fstat(fd, &st) != 0)
		return dws_fail(err, DWS_EIO, "cache folder %s: %s: %s", s->dir, what ? what : "stat", strerror(errno));
	if (st.st_uid != geteuid())
		return dws_fail(err, DWS_EIO, "cache folder %s: %sowned by uid %u, not %u (the daemon's user); refused",
				s->dir, is, (unsigned)st.st_uid, (unsigned)geteuid());
	if (st.st_mode & (S_IWGRP | S_IWOTH))
		return dws_fail(err, DWS_EIO, "cache folder %s: %swritable by %s (mode %04o); refused", s->dir, is,
				st.st_mode & S_IWOTH ? "others" : "its group", (unsigned)(st.st_mode & 07777));
	return DWS_OK;
}

/* Folder name in folder parent, made first when make; never through a link.
 * Returns its descriptor or a negative dws_code. */
static int dir_open(const dws_blockstore *s, int parent, const char *name, const char *what, bool make,
		    dws_error *err)
{
	if (make && mkdirat(parent, name, 0700) != 0 && errno != EEXIST)
		return dws_fail(err, DWS_EIO, "cache folder %s: %s: %s", s->dir, what, strerror(errno));
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		struct stat st;
		if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))
			return dws_fail(err, DWS_EIO, "cache folder %s: %s is a symbolic link; refused (the cache follows "
				       "no link inside its folder)", s->dir, what);
		return dws_fail(err, DWS_EIO, "cache folder %s: %s: %s", s->dir, what,
				e == ENOTDIR ? "not a folder" : strerror(e));
	}
	int rc = check_owner(s, fd, what, err);
	if (rc) {
		close(fd);
		return rc;
	}
	return fd;
}

static int mkdir_p(const char *path)
{
	char *p = dws_xstrdup(path);
	for (char *c = p + 1; *c; c++)
		if (*c == '/') {
			*c = 0;
			mkdir(p, 0700);
			*c = '/';
		}
	int rc = mkdir(p, 0700) == 0 || errno == EEXIST ? 0 : -1;
	free(p);
	return rc;
}

/* cache_dir: the path up to it is the admin's and followed; the folder
 * itself is a link only if its user or root made it. */
static int root_open(dws_blockstore *s, dws_error *err)
{
	if (mkdir_p(s->dir) != 0)
		return dws_fail(err, DWS_EIO, "cache folder %s: %s", s->dir, strerror(errno));
	char *path = dws_xstrdup(s->dir);
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/')
		path[--n] = 0;
	char *slash = strrchr(path, '/');
	const char *parent = !slash ? "." : slash == path ? "/" : path, *name = slash ? slash + 1 : path;
	if (slash && slash != path)
		*slash = 0;
	if (!*name)
		name = "/";
	int rc = DWS_OK, pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct stat pst, st;
	if (pfd < 0 || fstat(pfd, &pst) != 0 || fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
		rc = dws_fail(err, DWS_EIO, "cache folder %s: %s", s->dir, strerror(errno));
	else if ((pst.st_mode & S_IWOTH) && !(pst.st_mode & S_ISVTX))
		rc = dws_fail(err, DWS_EIO, "cache folder %s: in a folder anyone can write to (%s, mode %04o); refused",
			      s->dir, parent, (unsigned)(pst.st_mode & 07777));
	else if (S_ISLNK(st.st_mode) && st.st_uid != geteuid() && st.st_uid != 0)
		rc = dws_fail(err, DWS_EIO, "cache folder %s: a symbolic link owned by uid %u (only the daemon's user's "
			      "or root's are followed); refused", s->dir, (unsigned)st.st_uid);
	else if ((s->root = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC |
				   (S_ISLNK(st.st_mode) ? 0 : O_NOFOLLOW))) < 0)
		rc = dws_fail(err, DWS_EIO, "cache folder %s: %s", s->dir, errno == ELOOP ? "changed to a symbolic link; refused"
			      : strerror(errno));
	else
		rc = check_owner(s, s->root, NULL, err);
	if (pfd >= 0)
		close(pfd);
	free(path);
	return rc;
}

int dws_blockstore_open(const char *dir, dws_blockstore **out, dws_error *err)
{
	dws_blockstore *s = dws_xcalloc(1, sizeof(*s));
	s->dir = dws_xstrdup(dir);
	s->root = s->blocks = s->tmp = -1;
	int rc = root_open(s, err);
	if (!rc && (s->blocks = dir_open(s, s->root, "blocks", "blocks", true, err)) < 0)
		rc = s->blocks;
	if (!rc && (s->tmp = dir_open(s, s->root, "tmp", "tmp", true, err)) < 0)
		rc = s->tmp;
	DIR *d = NULL;
	int dfd = rc ? -1 : dup(s->tmp);
	if (!rc && (dfd < 0 || !(d = fdopendir(dfd)))) {
		rc = dws_fail(err, DWS_EIO, "cache folder %s: tmp: %s", dir, strerror(errno));
		if (dfd >= 0)
			close(dfd);
	}
	struct dirent *de;
	while (d && (de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			unlinkat(s->tmp, de->d_name, 0); /* half-written: never served */
	if (d)
		closedir(d);
	if (rc) {
		dws_blockstore_close(s);
		return rc;
	}
	*out = s;
	return DWS_OK;
}

void dws_blockstore_close(dws_blockstore *s)
{
	if (!s)
		return;
	if (s->tmp >= 0)
		close(s->tmp);
	if (s->blocks >= 0)
		close(s->blocks);
	if (s->root >= 0)
		close(s->root);
	free(s->dir);
	free(s);
}

uint64_t dws_blockstore_free(dws_blockstore *s)
{
	struct statvfs sv;
	if (fstatvfs(s->root, &sv) != 0)
		return UINT64_MAX;
	return (uint64_t)sv.f_bavail * sv.f_frsize;
}

/* Block keys: "<hex>-<decimal>", as remote.c makes them. */
static bool key_ok(const char *k, size_t n)
{
	if (n < 4 || n > 63)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!strchr("0123456789abcdef-", k[i]) || !k[i])
			return false;
	return k[0] != '-' && k[1] != '-';
}

static bool is_xx(const char *n)
{
	const char *hex = "0123456789abcdef";
	return n[0] && n[1] && !n[2] && strchr(hex, n[0]) && strchr(hex, n[1]);
}

/* The blocks of one blocks/XX folder. */
static void scan_sub(int fd, const char *xx, dws_block_found_fn found, void *ctx)
{
	DIR *s = fdopendir(fd);
	if (!s) {
		close(fd);
		return;
	}
	struct dirent *fe;
	while ((fe = readdir(s))) {
		size_t n = strlen(fe->d_name);
		struct stat st;
		if (n < 5 || strcmp(fe->d_name + n - 4, ".blk") || !key_ok(fe->d_name, n - 4) ||
		    memcmp(fe->d_name, xx, 2) || fstatat(fd, fe->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
		    !S_ISREG(st.st_mode))
			continue;
		char key[64];
		snprintf(key, sizeof(key), "%.*s", (int)(n - 4), fe->d_name);
		found(ctx, key, (uint64_t)st.st_size, (uint64_t)st.st_atime);
	}
	closedir(s);
}

int dws_blockstore_scan(dws_blockstore *s, dws_block_found_fn found, void *ctx, dws_error *err)
{
	int dfd = dup(s->blocks);
	DIR *top = dfd >= 0 ? fdopendir(dfd) : NULL;
	if (!top) {
		if (dfd >= 0)
			close(dfd);
		return dws_fail(err, DWS_EIO, "cache folder %s: blocks: %s", s->dir, strerror(errno));
	}
	rewinddir(top); /* the held descriptor's position is shared */
	struct dirent *de;
	int rc = DWS_OK;
	while (!rc && (de = readdir(top))) {
		if (!is_xx(de->d_name))
			continue; /* not a folder of blocks */
		char what[16];
		snprintf(what, sizeof(what), "blocks/%.2s", de->d_name);
		int fd = dir_open(s, s->blocks, de->d_name, what, false, err);
		if (fd < 0)
			rc = fd;
		else
			scan_sub(fd, de->d_name, found, ctx);
	}
	closedir(top);
	return rc;
}

/* ---- block files ---- */

uint64_t dws_block_disk_size(uint64_t len)
{
	return (len + TRAILER + ALIGN - 1) / ALIGN * ALIGN;
}

static uint64_t block_sum(const void *data, uint64_t len, const char *key)
{
	return XXH3_64bits_withSeed(key, strlen(key), dws_xxh3(data, (size_t)len));
}

/* blocks/XX of key, made first when make; checked as the other folders. */
static int sub_open(dws_blockstore *s, const char *key, bool make, dws_error *err)
{
	if (!key_ok(key, strlen(key)))
		return dws_fail(err, DWS_EINVAL, "cache folder %s: bad block key %s", s->dir, key);
	char xx[3] = {key[0], key[1], 0}, what[16];
	snprintf(what, sizeof(what), "blocks/%s", xx);
	return dir_open(s, s->blocks, xx, what, make, err);
}

static void stamp_of(const struct stat *st, dws_block_stamp *stamp)
{
	*stamp = (dws_block_stamp){(uint64_t)st->st_ino, (uint64_t)st->st_size,
				   (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec};
}

/* Block key's file, read only, never through a link; its stamp in *now.
 * -1 if it is gone or not a plain file. */
static int block_open(dws_blockstore *s, const char *key, dws_block_stamp *now)
{
	int sub = sub_open(s, key, false, NULL);
	if (sub < 0)
		return -1;
	char name[80];
	snprintf(name, sizeof(name), "%s.blk", key);
	int fd = openat(sub, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	close(sub);
	struct stat st;
	if (fd >= 0 && (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))) {
		close(fd);
		fd = -1;
	}
	if (fd >= 0)
		stamp_of(&st, now);
	return fd;
}

/* The trailer of block key of want_len bytes: true and its checksum in *sum
 * if it is whole, of this format and for that length. */
static bool trailer_ok(const unsigned char *tr, uint64_t want_len, uint64_t *sum)
{
	uint64_t l;
	memcpy(&l, tr, 8);
	memcpy(sum, tr + 8, 8);
	return memcmp(tr + 16, BLK_MAGIC, 8) == 0 && l == want_len;
}

static int write_file(const dws_blockstore *s, int fd, const char *tmp, const unsigned char *buf, size_t n,
		      bool direct, dws_error *err)
{
	size_t done = 0;
	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EINVAL && direct && done == 0) {
			/* the filesystem refuses direct writes of this buffer */
			direct = false;
			int fl = fcntl(fd, F_GETFL);
			if (fl >= 0 && fcntl(fd, F_SETFL, fl & ~O_DIRECT) == 0)
				continue;
		}
		if (w <= 0)
			return dws_fail(err, DWS_EIO, "cache %s/tmp/%s: write: %s", s->dir, tmp,
					w < 0 ? strerror(errno) : "no progress");
		done += (size_t)w;
	}
	return DWS_OK;
}

/* Written with O_DIRECT when the filesystem takes it: no page cache is
 * filled, nothing is copied. The file keeps the zeros after the trailer:
 * cutting them off (ftruncate) cost a synchronous read of the file's last
 * filesystem block, to zero its tail, and 1% of a cold read's CPU. */
int dws_block_write(dws_blockstore *s, const char *key, unsigned char *buf, size_t len,
		    dws_block_stamp *stamp, dws_error *err)
{
	unsigned char *tr = buf + len;
	uint64_t l = len, h = block_sum(buf, len, key);
	memcpy(tr, &l, 8);
	memcpy(tr + 8, &h, 8);
	memcpy(tr + 16, BLK_MAGIC, 8);
	size_t total = len + TRAILER, padded = (size_t)dws_block_disk_size(len);
	memset(buf + total, 0, padded - total);
	int sub = sub_open(s, key, true, err);
	if (sub < 0)
		return sub;
	char tmp[48], name[80];
	snprintf(tmp, sizeof(tmp), "%ld.%u", (long)getpid(), atomic_fetch_add(&s->tmp_seq, 1));
	snprintf(name, sizeof(name), "%s.blk", key);
	int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
	unlinkat(s->tmp, tmp, 0); /* a leftover of an earlier process of this pid */
	bool direct = true;
	int fd = openat(s->tmp, tmp, flags | O_DIRECT, 0600);
	if (fd < 0 && errno == EINVAL) {
		direct = false;
		fd = openat(s->tmp, tmp, flags, 0600);
	}
	int rc = DWS_OK;
	if (fd < 0) {
		rc = dws_fail(err, DWS_EIO, "cache %s/tmp/%s: %s", s->dir, tmp, strerror(errno));
	} else {
		rc = write_file(s, fd, tmp, buf, padded, direct, err);
		if (close(fd) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "cache %s/tmp/%s: close: %s", s->dir, tmp, strerror(errno));
		if (!rc && renameat(s->tmp, tmp, sub, name) != 0)
			rc = dws_fail(err, DWS_EIO, "cache %s/blocks/%.2s/%s: %s", s->dir, key, name, strerror(errno));
		struct stat st;
		if (!rc && fstatat(sub, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
			stamp_of(&st, stamp);
		else
			*stamp = (dws_block_stamp){0};
		if (rc)
			unlinkat(s->tmp, tmp, 0);
	}
	close(sub);
	return rc;
}

int dws_block_read(dws_blockstore *s, const char *key, uint64_t want_len, uint64_t off,
		   void *buf, size_t len, dws_block_stamp *stamp)
{
	dws_block_stamp now;
	int fd = block_open(s, key, &now);
	if (fd < 0)
		return DWS_ENOENT;
	unsigned char tr[TRAILER];
	uint64_t sum;
	int rc = DWS_ENOENT;
	if (!dws_pread_all(fd, tr, TRAILER, want_len) || !trailer_ok(tr, want_len, &sum) || off + len > want_len)
		goto out;
	if (!stamp->ino || memcmp(stamp, &now, sizeof(now)) != 0) {
		/* not checked in this process, or changed since: the whole block */
		char *all = dws_xmalloc(want_len ? want_len : 1);
		bool ok = dws_pread_all(fd, all, want_len, 0) && block_sum(all, want_len, key) == sum;
		if (ok)
			memcpy(buf, all + off, len);
		free(all);
		if (ok)
			*stamp = now;
		rc = ok ? DWS_OK : DWS_ENOENT;
		goto out;
	}
	rc = dws_pread_all(fd, buf, len, off) ? DWS_OK : DWS_ENOENT;
out:
	close(fd);
	return rc;
}

/* Buffered: the page cache keeps what RAM allows of the block cache, so a
 * remount reads it from memory, not from the disk (which is slower than
 * FUSE here: ~0.6-0.9 GB/s). */
bool dws_block_load(dws_blockstore *s, const char *key, uint64_t want_len, unsigned char *data,
		    dws_block_stamp *stamp)
{
	dws_block_stamp now;
	int fd = block_open(s, key, &now);
	if (fd < 0)
		return false;
	size_t want = (size_t)want_len + TRAILER, padded = (size_t)dws_block_disk_size(want_len), got = 0;
	while (got < want) {
		ssize_t r = pread(fd, data + got, padded - got, (off_t)got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	close(fd);
	uint64_t sum;
	if (got < want || !trailer_ok(data + want_len, want_len, &sum) || block_sum(data, want_len, key) != sum)
		return false;
	*stamp = now;
	return true;
}

void dws_block_remove(dws_blockstore *s, const char *key)
{
	int sub = sub_open(s, key, false, NULL);
	if (sub < 0)
		return;
	char name[80];
	snprintf(name, sizeof(name), "%s.blk", key);
	unlinkat(sub, name, 0);
	close(sub);
}
