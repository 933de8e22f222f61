/* The FUSE operations: the glue only, every decision lives in the core's
 * mount engine. Inode numbers: fs/inodes.h. */
#include "fs.h"
#include "inodes.h"
#include "notify.h"
#include "passthrough.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define IMMUTABLE_TIMEOUT 86400.0

static struct fs *fs_of(fuse_req_t req) { return fuse_req_userdata(req); }
static char *status_json(struct fs *f);

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
	uint64_t id;
	if (!ino_id(ino, &id))
		return ESTALE;
	int rc = dws_mount_get_step_by_id(f->m, id, out, &err);
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

/* The patch from step `from` to `to` (a new reference), or an errno. */
static int patch_of(struct fs *f, uint64_t from, uint64_t to, dws_patchfile **out)
{
	dws_error err = {0};
	int rc = dws_mount_patch(f->m, from, to, out, &err);
	if (rc && rc != DWS_ENOENT && rc != DWS_EINVAL)
		dws_log_at(DWS_LOG_WARN, "patch %llu-%llu: %s", (unsigned long long)from, (unsigned long long)to, err.msg);
	return rc ? errno_of(rc) : 0;
}

static int patch_attr(struct fs *f, struct stat *st, fuse_ino_t ino, uint64_t from, uint64_t to)
{
	dws_patchfile *p;
	int e = patch_of(f, from, to, &p);
	if (e)
		return e;
	fill_dir(f, st, ino);
	st->st_mode = S_IFREG | 0444;
	st->st_nlink = 1;
	st->st_size = (off_t)dws_patchfile_size(p);
	st->st_blocks = (st->st_size + 511) / 512;
	dws_patchfile_unref(p);
	return 0;
}

/* "000012-000014.safetensors" -> 12, 14 */
static bool parse_patch_name(const char *name, uint64_t *from, uint64_t *to)
{
	const char *dash = strchr(name, '-'), *suf = ".safetensors";
	size_t n = strlen(name), sl = strlen(suf);
	if (!dash || n <= sl || strcmp(name + n - sl, suf) || (size_t)(dash - name) >= 24 || n - sl - (size_t)(dash - name) - 1 >= 24)
		return false;
	char a[24], b[24];
	snprintf(a, sizeof(a), "%.*s", (int)(dash - name), name);
	snprintf(b, sizeof(b), "%.*s", (int)(n - sl - (size_t)(dash - name) - 1), dash + 1);
	return dws_parse_step_dir(a, from) && dws_parse_step_dir(b, to);
}

static int getattr_of(struct fs *f, fuse_ino_t ino, struct stat *st)
{
	switch (ino) {
	case INO_ROOT:
	case INO_STEPS:
	case INO_META:
	case INO_PATCHES:
		fill_dir(f, st, ino);
		return 0;
	case INO_STATUS:
		fill_status(f, st);
		return 0;
	}
	uint64_t from, to;
	if (ino_patch_steps(ino, &from, &to))
		return patch_attr(f, st, ino, from, to);
	if (!ino_is_step(ino))
		return ENOENT;
	dws_step *s;
	int e = step_of(f, ino, &s);
	if (e)
		return e;
	fill_node(f, st, ino, s);
	dws_step_unref(s);
	return 0;
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
	e.attr_timeout = ino == INO_STATUS ? 0 : ino <= INO_PATCHES || !ino_is_step(ino) ? f->name_timeout : IMMUTABLE_TIMEOUT;
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
		fuse_ino_t ino = ino_make(true, dws_step_id(s), n);
		dws_step_unref(s);
		if (n == DWS_NODE_NONE)
			return (void)fuse_reply_err(req, ENOENT);
		return reply_entry(req, f, ino, 0);
	}
	if (parent == INO_STEPS) {
		uint64_t step;
		dws_step *s = NULL;
		dws_error err = {0};
		if (!dws_parse_step_dir(name, &step))
			return (void)fuse_reply_err(req, ENOENT);
		int rc = dws_mount_get_step(f->m, step, &s, &err);
		if (rc) {
			if (rc != DWS_ENOENT)
				dws_log_at(DWS_LOG_WARN, "steps/%s: %s", name, err.msg);
			return (void)fuse_reply_err(req, rc == DWS_ENOENT ? ENOENT : errno_of(rc));
		}
		fuse_ino_t ino = ino_make(false, dws_step_id(s), 0);
		dws_step_unref(s);
		return reply_entry(req, f, ino, f->name_timeout);
	}
	if (parent == INO_META) {
		if (!strcmp(name, "status"))
			return reply_entry(req, f, INO_STATUS, 0);
		if (!strcmp(name, "patches"))
			return reply_entry(req, f, INO_PATCHES, IMMUTABLE_TIMEOUT);
		return (void)fuse_reply_err(req, ENOENT);
	}
	if (parent == INO_PATCHES) {
		uint64_t from, to;
		if (!parse_patch_name(name, &from, &to))
			return (void)fuse_reply_err(req, ENOENT);
		return reply_entry(req, f, ino_patch(from, to), f->name_timeout);
	}
	if (!ino_is_step(parent))
		return (void)fuse_reply_err(req, ENOENT);
	dws_step *s;
	int e = step_of(f, parent, &s);
	if (e)
		return (void)fuse_reply_err(req, e);
	uint32_t n = dws_step_node_lookup(s, ino_node(parent), name);
	fuse_ino_t ino = ino_make(ino_root_view(parent), dws_step_id(s), n);
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
	double t = ino == INO_STATUS ? 0 : ino <= INO_PATCHES || !ino_is_step(ino) ? f->name_timeout : IMMUTABLE_TIMEOUT;
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
		dir_add(req, b, n->name, ino_make(root_view, dws_step_id(s), c), n->file >= 0 ? S_IFREG : S_IFDIR);
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
			dws_step_dir_name(v[i], name, sizeof(name));
			/* the inode is settled by lookup, which builds the step */
			dir_add(req, &b, name, (fuse_ino_t)(v[i] | (1ULL << 62)), S_IFDIR);
		}
		free(v);
	} else if (ino == INO_META) {
		dir_add(req, &b, "status", INO_STATUS, S_IFREG);
		dir_add(req, &b, "patches", INO_PATCHES, S_IFDIR);
	} else if (ino == INO_PATCHES) {
		uint64_t from[16], to;
		size_t n = dws_mount_patch_list(f->m, from, 16, &to);
		for (size_t i = 0; i < n; i++) {
			char a[24], c[24], name[64];
			dws_step_dir_name(from[i], a, sizeof(a));
			dws_step_dir_name(to, c, sizeof(c));
			snprintf(name, sizeof(name), "%s-%s.safetensors", a, c);
			dir_add(req, &b, name, ino_patch(from[i], to), S_IFREG);
		}
	} else if (ino_is_step(ino)) {
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
	fi->cache_readdir = ino != INO_ROOT && ino != INO_STEPS && ino != INO_PATCHES;
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
	uint64_t from, to;
	if (ino_patch_steps(ino, &from, &to)) {
		dws_patchfile *p;
		int e = patch_of(f, from, to, &p);
		if (e)
			return (void)fuse_reply_err(req, e);
		struct handle *h = handle_new(f, H_PATCH, NULL);
		h->patch = p;
		h->ino = ino;
		h->backing = pt_open_fd(ino, dws_patchfile_fd(p)); /* the kernel reads it */
		fi->fh = (uintptr_t)h;
		if (pt_reply_open(req, fi, h->backing) == -ENOENT)
			handle_free(f, h);
		return;
	}
	if (!ino_is_step(ino))
		return (void)fuse_reply_err(req, ino <= INO_PATCHES ? EISDIR : ENOENT);
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
	dws_mount_step_opened(f->m, h->id);
	fi->fh = (uintptr_t)h;
	fi->keep_cache = 1; /* the inode's bytes never change */
	fi->noflush = 1;
	if (pt_reply_open(req, fi, h->backing) == -ENOENT) /* interrupted: no release will come */
		handle_free(f, h);
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

static void read_patch(fuse_req_t req, struct handle *h, char *buf, size_t size, off_t off)
{
	dws_error err = {0};
	int64_t n = dws_patchfile_read(h->patch, (uint64_t)off, buf, size, &err);
	if (n < 0) {
		dws_log_at(DWS_LOG_ERROR, "read of a patch failed: %s", err.msg);
		atomic_fetch_add(&fs_of(req)->read_errors, 1);
		return (void)fuse_reply_err(req, EIO);
	}
	fuse_reply_buf(req, buf, (size_t)n);
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
	char *buf = read_buffer(size);
	if (!buf)
		return (void)fuse_reply_err(req, ENOMEM);
	if (h->kind == H_PATCH)
		return read_patch(req, h, buf, size, off);
	pt_count_read();
	dws_error err = {0};
	/* unpatched bytes the block cache holds are sent from there: no copy */
	struct iovec iov[32];
	dws_pin pins[32];
	size_t niov = sizeof(iov) / sizeof(iov[0]), npins = 0;
	/* the iov may point into the step's memory: held until replied */
	dws_step *s = dws_step_ref(h->step);
	int64_t n = dws_step_read_iov(s, h->file, (uint64_t)off, buf, size, iov, &niov, pins, &npins, &err);
	if (n < 0) {
		dws_log_at(DWS_LOG_ERROR, "read %s [%lld, +%zu) of step %llu failed: %s", dws_step_file(s, h->file)->path, (long long)off, size,
			(unsigned long long)dws_step_number(s), err.msg);
		atomic_fetch_add(&fs_of(req)->read_errors, 1);
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
	if (!ino_is_step(ino))
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
	if (!ino_is_step(ino))
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

const struct fuse_lowlevel_ops dwsfs_ops = {
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
 * kernel's root entries of both steps so the next lookup sees the new one,
 * and tell systemd the step. */
void dwsfs_on_swapped(void *ctx, dws_step *old_root, dws_step *new_root)
{
	struct fs *f = ctx;
	notify_step(dws_step_number(new_root));
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

