/* The FUSE layer's state and its open handles (fs/fsops.c, fs/handles.c). */
#ifndef DWSFS_FS_FS_H
#define DWSFS_FS_FS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include <dwsfs/dwsfs.h>

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
	atomic_ullong read_errors; /* reads answered EIO (the metrics) */
};

enum handle_kind { H_FILE, H_STATUS, H_DIR, H_PATCH };

struct handle {
	struct handle *prev, *next;
	enum handle_kind kind;
	dws_step *step;   /* the step opened: its bytes, whatever merges or swaps */
	size_t file;
	bool root_view;
	/* H_FILE: its inode, step id, and the kernel backing id its reads
	 * pass through to (-1: the daemon serves them) */
	fuse_ino_t ino;
	uint64_t id;
	int backing;
	dws_patchfile *patch; /* H_PATCH */
	char *buf; /* status snapshot or directory listing */
	size_t len;
};

/* A new handle of this kind, holding step (its reference, or NULL). */
struct handle *handle_new(struct fs *f, enum handle_kind kind, dws_step *step);
void handle_free(struct fs *f, struct handle *h);
/* Free the handles whose release never came (a lazy unmount with files
 * open, a signal before the kernel's releases). */
void handles_free_all(struct fs *f);

extern const struct fuse_lowlevel_ops dwsfs_ops;
/* dws_mount_opts callback: after a swap, drop the kernel's root entries. */
void dwsfs_on_swapped(void *ctx, dws_step *old_root, dws_step *new_root);

#endif
