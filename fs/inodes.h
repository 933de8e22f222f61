/* Inode numbers, the FUSE layer's own business: 1 the root, 2 steps/, 3
 * .dwsfs/, 4 .dwsfs/status, 5 .dwsfs/patches; (1 << 61) | index: a patch
 * file of .dwsfs/patches; every other inode is
 * (view << 63) | (step index << 24) | tree node, where the step index is a
 * small number this table gives each step id (64 bits, the core's) the
 * first time it is seen, for the mount's life. A step's files are
 * immutable, so their inodes keep page cache and attributes for long; the
 * root view (bit 63 set) has inodes of its own so that a root swap never
 * shares cache with steps/N and never counts steps/N use as root use. */
#ifndef DWSFS_FS_INODES_H
#define DWSFS_FS_INODES_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

#define INO_ROOT 1
#define INO_STEPS 2
#define INO_META 3
#define INO_STATUS 4
#define INO_PATCHES 5

/* The inode of patch file FROM-TO in .dwsfs/patches (its own number space). */
fuse_ino_t ino_patch(uint64_t from, uint64_t to);
/* Its two steps; false if ino is no patch inode given out. */
bool ino_patch_steps(fuse_ino_t ino, uint64_t *from, uint64_t *to);

/* The inode of tree node `node` of the step with this id. */
fuse_ino_t ino_make(bool root_view, uint64_t id, uint32_t node);
bool ino_is_step(fuse_ino_t ino);
/* The step id of a step inode; false if the inode names no step seen. */
bool ino_id(fuse_ino_t ino, uint64_t *id);
uint32_t ino_node(fuse_ino_t ino);
bool ino_root_view(fuse_ino_t ino);
/* A step's tree can hold at most this many nodes. */
#define INO_MAX_NODES (1u << 24)
void ino_table_free(void);

#endif
