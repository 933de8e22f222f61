/* FUSE passthrough for materialized steps (fs/passthrough.c). */
#ifndef DWSFS_FS_PASSTHROUGH_H
#define DWSFS_FS_PASSTHROUGH_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

#include <dwsfs/dwsfs.h>

/* Hook the session's I/O (after fuse_session_mount): FUSE_INIT asks for
 * passthrough where the kernel offers it, and, once it is granted, m
 * materializes its root under dir for steps of at most max_bytes
 * (dws_mount_materialize). wanted false: nothing is asked or hooked. */
int pt_attach(struct fuse_session *se, dws_mount *m, bool wanted, const char *dir, uint64_t max_bytes);
/* An open of file `file` of the step with content id `id` through inode
 * ino: the kernel backing id to pass it through to, or -1 for an open the
 * daemon serves. Counted for ino either way, until pt_release: an inode is
 * never opened both ways at once (the kernel refuses that with EIO). */
int pt_open(fuse_ino_t ino, uint64_t id, size_t file);
/* (An O_DIRECT open passes through like any other: its reads then follow
 * the backing file's O_DIRECT rules, aligned buffers as on any local
 * filesystem. The kernel wants every open of an inode that has a backing
 * file passed through.) */
/* fuse_reply_open, telling the kernel to pass reads through to backing
 * (from pt_open; -1: a plain open). */
int pt_reply_open(fuse_req_t req, struct fuse_file_info *fi, int backing);
void pt_release(fuse_ino_t ino, uint64_t id, size_t file, int backing);
/* An open through inode ino of a file the daemon holds open as fd (a
 * catch-up patch): a backing id of its own for the kernel to read fd, or -1
 * for an open the daemon serves; pt_release_fd gives it back. */
int pt_open_fd(fuse_ino_t ino, int fd);
void pt_release_fd(fuse_ino_t ino, int backing);
/* For .dwsfs/status: "on", or why not; opens passed through; reads the
 * daemon served. */
const char *pt_state(void);
uint64_t pt_opens(void);
void pt_count_read(void);
uint64_t pt_daemon_reads(void);
/* Give every backing id back (at shutdown, after the session loop). */
void pt_detach(void);

#endif
