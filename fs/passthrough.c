/* FUSE passthrough (Linux 6.9+): an open file whose reads and mmaps the
 * kernel sends straight to a local backing file, never to the daemon. Here
 * the backing file is a step's file materialized whole by the core
 * (dws_step_materialize): its page cache sits in large folios, so a warm
 * mmap maps a folio per fault, where FUSE's own page cache (small folios on
 * this kernel) costs a fault per 64 KiB.
 *
 * libfuse 3.14 has no passthrough API, so the session's I/O is hooked
 * (fuse_session_custom_io, the library's interface for it) and the two
 * fields involved are set in the kernel's protocol structures as the
 * replies go out: FUSE_PASSTHROUGH and max_stack_depth in the FUSE_INIT
 * reply (only where the kernel offered it), FOPEN_PASSTHROUGH and the
 * backing id in an open reply (only for the open that asked, marked by a
 * thread-local set around fuse_reply_open on the same thread). Backing ids
 * come from FUSE_DEV_IOC_BACKING_OPEN (root only); where anything of it is
 * missing, every open is served by the daemon as before. */
#include "passthrough.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

/* The kernel's protocol (include/uapi/linux/fuse.h, 7.40+): only what is
 * read or written here. */
enum { OP_INIT = 26 };
#define INIT_EXT (1u << 30)           /* flags: flags2 is valid */
#define INIT2_PASSTHROUGH (1u << 5)   /* flags2: FUSE_PASSTHROUGH (1 << 37) */
#define FOPEN_PASSTHROUGH (1u << 7)
struct k_in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};
struct k_init_in {
	uint32_t major, minor, max_readahead, flags, flags2;
};
struct k_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};
struct k_init_out {
	uint32_t major, minor, max_readahead, flags;
	uint16_t max_background, congestion_threshold;
	uint32_t max_write, time_gran;
	uint16_t max_pages, map_alignment;
	uint32_t flags2, max_stack_depth;
};
struct k_open_out {
	uint64_t fh;
	uint32_t open_flags;
	int32_t backing_id;
};
struct k_backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
#define IOC_BACKING_OPEN _IOW(229, 1, struct k_backing_map)
#define IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

struct backing {
	uint64_t id;
	size_t file;
	int kid;         /* the kernel's backing id */
	size_t handles;  /* open files passed through to it */
};

struct inode_mode {
	fuse_ino_t ino;
	size_t cached, passed; /* open handles each way */
};

static struct {
	pthread_mutex_t lock;
	dws_mount *m;
	int devfd;
	char *dir;
	uint64_t max_bytes;
	atomic_uint_least64_t init_unique; /* FUSE_INIT in flight, else 0 */
	atomic_bool offered, active;
	_Atomic(const char *) state; /* a literal, or refused */
	char refused[160];
	struct backing *b;
	size_t nb, capb;
	struct inode_mode *im;
	size_t nim, capim;
	atomic_uint_least64_t opens, reads;
} pt = {.lock = PTHREAD_MUTEX_INITIALIZER, .devfd = -1, .state = "off"};

static _Thread_local int reply_backing = -1;

static void set_state(const char *s)
{
	atomic_store(&pt.state, s);
}

static ssize_t io_read(int fd, void *buf, size_t len, void *ud)
{
	(void)ud;
	ssize_t n = read(fd, buf, len);
	if (n >= (ssize_t)(sizeof(struct k_in_header) + sizeof(struct k_init_in))) {
		const struct k_in_header *h = buf;
		if (h->opcode == OP_INIT) {
			const struct k_init_in *in = (const void *)(h + 1);
			atomic_store(&pt.offered, (in->flags & INIT_EXT) && (in->flags2 & INIT2_PASSTHROUGH));
			atomic_store(&pt.init_unique, h->unique);
		}
	}
	return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *ud)
{
	(void)ud;
	if (count >= 2 && iov[0].iov_len == sizeof(struct k_out_header)) {
		const struct k_out_header *h = iov[0].iov_base;
		uint64_t init = atomic_load(&pt.init_unique);
		if (init && h->unique == init) {
			atomic_store(&pt.init_unique, 0);
			if (!h->error && iov[1].iov_len >= sizeof(struct k_init_out) && atomic_load(&pt.offered)) {
				struct k_init_out *o = iov[1].iov_base;
				o->flags |= INIT_EXT;
				o->flags2 |= INIT2_PASSTHROUGH;
				o->max_stack_depth = 1; /* backing files on a plain filesystem */
				atomic_store(&pt.active, true);
				set_state("on");
				dws_mount_materialize(pt.m, pt.dir, pt.max_bytes);
			} else if (!atomic_load(&pt.offered)) {
				set_state("off: the kernel offers no FUSE passthrough");
			}
		} else if (reply_backing >= 0 && !h->error && iov[1].iov_len == sizeof(struct k_open_out)) {
			struct k_open_out *o = iov[1].iov_base;
			o->open_flags |= FOPEN_PASSTHROUGH;
			o->backing_id = reply_backing;
		}
	}
	return writev(fd, iov, count);
}

int pt_attach(struct fuse_session *se, dws_mount *m, bool wanted, const char *dir, uint64_t max_bytes)
{
	if (!wanted) {
		set_state("off: materialize_max=0");
		return 0;
	}
	if (geteuid() != 0) {
		set_state("off: backing files need root");
		return 0;
	}
	pt.m = m;
	pt.dir = strdup(dir);
	pt.max_bytes = max_bytes;
	pt.devfd = fuse_session_fd(se);
	if (!pt.dir)
		return -ENOMEM;
	static const struct fuse_custom_io io = {.read = io_read, .writev = io_writev};
	int rc = fuse_session_custom_io(se, &io, pt.devfd);
	if (rc)
		set_state("off: libfuse refused custom I/O");
	return rc;
}

/* arr with room for element n (cap grown as needed) */
static void *room_for(void *arr, size_t n, size_t *cap, size_t elem)
{
	if (n < *cap)
		return arr;
	size_t nc = *cap ? 2 * *cap : 16;
	void *p = realloc(arr, nc * elem);
	if (!p)
		abort();
	*cap = nc;
	return p;
}

static struct inode_mode *mode_of(fuse_ino_t ino)
{
	for (size_t i = 0; i < pt.nim; i++)
		if (pt.im[i].ino == ino)
			return &pt.im[i];
	pt.im = room_for(pt.im, pt.nim, &pt.capim, sizeof(*pt.im));
	pt.im[pt.nim] = (struct inode_mode){.ino = ino};
	return &pt.im[pt.nim++];
}

static void mode_drop_if_idle(struct inode_mode *im)
{
	if (!im->cached && !im->passed)
		*im = pt.im[--pt.nim];
}

static struct backing *backing_of(uint64_t id, size_t file)
{
	for (size_t i = 0; i < pt.nb; i++)
		if (pt.b[i].id == id && pt.b[i].file == file)
			return &pt.b[i];
	return NULL;
}

/* Backing ids no open file uses: given back (the kernel frees the file
 * with its last user), and their hold on the materialized copy with them,
 * so the copy may be brought forward in place. Under pt.lock: the ioctl
 * only drops an entry of the connection's table, it sends nothing and
 * waits for nothing from the daemon (no notification). */
static void sweep_locked(void)
{
	for (size_t i = 0; i < pt.nb;) {
		if (!pt.b[i].handles) {
			uint32_t kid = (uint32_t)pt.b[i].kid;
			if (ioctl(pt.devfd, IOC_BACKING_CLOSE, &kid) != 0)
				dws_log_at(DWS_LOG_WARN, "passthrough: give back backing id %d: %s", pt.b[i].kid, strerror(errno));
			if (pt.m)
				dws_mount_materialized_put(pt.m, pt.b[i].id);
			pt.b[i] = pt.b[--pt.nb];
		} else {
			i++;
		}
	}
}

static struct backing *backing_open_locked(uint64_t id, size_t file)
{
	int fd = dws_mount_materialized_fd(pt.m, id, file);
	if (fd < 0)
		return NULL;
	struct k_backing_map map = {.fd = fd};
	int kid = ioctl(pt.devfd, IOC_BACKING_OPEN, &map);
	int e = errno;
	close(fd);
	if (kid < 0) {
		/* a kernel that took the INIT flag yet refuses backing files:
		 * stop asking; every open goes through the daemon */
		snprintf(pt.refused, sizeof(pt.refused), "off: backing file refused: %s", strerror(e));
		dws_log("passthrough %s", pt.refused);
		set_state(pt.refused);
		atomic_store(&pt.active, false);
		return NULL;
	}
	pt.b = room_for(pt.b, pt.nb, &pt.capb, sizeof(*pt.b));
	pt.b[pt.nb] = (struct backing){.id = id, .file = file, .kid = kid};
	return &pt.b[pt.nb++];
}

int pt_open(fuse_ino_t ino, uint64_t id, size_t file)
{
	pthread_mutex_lock(&pt.lock);
	struct inode_mode *im = mode_of(ino);
	struct backing *b = NULL;
	if (!im->cached && atomic_load(&pt.active)) {
		b = backing_of(id, file);
		if (!b) {
			sweep_locked();
			b = backing_open_locked(id, file);
		}
	}
	int kid = -1;
	if (b) {
		b->handles++;
		im->passed++;
		kid = b->kid;
		atomic_fetch_add(&pt.opens, 1);
	} else {
		/* never happens while passed > 0: its backing id stays */
		im->cached++;
	}
	pthread_mutex_unlock(&pt.lock);
	return kid;
}

int pt_reply_open(fuse_req_t req, struct fuse_file_info *fi, int backing)
{
	if (backing >= 0)
		fi->keep_cache = 0; /* not allowed with FOPEN_PASSTHROUGH */
	reply_backing = backing;
	int rc = fuse_reply_open(req, fi);
	reply_backing = -1;
	return rc;
}

void pt_release(fuse_ino_t ino, uint64_t id, size_t file, int backing)
{
	pthread_mutex_lock(&pt.lock);
	struct inode_mode *im = mode_of(ino);
	if (backing >= 0) {
		struct backing *b = backing_of(id, file);
		if (b && b->handles)
			b->handles--;
		if (im->passed)
			im->passed--;
		sweep_locked();
	} else if (im->cached) {
		im->cached--;
	}
	mode_drop_if_idle(im);
	pthread_mutex_unlock(&pt.lock);
}

int pt_open_fd(fuse_ino_t ino, int fd)
{
	pthread_mutex_lock(&pt.lock);
	struct inode_mode *im = mode_of(ino);
	int kid = -1;
	if (!im->cached && atomic_load(&pt.active)) {
		struct k_backing_map map = {.fd = fd};
		kid = ioctl(pt.devfd, IOC_BACKING_OPEN, &map);
	}
	if (kid >= 0) {
		im->passed++;
		atomic_fetch_add(&pt.opens, 1);
	} else {
		im->cached++;
	}
	pthread_mutex_unlock(&pt.lock);
	return kid;
}

void pt_release_fd(fuse_ino_t ino, int backing)
{
	pthread_mutex_lock(&pt.lock);
	struct inode_mode *im = mode_of(ino);
	if (backing >= 0) {
		uint32_t kid = (uint32_t)backing;
		if (ioctl(pt.devfd, IOC_BACKING_CLOSE, &kid) != 0)
			dws_log_at(DWS_LOG_WARN, "passthrough: give back backing id %d: %s", backing, strerror(errno));
		if (im->passed)
			im->passed--;
	} else if (im->cached) {
		im->cached--;
	}
	mode_drop_if_idle(im);
	pthread_mutex_unlock(&pt.lock);
}

const char *pt_state(void) { return atomic_load(&pt.state); }
uint64_t pt_opens(void) { return atomic_load(&pt.opens); }
void pt_count_read(void) { atomic_fetch_add(&pt.reads, 1); }
uint64_t pt_daemon_reads(void) { return atomic_load(&pt.reads); }

void pt_detach(void)
{
	/* the kernel gives every backing id back with the connection */
	pthread_mutex_lock(&pt.lock);
	pt.m = NULL;
	free(pt.b);
	free(pt.im);
	pt.b = NULL;
	pt.im = NULL;
	pt.nb = pt.capb = pt.nim = pt.capim = 0;
	free(pt.dir);
	pt.dir = NULL;
	pthread_mutex_unlock(&pt.lock);
}
