/* dwsfs: mount a Delta Weight Sync bucket read-only with libfuse3. This
 * file starts the daemon: options (fs/options.c), going to the background,
 * the session and its loop; the operations are fs/fsops.c. */
#include "fs.h"
#include "inodes.h"
#include "metrics.h"
#include "notify.h"
#include "options.h"
#include "passthrough.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

/* Once the mount answers (a stat of its root waits for FUSE_INIT and the
 * loop's answer), on a thread of its own: systemd is told it is ready, and
 * the kernel's readahead is set. The kernel reads ahead 128 KiB on a FUSE
 * mount unless told otherwise: one request per 128 KiB; the mount's bdi
 * read_ahead_kb says more (root only; without it the default stays). */
struct live_arg {
	char *mnt;
	int kb;   /* 0: the kernel's */
};

static void *live_main(void *v)
{
	struct live_arg *a = v;
	struct stat st;
	if (stat(a->mnt, &st) == 0) {
		notify_ready();
		char path[96];
		snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb", major(st.st_dev), minor(st.st_dev));
		FILE *f = a->kb > 0 ? fopen(path, "w") : NULL;
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

static void when_live(const char *mnt, int kb)
{
	struct live_arg *a = malloc(sizeof(*a));
	pthread_t t;
	if (!a || !(a->mnt = realpath(mnt, NULL))) {
		free(a);
		return;
	}
	a->kb = kb;
	if (pthread_create(&t, NULL, live_main, a) != 0) {
		free(a->mnt);
		free(a);
		return;
	}
	pthread_detach(t);
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

/* The mount is up: the sync thread runs, the metrics are served, the
 * parent of a background daemon may exit, and systemd is told once the
 * mount answers. 0, or 1 (said on stderr). */
static int go_live(struct config *c, struct fs *f, dws_mount *m, int *ready_fd, struct metrics **mx)
{
	dws_error err = {0};
	dws_step *r = dws_mount_root(m);
	uint64_t step = dws_step_number(r);
	dws_step_unref(r);
	notify_step(step); /* before any swap can say a newer one */
	if (dws_mount_start(m, &err) != 0) {
		fprintf(stderr, "dwsfs: %s\n", err.msg);
		return 1;
	}
	if (c->metrics_fd >= 0) {
		*mx = metrics_start(c->metrics_fd, f);
		c->metrics_fd = -1;
		if (!*mx)
			return 1;
	}
	if (chdir("/") != 0)
		dws_log_at(DWS_LOG_WARN, "chdir /: %s", strerror(errno));
	if (*ready_fd >= 0) {
		daemon_ready(*ready_fd, c->log_file != NULL);
		*ready_fd = -1;
	}
	when_live(c->mountpoint, c->read_ahead_kb);
	dws_log("mounted %s on %s: step %llu%s%s", c->bucket, c->mountpoint, (unsigned long long)step,
		c->metrics_addr ? ", metrics at http://" : "", c->metrics_addr ? c->metrics_addr : "");
	return 0;
}

static int loop(struct config *c, struct fuse_session *se)
{
	int ret;
	if (c->cmd.singlethread) {
		ret = fuse_session_loop(se);
	} else {
		struct fuse_loop_config *lc = fuse_loop_cfg_create();
		fuse_loop_cfg_set_clone_fd(lc, c->cmd.clone_fd);
		fuse_loop_cfg_set_max_threads(lc, c->cmd.max_threads ? c->cmd.max_threads : 16);
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
	return ret < 0 ? 1 : 0;
}

/* Serve until unmounted; se: a session made (options checked), not mounted. */
static int serve(struct config *c, struct fs *f, struct fuse_session *se, dws_mount *m, int *ready_fd)
{
	/* libfuse ends the session on SIGHUP: here it reopens the log file */
	struct sigaction hup = {.sa_handler = on_sighup};
	sigemptyset(&hup.sa_mask);
	if (fuse_set_signal_handlers(se) != 0 || sigaction(SIGHUP, &hup, NULL) != 0)
		return 1;
	int ret = 1;
	struct metrics *mx = NULL;
	if (fuse_session_mount(se, c->mountpoint) != 0)
		goto out_signals;
	f->se = se;
	if (pt_attach(se, m, c->mat_max > 0, c->mat_dir, c->mat_max) != 0)
		dws_log_at(DWS_LOG_WARN, "passthrough off: libfuse refused custom I/O");
	if (go_live(c, f, m, ready_fd, &mx) != 0)
		goto out_unmount;
	ret = loop(c, se);
	notify_stopping();
	metrics_stop(mx); /* its scrapes read the mount */
	f->m = NULL;
	handles_free_all(f);
	pt_detach();
	dws_mount_close(m); /* stop the sync thread before the session goes */
	dws_log("unmounted %s", c->mountpoint);
	f->se = NULL;
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	return ret;
out_unmount:
	f->se = NULL;
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
	metrics_stop(mx);
	dws_mount_close(m);
	return ret;
}

/* Everything that can be checked before the bucket is opened: libfuse's
 * options (the session is made), the mountpoint, the log file, the
 * metrics address (bound: one in use is said now). */
static struct fuse_session *prepare(struct config *c, struct fs *f)
{
	char *fsname = NULL; /* a read-only mount named after the bucket */
	if (asprintf(&fsname, "-osubtype=dwsfs,ro,fsname=%s", c->bucket) < 0 || fuse_opt_add_arg(&c->args, fsname) != 0) {
		free(fsname);
		return NULL;
	}
	free(fsname);
	struct fuse_session *se = fuse_session_new(&c->args, &dwsfs_ops, sizeof(dwsfs_ops), f);
	if (!se)
		return NULL; /* libfuse said why, in one line */
	dws_error err = {0};
	if (config_check_mountpoint(c) || (c->log_file && dws_log_to_file(c->log_file, &err) != 0) ||
	    (c->metrics_addr && (c->metrics_fd = metrics_listen(c->metrics_addr)) < 0)) {
		if (err.code)
			fprintf(stderr, "dwsfs: %s\n", err.msg);
		fuse_session_destroy(se);
		return NULL;
	}
	return se;
}

int main(int argc, char *argv[])
{
	/* Patch arrays (megabytes each) are freed on one thread as merged ones
	 * come from another: with glibc's sliding mmap threshold they land in
	 * heaps that keep the pages, and a mount's first merge held the old
	 * and the new side by side (~0.4 GB more peak RSS for the 0.6B model).
	 * A fixed threshold makes each large array its own mapping, unmapped
	 * when freed. */
	mallopt(M_MMAP_THRESHOLD, 256 * 1024);
	notify_init(); /* before any thread: it edits the environment */
	struct config c;
	int rc = config_parse(argc, argv, &c);
	if (rc) {
		config_free(&c);
		return rc == 2 ? 0 : 1;
	}
	struct fs f = {.started = time(NULL), .name_timeout = 1.0, .uid = getuid(), .gid = getgid(),
		       .handles_lock = PTHREAD_MUTEX_INITIALIZER};
	c.mo.swapped = dwsfs_on_swapped;
	c.mo.ctx = &f;
	int ret = 1, ready_fd = -1;
	struct fuse_session *se = prepare(&c, &f);
	if (se && (c.cmd.foreground || (ready_fd = daemon_start()) >= 0)) {
		clean_stale_mount(c.mountpoint);
		dws_mount *m = NULL;
		dws_error err = {0};
		if (dws_mount_open(&c.mo, &m, &err) != 0) {
			fprintf(stderr, "dwsfs: %s\n", err.msg);
		} else {
			f.m = m;
			ret = serve(&c, &f, se, m, &ready_fd);
		}
	}
	if (se)
		fuse_session_destroy(se);
	config_free(&c);
	ino_table_free();
	return ret;
}
