/* memfs: the reference for dwsfs's FUSE path in tests/bench/run. A minimal
 * read-only filesystem (low-level libfuse3 API) serving one file of N bytes
 * from memory, with dwsfs's FUSE settings (fs/dwsfs.c): the same init
 * (ASYNC_READ wanted, AUTO_INVAL_DATA off), keep_cache and noflush on open,
 * the multi-threaded loop with up to 16 threads, "-osubtype=...,ro", and the
 * same request sizes: neither sets max_read nor max_readahead, and both set
 * the mount's bdi read_ahead_kb to 1024 once FUSE_INIT is through (dwsfs's
 * read_ahead default; MEMFS_READ_AHEAD_KB overrides, 0 leaves the kernel's).
 * Reads are answered straight from memory (fuse_reply_buf on the data, no
 * copy; the data page aligned, on huge pages where the kernel gives them):
 * the ceiling of a FUSE filesystem here.
 *
 *     memfs [-f] [FUSE options] BYTES MOUNTPOINT      # serves MOUNTPOINT/data
 *
 * The bytes are a fixed pseudo-random pattern written once at start-up (no
 * zero pages the kernel could share). MEMFS_SKEW=N (0-4095) puts them N bytes
 * past a page: what the kernel's copy of a reply into the page cache costs
 * when the source is out of phase with it (a diagnostic).
 */
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/sysmacros.h>
#include <pthread.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define INO_FILE 2
static const char file_name[] = "data";

static char *data;
static uint64_t data_len;

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_uid = getuid();
	st->st_gid = getgid();
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0555;
		st->st_nlink = 2;
	} else {
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		st->st_size = (off_t)data_len;
		st->st_blocks = (blkcnt_t)((data_len + 511) / 512);
	}
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	if (conn->capable & FUSE_CAP_ASYNC_READ)
		conn->want |= FUSE_CAP_ASYNC_READ;
	conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	if (parent != FUSE_ROOT_ID || strcmp(name, file_name))
		return (void)fuse_reply_err(req, ENOENT);
	struct fuse_entry_param e;
	memset(&e, 0, sizeof(e));
	e.ino = INO_FILE;
	e.attr_timeout = 86400;
	e.entry_timeout = 86400;
	fill_attr(INO_FILE, &e.attr);
	fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != INO_FILE)
		return (void)fuse_reply_err(req, ENOENT);
	struct stat st;
	fill_attr(ino, &st);
	fuse_reply_attr(req, &st, 86400);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi;
	if (ino != FUSE_ROOT_ID)
		return (void)fuse_reply_err(req, ENOTDIR);
	char buf[512];
	size_t len = 0;
	const char *names[] = {".", "..", file_name};
	const fuse_ino_t inos[] = {FUSE_ROOT_ID, FUSE_ROOT_ID, INO_FILE};
	for (off_t i = off; i < 3; i++) {
		struct stat st;
		fill_attr(inos[i], &st);
		size_t n = fuse_add_direntry(req, buf + len, sizeof(buf) - len, names[i], &st, i + 1);
		if (n > sizeof(buf) - len || len + n > size)
			break;
		len += n;
	}
	fuse_reply_buf(req, buf, len);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != INO_FILE)
		return (void)fuse_reply_err(req, EISDIR);
	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		return (void)fuse_reply_err(req, EROFS);
	fi->keep_cache = 1;
	fi->noflush = 1;
	fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if ((uint64_t)off >= data_len)
		return (void)fuse_reply_buf(req, NULL, 0);
	size_t n = data_len - (uint64_t)off < size ? (size_t)(data_len - (uint64_t)off) : size;
	fuse_reply_buf(req, data + off, n);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino;
	struct statvfs st = {.f_bsize = 1 << 20, .f_frsize = 1 << 20, .f_namemax = 255};
	fuse_reply_statfs(req, &st);
}

static const struct fuse_lowlevel_ops ops = {
	.init = op_init,
	.lookup = op_lookup,
	.getattr = op_getattr,
	.readdir = op_readdir,
	.open = op_open,
	.read = op_read,
	.release = op_release,
	.statfs = op_statfs,
};

/* as fs/dwsfs.c: once a stat of the root has waited out FUSE_INIT */
static void *read_ahead_main(void *v)
{
	char *mnt = v;
	const char *env = getenv("MEMFS_READ_AHEAD_KB");
	int kb = env ? atoi(env) : 1024;
	struct stat st;
	if (kb > 0 && stat(mnt, &st) == 0) {
		char path[96];
		snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb", major(st.st_dev), minor(st.st_dev));
		FILE *f = fopen(path, "w");
		if (f) {
			fprintf(f, "%d\n", kb);
			fclose(f);
		}
	}
	free(mnt);
	return NULL;
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts co = {0};
	struct fuse_session *se = NULL;
	int ret = 1;

	/* the first non-option argument is the size; the rest goes to libfuse */
	int pos = -1;
	for (int i = 1; i < args.argc; i++) {
		if (args.argv[i][0] != '-' && (i == 1 || strcmp(args.argv[i - 1], "-o"))) {
			pos = i;
			break;
		}
	}
	if (pos < 0) {
		fprintf(stderr, "usage: memfs [-f] [FUSE options] BYTES MOUNTPOINT\n");
		return 1;
	}
	char *end;
	unsigned long long n = strtoull(args.argv[pos], &end, 10);
	if (*end || !n) {
		fprintf(stderr, "memfs: BYTES must be a positive integer, not '%s'\n", args.argv[pos]);
		return 1;
	}
	for (int i = pos; i + 1 < args.argc; i++)
		args.argv[i] = args.argv[i + 1];
	args.argc--;
	data_len = n;
	/* on huge pages where the kernel gives them, as dwsfs's block buffers
	 * and whole tensors: from small pages the kernel's copy of every reply
	 * cost more (pinning each 4 KiB page), which is no ceiling. Where in a
	 * page the data starts makes no difference here (MEMFS_SKEW: 0, 8, 16,
	 * 32, 48 bytes, the same times, huge pages or not). */
	const char *skew_env = getenv("MEMFS_SKEW");
	unsigned skew = skew_env ? (unsigned)strtoul(skew_env, NULL, 10) % 4096 : 0;
	void *mem = NULL;
	if (posix_memalign(&mem, 2u << 20, data_len + skew) != 0)
		mem = NULL;
	data = mem ? (char *)mem + skew : NULL;
	if (data)
		madvise(data, data_len & ~(uint64_t)((2u << 20) - 1), MADV_HUGEPAGE);
	if (!data) {
		fprintf(stderr, "memfs: cannot allocate %llu bytes\n", n);
		return 1;
	}
	uint64_t x = 0x9E3779B97F4A7C15ull;
	for (uint64_t i = 0; i + 8 <= data_len; i += 8) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(data + i, &x, 8);
	}
	memset(data + (data_len & ~7ull), 0x5a, data_len & 7);

	if (fuse_parse_cmdline(&args, &co) != 0 || !co.mountpoint) {
		fprintf(stderr, "usage: memfs [-f] [FUSE options] BYTES MOUNTPOINT\n");
		goto out;
	}
	if (fuse_opt_add_arg(&args, "-osubtype=memfs,ro,fsname=memfs") != 0)
		goto out;
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!se)
		goto out;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_session;
	if (fuse_session_mount(se, co.mountpoint) != 0)
		goto out_signals;
	if (fuse_daemonize(co.foreground) != 0)
		goto out_unmount;
	pthread_t rat;
	char *mnt = realpath(co.mountpoint, NULL);
	if (mnt && pthread_create(&rat, NULL, read_ahead_main, mnt) == 0)
		pthread_detach(rat);
	else
		free(mnt);
	if (co.singlethread) {
		ret = fuse_session_loop(se);
	} else {
		struct fuse_loop_config *lc = fuse_loop_cfg_create();
		fuse_loop_cfg_set_clone_fd(lc, co.clone_fd);
		fuse_loop_cfg_set_max_threads(lc, co.max_threads ? co.max_threads : 16);
		ret = fuse_session_loop_mt(se, lc);
		fuse_loop_cfg_destroy(lc);
	}
	if (ret > 0) /* ended by a signal */
		ret = 0;
out_unmount:
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out:
	free(co.mountpoint);
	fuse_opt_free_args(&args);
	free(data ? data - skew : NULL);
	return ret ? 1 : 0;
}
