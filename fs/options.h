/* dwsfs's command line: every option parsed and checked before anything is
 * opened, one line naming the option and what it takes when it is wrong. */
#ifndef DWSFS_FS_OPTIONS_H
#define DWSFS_FS_OPTIONS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

#include <dwsfs/dwsfs.h>

#define MAX_MAPS 16

struct config {
	char *bucket;
	char *mountpoint;         /* absolute */
	struct fuse_args args;    /* what is left for libfuse */
	struct fuse_cmdline_opts cmd;
	dws_mount_opts mo;
	dws_bucket_opts bo;
	dws_prefix_map maps[MAX_MAPS];
	uint64_t mat_max;         /* 0: passthrough off */
	char *mat_dir;            /* absolute */
	int read_ahead_kb;        /* 0: the kernel's */
	bool nonempty;
	char *log_file;
	const char *metrics_addr; /* NULL: no metrics */
	int metrics_fd;           /* listening on metrics_addr, until served; -1 */
	char *strings[128];       /* owned copies, freed with the config */
	size_t nstrings;
};

/* Returns 0: go on; 1: a usage error (reported on stderr); 2: done, exit 0
 * (help or version shown). */
int config_parse(int argc, char **argv, struct config *c);
/* The mountpoint can be mounted on: not a live mount already, empty unless
 * nonempty, and this process may mount (root, or /dev/fuse and fusermount3).
 * A stale mount (a daemon killed) is not refused: the daemon cleans it. */
int config_check_mountpoint(const struct config *c);
void config_free(struct config *c);

#endif
