/* dwsfs: mount a Delta Weight Sync bucket read-only with libfuse3.
 *
 * The FUSE glue only: every decision lives in the core's mount engine.
 *
 * Inode numbers: 1 the root, 2 steps/, 3 .dwsfs/, 4 .dwsfs/status; every
 * other inode is (view << 63) | (step content id << 24) | tree node. A step's
 * files are immutable, so their inodes keep page cache and attributes for
 * long; the root view (bit 63 set) has inodes of its own so that a root swap
 * never shares cache with steps/N and never counts steps/N use as root use. */
#include "passthrough.h"

#include "dwsfs/dwsfs.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define INO_ROOT 1
#define INO_STEPS 2
#define INO_META 3
#define INO_STATUS 4
#define VIEW_ROOT (1ULL << 63)
#define NODE_BITS 24
#define NODE_MASK ((1ULL << NODE_BITS) - 1)
#define ID_MASK ((1ULL << 39) - 1)

#define IMMUTABLE_TIMEOUT 86400.0

struct opts {
	char *bucket;
	char *mountpoint_arg;
	char *base;
	char *cache_dir;
	char *cache_size;
	char *on_swap;
	int on_swap_keep_secrets;
	char *verify;
	char *map_prefix;
	char *ca_file;
	char *materialize_max;
	char *materialize_dir;
	char *log_level;
	char *log_file;
	double read_timeout;
	double stall_timeout;
	unsigned block_size;
	unsigned poll;
	unsigned info_poll;
	double swap_idle;
	char *swap_max_delay; /* seconds, or "never" */
	unsigned max_steps;
	int read_ahead;
	int show_help;
};

struct handle;

struct fs {
	dws_mount *m;
	pthread_mutex_t handles_lock;
	struct handle *handles; /* every open handle: freed at shutdown if the
				 * kernel never sent their release */
	struct fuse_session *se;
	time_t started;
	double name_timeout; /* root and steps/ names can be re-bound */
	uid_t uid;
	gid_t gid;
};

enum handle_kind { H_FILE, H_STATUS, H_DIR };

struct handle {
	struct handle *prev, *next;
	enum handle_kind kind;
	/* the step opened, or the same step with its runs merged since
	 * (on_merged): written under lock and handles_lock, read as a
	 * reference taken under lock (handle_step) */
	pthread_mutex_t lock;
	dws_step *step;
	size_t file;
	bool root_view;
	/* H_FILE: its inode, step id, and the kernel backing id its reads
	 * pass through to (-1: the daemon serves them) */
	fuse_ino_t ino;
	uint64_t id;
	int backing;
	char *buf; /* status snapshot or directory listing */
	size_t len;
};

static struct fs *fs_of(fuse_req_t req) { return fuse_req_userdata(req); }
static char *status_json(struct fs *f);

/* step: the handle's reference, or NULL */
static struct handle *handle_new(struct fs *f, enum handle_kind kind, dws_step *step)
{
	struct handle *h = calloc(1, sizeof(*h));
	if (!h)
		abort();
	h->kind = kind;
	h->step = step;
	pthread_mutex_init(&h->lock, NULL);
	pthread_mutex_lock(&f->handles_lock);
	h->next = f->handles;
	if (f->handles)
		f->handles->prev = h;
	f->handles = h;
	pthread_mutex_unlock(&f->handles_lock);
	return h;
}

static void handle_free(struct fs *f, struct handle *h)
{
	pthread_mutex_lock(&f->handles_lock);
	if (h->prev)
		h->prev->next = h->next;
	else
		f->handles = h->next;
	if (h->next)
		h->next->prev = h->prev;
	pthread_mutex_unlock(&f->handles_lock);
	if (h->root_view && f->m)
		dws_mount_root_released(f->m);
	if (h->kind == H_FILE)
		pt_release(h->ino, h->id, h->file, h->backing);
	dws_step_unref(h->step);
	pthread_mutex_destroy(&h->lock);
	free(h->buf);
	free(h);
}

static dws_step *handle_step(struct handle *h)
{
	pthread_mutex_lock(&h->lock);
	dws_step *s = dws_step_ref(h->step);
	pthread_mutex_unlock(&h->lock);
	return s;
}

/* Reply with a private copy: once the kernel has the bytes the caller may
 * close and its release free the handle on another worker while this
 * thread is still inside the reply. */
static void reply_copy(fuse_req_t req, const char *p, size_t n)
{
	char *c = malloc(n ? n : 1);
	if (!c)
		return (void)fuse_reply_err(req, ENOMEM);
	memcpy(c, p, n);
	fuse_reply_buf(req, c, n);
	free(c);
}

static fuse_ino_t mk_ino(bool root_view, uint64_t id, uint32_t node)
{
	return (root_view ? VIEW_ROOT : 0) | ((id & ID_MASK) << NODE_BITS) | node;
}

static bool is_step_ino(fuse_ino_t ino) { return (ino & ~VIEW_ROOT) > NODE_MASK; }
static uint64_t ino_id(fuse_ino_t ino) { return (ino & ~VIEW_ROOT) >> NODE_BITS; }
static uint32_t ino_node(fuse_ino_t ino) { return (uint32_t)(ino & NODE_MASK); }
static bool ino_root_view(fuse_ino_t ino) { return (ino & VIEW_ROOT) != 0; }

static int errno_of(int code)
{
	switch (code) {
	case DWS_ENOENT: return ENOENT;
	case DWS_ENOMEM: return ENOMEM;
	case DWS_EINVAL: return EINVAL;
	case DWS_ETIMEDOUT: return EIO;
	default: return EIO;
	}
}

/* The step an inode belongs to (a new reference), or an errno. */
static int step_of(struct fs *f, fuse_ino_t ino, dws_step **out)
{
	dws_error err = {0};
	int rc = dws_mount_get_step_by_id(f->m, ino_id(ino), out, &err);
	if (rc) {
		dws_log_at(DWS_LOG_WARN, "inode %llx: %s", (unsigned long long)ino, err.msg);
		return rc == DWS_ENOENT ? ESTALE : errno_of(rc);
	}
	if (ino_node(ino) >= dws_step_node_count(*out)) {
		dws_step_unref(*out);
		return ESTALE;
	}
	return 0;
}

static void fill_dir(struct fs *f, struct stat *st, fuse_ino_t ino)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = S_IFDIR | 0555;
	st->st_nlink = 2;
	st->st_uid = f->uid;
	st->st_gid = f->gid;
	st->st_mtime = st->st_ctime = st->st_atime = f->started;
}

static void fill_node(struct fs *f, struct stat *st, fuse_ino_t ino, dws_step *s)
{
	const dws_node *n = dws_step_node(s, ino_node(ino));
	fill_dir(f, st, ino);
	if (n->file >= 0) {
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		st->st_size = (off_t)dws_step_file(s, (size_t)n->file)->size;
		st->st_blocks = (st->st_size + 511) / 512;
		st->st_blksize = 1 << 20;
	}
}

static void fill_status(struct fs *f, struct stat *st)
{
	char *j = status_json(f);
	fill_dir(f, st, INO_STATUS);
	st->st_mode = S_IFREG | 0444;
	st->st_nlink = 1;
	st->st_size = (off_t)strlen(j);
	st->st_mtime = time(NULL);
	free(j);
}

static int getattr_of(struct fs *f, fuse_ino_t ino, struct stat *st)
{
	switch (ino) {
	case INO_ROOT:
	case INO_STEPS:
	case INO_META:
		fill_dir(f, st, ino);
		return 0;
	case INO_STATUS:
		fill_status(f, st);
		return 0;
	}
	if (!is_step_ino(ino))
		return ENOENT;
	dws_step *s;
	int e = step_of(f, ino, &s);
	if (e)
		return e;
	fill_node(f, st, ino, s);
	dws_step_unref(s);
	return 0;
}

/* "000012" -> 12; the canonical name only (six digits or more). */
static bool parse_step_dir(const char *name, uint64_t *out)
{
	size_t n = strlen(name);
	if (n < 6 || n > 19 || (n > 6 && name[0] == '0'))
		return false;
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++) {
		if (name[i] < '0' || name[i] > '9')
			return false;
		v = v * 10 + (uint64_t)(name[i] - '0');
	}
	*out = v;
	return true;
}

static void reply_entry(fuse_req_t req, struct fs *f, fuse_ino_t ino, double timeout)
{
	struct fuse_entry_param e;
	memset(&e, 0, sizeof(e));
	int err = getattr_of(f, ino, &e.attr);
	if (err) {
		fuse_reply_err(req, err);
		return;
	}
	e.ino = ino;
	e.attr_timeout = ino == INO_STATUS ? 0 : ino <= INO_META ? f->name_timeout : IMMUTABLE_TIMEOUT;
	e.entry_timeout = timeout;
	fuse_reply_entry(req, &e);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fs *f = fs_of(req);
	if (parent == INO_ROOT) {
		if (!strcmp(name, "steps"))
			return reply_entry(req, f, INO_STEPS, IMMUTABLE_TIMEOUT);
		if (!strcmp(name, ".dwsfs"))
			return reply_entry(req, f, INO_META, IMMUTABLE_TIMEOUT);
		/* root names are never cached by the kernel: every open of a
		 * root file looks it up, so a loader cannot open one shard through
		 * a stale entry of the old step and the next one in the new step */
		dws_step *s = dws_mount_root_lookup(f->m);
		uint32_t n = dws_step_node_lookup(s, 0, name);
		fuse_ino_t ino = mk_ino(true, dws_step_id(s), n);
		dws_step_unref(s);
		if (n == DWS_NODE_NONE)
			return (void)fuse_reply_err(req, ENOENT);
		return reply_entry(req, f, ino, 0);
	}
	if (parent == INO_STEPS) {
		uint64_t step;
		dws_step *s = NULL;
		dws_error err = {0};
		if (!parse_step_dir(name, &step))
			return (void)fuse_reply_err(req, ENOENT);
		int rc = dws_mount_get_step(f->m, step, &s, &err);
		if (rc) {
			if (rc != DWS_ENOENT)
				dws_log_at(DWS_LOG_WARN, "steps/%s: %s", name, err.msg);
			return (void)fuse_reply_err(req, rc == DWS_ENOENT ? ENOENT : errno_of(rc));
		}
		fuse_ino_t ino = mk_ino(false, dws_step_id(s), 0);
		dws_step_unref(s);
		return reply_entry(req, f, ino, f->name_timeout);
	}
	if (parent == INO_META) {
		if (!strcmp(name, "status"))
			return reply_entry(req, f, INO_STATUS, 0);
		return (void)fuse_reply_err(req, ENOENT);
	}
	if (!is_step_ino(parent))
		return (void)fuse_reply_err(req, ENOENT);
	dws_step *s;
	int e = step_of(f, parent, &s);
	if (e)
		return (void)fuse_reply_err(req, e);
	uint32_t n = dws_step_node_lookup(s, ino_node(parent), name);
	fuse_ino_t ino = mk_ino(ino_root_view(parent), dws_step_id(s), n);
	dws_step_unref(s);
	if (n == DWS_NODE_NONE)
		return (void)fuse_reply_err(req, ENOENT);
	reply_entry(req, f, ino, IMMUTABLE_TIMEOUT);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	struct fs *f = fs_of(req);
	struct stat st;
	int e = getattr_of(f, ino, &st);
	if (e)
		return (void)fuse_reply_err(req, e);
	double t = ino == INO_STATUS ? 0 : ino <= INO_META ? f->name_timeout : IMMUTABLE_TIMEOUT;
	fuse_reply_attr(req, &st, t);
}

/* ---- directories ---- */

struct dirbuf {
	char *p;
	size_t len;
};

static void dir_add(fuse_req_t req, struct dirbuf *b, const char *name, fuse_ino_t ino, mode_t mode)
{
	struct stat st = {.st_ino = ino, .st_mode = mode};
	size_t need = fuse_add_direntry(req, NULL, 0, name, NULL, 0);
	b->p = realloc(b->p, b->len + need);
	if (!b->p)
		abort();
	fuse_add_direntry(req, b->p + b->len, need, name, &st, (off_t)(b->len + need));
	b->len += need;
}

/* A name of the mount's own at the root: a model file or folder of that name
 * is shadowed (lookup finds ours), so it is not listed either. */
static bool meta_name(const char *name) { return !strcmp(name, "steps") || !strcmp(name, ".dwsfs"); }

static void add_step_children(fuse_req_t req, struct dirbuf *b, dws_step *s, uint32_t dir, bool root_view)
{
	for (uint32_t c = dws_step_node(s, dir)->child; c != DWS_NODE_NONE; c = dws_step_node(s, c)->next) {
		const dws_node *n = dws_step_node(s, c);
		if (root_view && dir == 0 && meta_name(n->name))
			continue;
		dir_add(req, b, n->name, mk_ino(root_view, dws_step_id(s), c), n->file >= 0 ? S_IFREG : S_IFDIR);
	}
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fs *f = fs_of(req);
	struct dirbuf b = {0};
	dir_add(req, &b, ".", ino, S_IFDIR);
	dir_add(req, &b, "..", INO_ROOT, S_IFDIR);
	if (ino == INO_ROOT) {
		dws_step *s = dws_mount_root(f->m);
		add_step_children(req, &b, s, 0, true);
		dws_step_unref(s);
		dir_add(req, &b, "steps", INO_STEPS, S_IFDIR);
		dir_add(req, &b, ".dwsfs", INO_META, S_IFDIR);
	} else if (ino == INO_STEPS) {
		uint64_t *v;
		size_t n = dws_mount_steps(f->m, &v);
		for (size_t i = 0; i < n; i++) {
			char name[32];
			snprintf(name, sizeof(name), "%06llu", (unsigned long long)v[i]);
			/* the inode is settled by lookup, which builds the step */
			dir_add(req, &b, name, (fuse_ino_t)(v[i] | (1ULL << 62)), S_IFDIR);
		}
		free(v);
	} else if (ino == INO_META) {
		dir_add(req, &b, "status", INO_STATUS, S_IFREG);
	} else if (is_step_ino(ino)) {
		dws_step *s;
		int e = step_of(f, ino, &s);
		if (e) {
			free(b.p);
			return (void)fuse_reply_err(req, e);
		}
		if (dws_step_node(s, ino_node(ino))->file >= 0) {
			dws_step_unref(s);
			free(b.p);
			return (void)fuse_reply_err(req, ENOTDIR);
		}
		add_step_children(req, &b, s, ino_node(ino), ino_root_view(ino));
		dws_step_unref(s);
	} else {
		free(b.p);
		return (void)fuse_reply_err(req, ENOENT);
	}
	struct handle *h = handle_new(f, H_DIR, NULL);
	h->buf = b.p;
	h->len = b.len;
	fi->fh = (uintptr_t)h;
	fi->cache_readdir = ino != INO_ROOT && ino != INO_STEPS;
	fi->keep_cache = fi->cache_readdir;
	if (fuse_reply_open(req, fi) == -ENOENT) /* interrupted: no release will come */
		handle_free(f, h);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	struct handle *h = (struct handle *)(uintptr_t)fi->fh;
	if ((size_t)off >= h->len)
		return (void)fuse_reply_buf(req, NULL, 0);
	/* entries are whole: cut at the last one that fits */
	size_t end = (size_t)off, lim = (size_t)off + size;
	while (end < h->len) {
		const char *p = h->buf + end;
		size_t reclen;
		/* struct fuse_dirent: ino, off, namelen, type, name padded to 8 */
		uint32_t namelen;
		memcpy(&namelen, p + 16, 4);
		reclen = (24 + namelen + 7) & ~(size_t)7;
		if (end + reclen > lim)
			break;
		end += reclen;
	}
	reply_copy(req, h->buf + off, end - (size_t)off);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	handle_free(fs_of(req), (struct handle *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

/* ---- files ---- */

/* The core's status with the FUSE layer's own fields. */
static char *status_json(struct fs *f)
{
	dws_status_field extra[] = {
		{"passthrough", pt_state(), 0},
		{"passthrough_opens", NULL, (int64_t)pt_opens()},
		{"daemon_reads", NULL, (int64_t)pt_daemon_reads()},
	};
	return dws_mount_status_json(f->m, extra, sizeof(extra) / sizeof(extra[0]));
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fs *f = fs_of(req);
	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		return (void)fuse_reply_err(req, EROFS);
	if (ino == INO_STATUS) {
		struct handle *h = handle_new(f, H_STATUS, NULL);
		h->buf = status_json(f);
		h->len = strlen(h->buf);
		fi->direct_io = 1;
		fi->fh = (uintptr_t)h;
		if (fuse_reply_open(req, fi) == -ENOENT)
			handle_free(f, h);
		return;
	}
	if (!is_step_ino(ino))
		return (void)fuse_reply_err(req, ino <= INO_META ? EISDIR : ENOENT);
	dws_step *s;
	int e = step_of(f, ino, &s);
	if (e)
		return (void)fuse_reply_err(req, e);
	const dws_node *n = dws_step_node(s, ino_node(ino));
	if (n->file < 0) {
		dws_step_unref(s);
		return (void)fuse_reply_err(req, EISDIR);
	}
	struct handle *h = handle_new(f, H_FILE, s);
	h->file = (size_t)n->file;
	h->root_view = ino_root_view(ino);
	h->ino = ino;
	h->id = dws_step_id(s);
	/* a materialized step's file: the kernel reads its backing file */
	h->backing = pt_open(ino, h->id, h->file);
	if (h->root_view)
		dws_mount_root_opened(f->m);
	fi->fh = (uintptr_t)h;
	fi->keep_cache = 1; /* the inode's bytes never change */
	fi->noflush = 1;
	if (pt_reply_open(req, fi, h->backing) == -ENOENT) /* interrupted: no release will come */
		handle_free(f, h);
}

/* The kernel reads ahead 128 KiB on a FUSE mount unless told otherwise:
 * one request per 128 KiB. Once FUSE_INIT is through (a stat of the mount
 * root waits for it), set the mount's bdi read_ahead_kb. Needs root; without
 * it the default stays. */
struct ra_arg {
	char *mnt;
	int kb;
};

static void *read_ahead_main(void *v)
{
	struct ra_arg *a = v;
	struct stat st;
	if (stat(a->mnt, &st) == 0) {
		char path[96];
		snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb", major(st.st_dev), minor(st.st_dev));
		FILE *f = fopen(path, "w");
		if (f) {
			fprintf(f, "%d\n", a->kb);
			if (fclose(f) != 0)
				dws_log_at(DWS_LOG_WARN, "read_ahead: %s: %s", path, strerror(errno));
		}
	}
	free(a->mnt);
	free(a);
	return NULL;
}

static void set_read_ahead(const char *mnt, int kb)
{
	struct ra_arg *a = malloc(sizeof(*a));
	pthread_t t;
	if (!a || !(a->mnt = realpath(mnt, NULL))) {
		free(a);
		return;
	}
	a->kb = kb;
	if (pthread_create(&t, NULL, read_ahead_main, a) != 0) {
		free(a->mnt);
		free(a);
		return;
	}
	pthread_detach(t);
}

/* One read buffer per worker thread, kept for the thread's life (freed when
 * it exits): a fresh buffer per read would fault its pages in every time. */
struct rbuf {
	char *p;
	size_t cap;
};
static pthread_key_t rbuf_key;
static pthread_once_t rbuf_once = PTHREAD_ONCE_INIT;

static void rbuf_free(void *v)
{
	struct rbuf *b = v;
	free(b->p);
	free(b);
}

static void rbuf_init(void) { pthread_key_create(&rbuf_key, rbuf_free); }

static char *read_buffer(size_t size)
{
	pthread_once(&rbuf_once, rbuf_init);
	struct rbuf *b = pthread_getspecific(rbuf_key);
	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b || pthread_setspecific(rbuf_key, b) != 0) {
			free(b);
			return NULL;
		}
	}
	if (size > b->cap || !b->p) {
		/* page aligned, as the page cache pages the kernel copies the
		 * reply into (with malloc's buffer that copy once took 2.5x the
		 * time; tests/bench/memfs MEMFS_SKEW later showed the offset in a
		 * page costs nothing here, so its pages were the likelier cause) */
		free(b->p);
		b->p = NULL;
		b->cap = size ? size : 1;
		if (posix_memalign((void **)&b->p, 4096, b->cap) != 0) {
			b->p = NULL;
			b->cap = 0;
		}
	}
	return b->p;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	struct handle *h = (struct handle *)(uintptr_t)fi->fh;
	if (h->kind == H_STATUS) {
		if ((size_t)off >= h->len)
			return (void)fuse_reply_buf(req, NULL, 0);
		size_t n = h->len - (size_t)off < size ? h->len - (size_t)off : size;
		return reply_copy(req, h->buf + off, n);
	}
	pt_count_read();
	char *buf = read_buffer(size);
	if (!buf)
		return (void)fuse_reply_err(req, ENOMEM);
	dws_error err = {0};
	/* unpatched bytes the block cache holds are sent from there: no copy */
	struct iovec iov[32];
	dws_pin pins[32];
	size_t niov = sizeof(iov) / sizeof(iov[0]), npins = 0;
	/* the iov may point into the step's memory: held until replied */
	dws_step *s = handle_step(h);
	int64_t n = dws_step_read_iov(s, h->file, (uint64_t)off, buf, size, iov, &niov, pins, &npins, &err);
	if (n < 0) {
		dws_log_at(DWS_LOG_ERROR, "read %s [%lld, +%zu) of step %llu failed: %s", dws_step_file(s, h->file)->path, (long long)off, size,
			(unsigned long long)dws_step_number(s), err.msg);
		fuse_reply_err(req, EIO);
		dws_step_unref(s);
		return;
	}
	if (niov)
		fuse_reply_iov(req, iov, (int)niov);
	else
		fuse_reply_buf(req, NULL, 0);
	for (size_t k = 0; k < npins; k++)
		dws_pin_release(&pins[k]);
	dws_step_unref(s);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	handle_free(fs_of(req), (struct handle *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

/* ---- extended attributes ---- */

static void xattr_reply(fuse_req_t req, const char *v, size_t len, size_t size)
{
	if (!size)
		return (void)fuse_reply_xattr(req, len);
	if (size < len)
		return (void)fuse_reply_err(req, ERANGE);
	fuse_reply_buf(req, v, len);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct fs *f = fs_of(req);
	if (!is_step_ino(ino))
		return (void)fuse_reply_err(req, ENODATA);
	dws_step *s;
	int e = step_of(f, ino, &s);
	if (e)
		return (void)fuse_reply_err(req, e);
	char v[64] = "";
	if (!strcmp(name, "user.dwsfs.step"))
		snprintf(v, sizeof(v), "%llu", (unsigned long long)dws_step_number(s));
	else if (!strcmp(name, "user.dwsfs.anchor"))
		snprintf(v, sizeof(v), "%llu", (unsigned long long)dws_step_anchor(s));
	else if (!strcmp(name, "user.dwsfs.state_xxh3"))
		dws_mount_step_checksum(f->m, dws_step_number(s), v);
	dws_step_unref(s);
	if (!v[0])
		return (void)fuse_reply_err(req, ENODATA);
	xattr_reply(req, v, strlen(v), size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	struct fs *f = fs_of(req);
	if (!is_step_ino(ino))
		return xattr_reply(req, "", 0, size);
	dws_step *s;
	int e = step_of(f, ino, &s);
	if (e)
		return (void)fuse_reply_err(req, e);
	char sum[17];
	dws_mount_step_checksum(f->m, dws_step_number(s), sum);
	dws_step_unref(s);
	static const char names[] = "user.dwsfs.step\0user.dwsfs.anchor\0user.dwsfs.state_xxh3";
	size_t len = sum[0] ? sizeof(names) : sizeof("user.dwsfs.step\0user.dwsfs.anchor");
	xattr_reply(req, names, len, size);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino;
	struct statvfs st = {.f_bsize = 1 << 20, .f_frsize = 1 << 20, .f_namemax = 255};
	fuse_reply_statfs(req, &st);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	if (conn->capable & FUSE_CAP_ASYNC_READ)
		conn->want |= FUSE_CAP_ASYNC_READ;
	/* attributes and data of an inode never change: no revalidation */
	conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static const struct fuse_lowlevel_ops ops = {
	.init = op_init,
	.lookup = op_lookup,
	.getattr = op_getattr,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.releasedir = op_releasedir,
	.open = op_open,
	.read = op_read,
	.release = op_release,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.statfs = op_statfs,
};

/* After a swap (called by the sync thread, holding no lock): drop the
 * kernel's root entries of both steps so the next lookup sees the new one. */
static void on_swapped(void *ctx, dws_step *old_root, dws_step *new_root)
{
	struct fs *f = ctx;
	if (!f->se)
		return;
	dws_step *both[2] = {old_root, new_root};
	for (int k = 0; k < 2; k++)
		for (uint32_t c = dws_step_node(both[k], 0)->child; c != DWS_NODE_NONE; c = dws_step_node(both[k], c)->next) {
			const char *name = dws_step_node(both[k], c)->name;
			int r = fuse_lowlevel_notify_inval_entry(f->se, INO_ROOT, name, strlen(name));
			if (r && r != -ENOENT)
				dws_log_at(DWS_LOG_WARN, "invalidate /%s: %s", name, strerror(-r));
		}
	fuse_lowlevel_notify_inval_inode(f->se, INO_ROOT, 0, 0);
}

/* After a merge (called by the compaction thread, holding no lock): open
 * files of that step move to the merged object, the same bytes, so the
 * runs it replaced are freed now, not when the files close (a server that
 * keeps the model's files open or mapped would hold them for good). */
static void on_merged(void *ctx, dws_step *s)
{
	struct fs *f = ctx;
	uint64_t id = dws_step_id(s);
	size_t n = 0, cap = 0;
	dws_step **drop = NULL;
	pthread_mutex_lock(&f->handles_lock);
	for (struct handle *h = f->handles; h; h = h->next) {
		if (!h->step || h->step == s || dws_step_id(h->step) != id)
			continue;
		if (n == cap) {
			size_t nc = cap ? 2 * cap : 16;
			dws_step **d = realloc(drop, nc * sizeof(*d));
			if (!d)
				break; /* those left keep their object: only memory */
			drop = d;
			cap = nc;
		}
		pthread_mutex_lock(&h->lock);
		drop[n++] = h->step;
		h->step = dws_step_ref(s);
		pthread_mutex_unlock(&h->lock);
	}
	pthread_mutex_unlock(&f->handles_lock);
	for (size_t i = 0; i < n; i++)
		dws_step_unref(drop[i]);
	free(drop);
}

/* ---- options ---- */

#define OPT(t, p) {t, offsetof(struct opts, p), 1}
static const struct fuse_opt opt_spec[] = {
	OPT("base=%s", base),
	OPT("cache_dir=%s", cache_dir),
	OPT("cache_size=%s", cache_size),
	OPT("on_swap=%s", on_swap),
	OPT("on_swap_keep_secrets", on_swap_keep_secrets),
	OPT("verify=%s", verify),
	OPT("map_prefix=%s", map_prefix),
	OPT("poll=%u", poll),
	OPT("info_poll=%u", info_poll),
	OPT("swap_idle=%lf", swap_idle),
	OPT("swap_max_delay=%s", swap_max_delay),
	OPT("max_steps=%u", max_steps),
	OPT("read_ahead=%d", read_ahead),
	OPT("ca_file=%s", ca_file),
	OPT("read_timeout=%lf", read_timeout),
	OPT("stall_timeout=%lf", stall_timeout),
	OPT("block_size=%u", block_size),
	OPT("materialize_max=%s", materialize_max),
	OPT("materialize_dir=%s", materialize_dir),
	OPT("log_level=%s", log_level),
	OPT("log_file=%s", log_file),
	OPT("-h", show_help),
	OPT("--help", show_help),
	FUSE_OPT_END};

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	(void)outargs;
	struct opts *o = data;
	if (key == FUSE_OPT_KEY_NONOPT && !o->bucket) {
		o->bucket = strdup(arg);
		return 0;
	}
	if (key == FUSE_OPT_KEY_NONOPT && !o->mountpoint_arg) {
		o->mountpoint_arg = strdup(arg);
		return 1; /* fuse_parse_cmdline takes it too */
	}
	return 1;
}

static void usage(const char *prog)
{
	printf("usage: %s [-f] [-d] [-o OPTIONS] BUCKET MOUNTPOINT\n\n"
	       "BUCKET: a local folder, hf://buckets/NS/NAME[/PREFIX] or s3://BUCKET[/PREFIX].\n"
	       "dwsfs options:\n"
	       "    -o base=SRC            base model folder (default: the bucket's base/)\n"
	       "    -o poll=SECONDS        how often to look for new steps (default 1; remote 6)\n"
	       "    -o info_poll=SECONDS   remote: bucket-info probe for anything else (default 60)\n"
	       "    -o swap_idle=SECONDS   swap the root after it was idle this long (default 1)\n"
	       "    -o swap_max_delay=SECONDS  swap anyway this long after a step is ready, even with\n"
	       "                           root files open (default 30); never: wait for them to close\n"
	       "    -o on_swap=CMD         run `sh -c CMD` after a swap (DWSFS_STEP, DWSFS_MOUNT set;\n"
	       "                           HF_TOKEN and AWS_* keys removed unless on_swap_keep_secrets)\n"
	       "    -o verify=MODE         none, payload or state (default state)\n"
	       "    -o map_prefix=FROM=TO  trainer name prefix FROM is TO in the checkpoint\n"
	       "    -o max_steps=N         step views kept in memory for steps/ (default 8)\n"
	       "    -o read_ahead=KB       the kernel's readahead for this mount (default 1024; 0: leave it)\n"
	       "    -o cache_dir=DIR       where decompressed anchors and fetched blocks go\n"
	       "    -o cache_size=BYTES    byte cap of the block cache (K, M, G suffixes; default 16G;\n"
	       "                           0: no disk cache, blocks kept in memory only)\n"
	       "    -o read_timeout=SECONDS  a read not served by then fails with EIO (default 60)\n"
	       "    -o stall_timeout=SECONDS a transfer that sends nothing this long is retried (default 10)\n"
	       "    -o ca_file=FILE        extra CA bundle for TLS (verification is always on)\n"
	       "    -o block_size=BYTES    fetch unit of remote objects (default 8 MiB)\n"
	       "    -o materialize_max=BYTES  write the root step's files whole to materialize_dir when\n"
	       "                           the step is at most this big and its sources are local, and\n"
	       "                           let the kernel read them directly (FUSE passthrough, root,\n"
	       "                           Linux 6.9+; default 4G; 0: never)\n"
	       "    -o materialize_dir=DIR where (default cache_dir, else $TMPDIR, else /var/tmp)\n"
	       "    -o log_level=LEVEL     error, warn, info (default) or debug\n"
	       "    -o log_file=PATH       append the log here (reopened on SIGHUP); default: stderr in\n"
	       "                           the foreground, syslog in the background (stderr without one)\n"
	       "\n",
	       prog);
}

/* "16G", "512M", "1048576" -> bytes; false if it does not parse. */
static bool parse_size(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (end == s || errno || s[0] == '-')
		return false;
	int shift = 0;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (*end == 'i' || *end == 'B')
		end += *end == 'i' ? (end[1] == 'B' ? 2 : 1) : 1;
	if (*end || (shift && v > (UINT64_MAX >> shift)))
		return false;
	*out = (uint64_t)v << shift;
	return true;
}

/* statfs always reaches the FUSE connection (stat may be answered from
 * cached attributes): ENOTCONN means the daemon behind the mount is gone. */
static bool mounted_stale(const char *mp)
{
	struct statvfs sv;
	return statvfs(mp, &sv) != 0 && errno == ENOTCONN;
}

/* A daemon killed with -9 leaves "Transport endpoint is not connected":
 * detach that mount so a new one can take its place. */
static void clean_stale_mount(const char *mp)
{
	if (!mounted_stale(mp))
		return;
	dws_log_at(DWS_LOG_WARN, "%s: cleaning the stale mount of a daemon that died", mp);
	if (umount2(mp, MNT_DETACH) == 0)
		return;
	pid_t pid = fork();
	if (pid == 0) {
		execlp("fusermount3", "fusermount3", "-u", "-z", mp, (char *)NULL);
		_exit(127);
	}
	if (pid > 0)
		waitpid(pid, NULL, 0);
}

/* Going to the background the way a daemon with threads must: fork before
 * anything starts a thread (the bucket's prefetch threads, libcurl's
 * resolver), not after; fuse_daemonize() forks late, and a child keeps none
 * of its parent's threads. The parent waits for the child to say the mount
 * is up and exits 0, or exits 1 when the child died first (its one-line
 * error went to the terminal, which the child keeps until then). Returns
 * the write end of the pipe the child reports on, or -1. */
static int daemon_start(void)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) != 0) {
		fprintf(stderr, "dwsfs: pipe: %s\n", strerror(errno));
		return -1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		fprintf(stderr, "dwsfs: fork: %s\n", strerror(errno));
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid > 0) {
		close(p[1]);
		char c = 0;
		ssize_t n;
		do
			n = read(p[0], &c, 1);
		while (n < 0 && errno == EINTR);
		_exit(n == 1 ? 0 : 1);
	}
	close(p[0]);
	if (setsid() < 0)
		fprintf(stderr, "dwsfs: setsid: %s\n", strerror(errno));
	return p[1];
}

/* Where a daemon without syslog (a container) and without -o log_file logs:
 * its stderr is its parent's (mount(8), a shell pipe), which waits for it
 * to close. */
static char *default_log_file(void)
{
	char *p = NULL;
	const char *st = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
	if (geteuid() == 0)
		p = strdup("/var/log/dwsfs.log");
	else if (st && *st)
		(void)!asprintf(&p, "%s/dwsfs.log", st);
	else if (home && *home)
		(void)!asprintf(&p, "%s/.local/state/dwsfs.log", home);
	return p;
}

/* The child is mounted and serving: logs go to the log file or syslog (a
 * default file where there is no syslog, said once on the terminal), stdio
 * to /dev/null, and the parent may exit. */
static void daemon_ready(int fd, bool log_file)
{
	bool logged = log_file || dws_log_to_syslog("dwsfs");
	if (!logged) {
		char *path = default_log_file();
		dws_error e = {0};
		logged = path && dws_log_to_file(path, &e) == 0;
		if (logged)
			fprintf(stderr, "dwsfs: no syslog socket (/dev/log): logging to %s (-o log_file= sets another)\n", path);
		else
			fprintf(stderr, "dwsfs: no syslog socket (/dev/log) and %s: the log is lost; set -o log_file=\n",
				path ? e.msg : "no HOME for a log file");
		free(path);
	}
	int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (nul >= 0) {
		dup2(nul, 0);
		dup2(nul, 1);
		dup2(nul, 2);
		if (nul > 2)
			close(nul);
	}
	char c = 1;
	ssize_t n;
	do
		n = write(fd, &c, 1);
	while (n < 0 && errno == EINTR);
	close(fd);
}

static void on_sighup(int sig)
{
	(void)sig;
	dws_log_reopen();
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct opts o = {.swap_idle = -1, .read_ahead = 1024};
	struct fuse_cmdline_opts co = {0};
	struct fs f = {.started = time(NULL), .name_timeout = 1.0, .uid = getuid(), .gid = getgid(),
		       .handles_lock = PTHREAD_MUTEX_INITIALIZER};
	dws_mount *m = NULL;
	struct fuse_session *se = NULL;
	struct fuse_loop_config *lc = NULL;
	char *mat_dir = NULL; /* where materialized steps go, absolute */
	char *mnt_abs = NULL;
	dws_error err = {0};

	/* Patch arrays (megabytes each) are freed on one thread as merged ones
	 * come from another: with glibc's sliding mmap threshold they land in
	 * heaps that keep the pages, and a mount's first merge held the old
	 * and the new side by side (~0.4 GB more peak RSS for the 0.6B model).
	 * A fixed threshold makes each large array its own mapping, unmapped
	 * when freed. */
	mallopt(M_MMAP_THRESHOLD, 256 * 1024);
	int ret = 1, ready_fd = -1;

	if (fuse_opt_parse(&args, &o, opt_spec, opt_proc) != 0)
		return 1;
	if (o.show_help) {
		usage(argv[0]);
		fuse_lowlevel_help();
		ret = 0;
		goto out_args;
	}
	if (fuse_parse_cmdline(&args, &co) != 0)
		goto out_args;
	if (co.show_version) {
		printf("dwsfs %s, libfuse %s\n", DWSFS_VERSION, fuse_pkgversion());
		ret = 0;
		goto out_args;
	}
	if (!o.bucket || !co.mountpoint) {
		fprintf(stderr, "dwsfs: usage: dwsfs [-f] [-o OPTIONS] BUCKET MOUNTPOINT (dwsfs -h for options)\n");
		goto out_args;
	}
	dws_prefix_map map = {0};
	if (o.map_prefix) {
		char *eq = strchr(o.map_prefix, '=');
		if (!eq || eq == o.map_prefix) {
			fprintf(stderr, "dwsfs: map_prefix needs FROM=TO, not '%s'\n", o.map_prefix);
			goto out_args;
		}
		*eq = 0;
		map = (dws_prefix_map){o.map_prefix, eq + 1};
	}
	dws_bucket_opts bo = {.cache_dir = o.cache_dir, .ca_file = o.ca_file, .block_size = o.block_size,
			      .read_deadline_ms = o.read_timeout > 0 ? (unsigned)(o.read_timeout * 1000) : 0,
			      .stall_timeout_ms = o.stall_timeout > 0 ? (unsigned)(o.stall_timeout * 1000) : 0};
	if (o.block_size && (o.block_size < 4096 || o.block_size > (1u << 30) || o.block_size % 4096)) {
		fprintf(stderr, "dwsfs: block_size is a multiple of 4096 from 4096 to 1 GiB, not %u\n", o.block_size);
		goto out_args;
	}
	if (o.cache_size && !parse_size(o.cache_size, &bo.cache_size)) {
		fprintf(stderr, "dwsfs: cache_size takes bytes (K, M, G suffixes), not '%s'\n", o.cache_size);
		goto out_args;
	}
	bo.memory_cache = o.cache_size && bo.cache_size == 0; /* cache_size=0: no disk cache */
	uint64_t mat_max = 4ull << 30;
	if (o.materialize_max && !parse_size(o.materialize_max, &mat_max)) {
		fprintf(stderr, "dwsfs: materialize_max takes bytes (K, M, G suffixes), not '%s'\n", o.materialize_max);
		goto out_args;
	}
	/* absolute: the daemon works from / */
	const char *mat_want = o.materialize_dir ? o.materialize_dir : o.cache_dir ? o.cache_dir
			     : getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	mat_dir = realpath(mat_want, NULL);
	if (!mat_dir && o.materialize_dir && mat_max) {
		fprintf(stderr, "dwsfs: materialize_dir %s: %s\n", o.materialize_dir, strerror(errno));
		goto out_args;
	}
	if (!mat_dir && mat_want[0] != '/') { /* cache_dir, made later */
		char cwd[PATH_MAX];
		if (getcwd(cwd, sizeof(cwd)) && asprintf(&mat_dir, "%s/%s", cwd, mat_want) < 0)
			mat_dir = NULL;
	}
	if (!mat_dir)
		mat_dir = strdup(mat_want);
	mnt_abs = realpath(co.mountpoint, NULL);
	if (!mnt_abs)
		mnt_abs = strdup(co.mountpoint);
	double max_delay = -1; /* -1: the default, -2: never */
	if (o.swap_max_delay && !strcmp(o.swap_max_delay, "never")) {
		max_delay = -2;
	} else if (o.swap_max_delay) {
		char *end;
		max_delay = strtod(o.swap_max_delay, &end);
		if (end == o.swap_max_delay || *end || !(max_delay >= 0 && max_delay <= 86400)) {
			fprintf(stderr, "dwsfs: swap_max_delay takes seconds (0 to 86400) or never, not '%s'\n", o.swap_max_delay);
			goto out_args;
		}
	}
	dws_mount_opts mo;
	dws_mount_opts_init(&mo);
	mo.bucket = o.bucket;
	mo.bucket_opts = &bo;
	mo.base = o.base;
	mo.maps = o.map_prefix ? &map : NULL;
	mo.nmaps = o.map_prefix ? 1 : 0;
	if (o.poll)
		mo.poll_ms = (int64_t)o.poll * 1000;
	if (o.info_poll)
		mo.info_poll_ms = (int64_t)o.info_poll * 1000;
	if (o.swap_idle >= 0)
		mo.swap_idle_ms = (int64_t)(o.swap_idle * 1000);
	if (max_delay != -1)
		mo.swap_max_delay_ms = max_delay == -2 ? -1 : (int64_t)(max_delay * 1000);
	if (o.max_steps)
		mo.max_steps = o.max_steps;
	mo.tmpdir = o.cache_dir;
	mo.on_swap = o.on_swap;
	mo.on_swap_keep_secrets = o.on_swap_keep_secrets;
	mo.mountpoint = mnt_abs;
	mo.swapped = on_swapped;
	mo.merged = on_merged;
	mo.ctx = &f;
	if (o.verify) {
		if (!strcmp(o.verify, "none"))
			mo.verify = DWS_VERIFY_NONE;
		else if (!strcmp(o.verify, "payload"))
			mo.verify = DWS_VERIFY_PAYLOAD;
		else if (!strcmp(o.verify, "state"))
			mo.verify = DWS_VERIFY_STATE;
		else {
			fprintf(stderr, "dwsfs: verify is none, payload or state, not '%s'\n", o.verify);
			goto out_args;
		}
	}
	if (o.log_level) {
		dws_log_level lv;
		if (!dws_log_level_parse(o.log_level, &lv)) {
			fprintf(stderr, "dwsfs: log_level is error, warn, info or debug, not '%s'\n", o.log_level);
			goto out_args;
		}
		dws_log_set_level(lv);
	}
	if (o.log_file && dws_log_to_file(o.log_file, &err) != 0) {
		fprintf(stderr, "dwsfs: %s\n", err.msg);
		goto out_args;
	}
	if (!co.foreground && (ready_fd = daemon_start()) < 0)
		goto out_args;
	clean_stale_mount(co.mountpoint);
	if (dws_mount_open(&mo, &m, &err) != 0) {
		fprintf(stderr, "dwsfs: %s\n", err.msg);
		goto out_args;
	}
	f.m = m;
	/* a read-only mount named after the bucket */
	char *fsname = NULL;
	if (asprintf(&fsname, "-osubtype=dwsfs,ro,fsname=%s", o.bucket) < 0 || fuse_opt_add_arg(&args, fsname) != 0) {
		free(fsname);
		goto out_mount;
	}
	free(fsname);
	se = fuse_session_new(&args, &ops, sizeof(ops), &f);
	if (!se)
		goto out_mount;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_session;
	/* libfuse ends the session on SIGHUP: here it reopens the log file */
	struct sigaction hup = {.sa_handler = on_sighup};
	sigemptyset(&hup.sa_mask);
	sigaction(SIGHUP, &hup, NULL);
	if (fuse_session_mount(se, co.mountpoint) != 0)
		goto out_signals;
	f.se = se;
	if (pt_attach(se, m, mat_max > 0 && mat_dir, mat_dir, mat_max) != 0)
		dws_log_at(DWS_LOG_WARN, "passthrough off: libfuse refused custom I/O");
	if (dws_mount_start(m, &err) != 0) {
		fprintf(stderr, "dwsfs: %s\n", err.msg);
		goto out_unmount;
	}
	if (chdir("/") != 0)
		dws_log_at(DWS_LOG_WARN, "chdir /: %s", strerror(errno));
	if (ready_fd >= 0) {
		daemon_ready(ready_fd, o.log_file != NULL);
		ready_fd = -1;
	}
	if (o.read_ahead > 0)
		set_read_ahead(co.mountpoint, o.read_ahead);
	dws_step *r = dws_mount_root(m);
	dws_log("mounted %s on %s: step %llu", o.bucket, co.mountpoint, (unsigned long long)dws_step_number(r));
	dws_step_unref(r);
	if (co.singlethread) {
		ret = fuse_session_loop(se);
	} else {
		lc = fuse_loop_cfg_create();
		fuse_loop_cfg_set_clone_fd(lc, co.clone_fd);
		fuse_loop_cfg_set_max_threads(lc, co.max_threads ? co.max_threads : 16);
		ret = fuse_session_loop_mt(se, lc);
		fuse_loop_cfg_destroy(lc);
	}
	/* A signal ends the loop with its number: a clean shutdown. So does
	 * ECONNABORTED: the kernel tearing the connection down after a lazy
	 * unmount once the last open file closed, which it reports as either
	 * ENODEV (libfuse's clean end) or this, depending on a race. */
	if (ret == -ECONNABORTED) {
		dws_log("the kernel closed the connection: unmounted");
		ret = 0;
	}
	ret = ret < 0 ? 1 : 0;
	/* handles whose release never came (lazy unmount with open files,
	 * a signal before the kernel's asynchronous releases) */
	f.m = NULL;
	while (f.handles)
		handle_free(&f, f.handles);
	pt_detach();
	dws_mount_close(m); /* stop the sync thread before the session goes */
	m = NULL;
	dws_log("unmounted %s", co.mountpoint);
out_unmount:
	f.se = NULL;
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out_mount:
	dws_mount_close(m);
out_args:
	free(co.mountpoint);
	free(o.bucket);
	free(o.mountpoint_arg);
	free(o.base);
	free(o.cache_dir);
	free(o.cache_size);
	free(o.on_swap);
	free(o.verify);
	free(o.map_prefix);
	free(o.ca_file);
	free(o.materialize_max);
	free(o.swap_max_delay);
	free(o.log_level);
	free(o.log_file);
	free(mat_dir);
	free(mnt_abs);
	free(o.materialize_dir);
	fuse_opt_free_args(&args);
	return ret;
}
