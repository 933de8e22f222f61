/* The on_swap hook (see hook.h). The command is started with posix_spawn
 * (nothing but exec runs in the child of a threaded daemon), in a process
 * group of its own so a timeout kills what it started too, with an
 * environment built beforehand: the daemon's, less its credentials unless
 * asked, plus DWSFS_STEP, DWSFS_PREV_STEP, DWSFS_MOUNT and DWSFS_STEP_DIR. */
#include "hook.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"

extern char **environ;

enum { LINE_MAX_LOGGED = 1000, LINES_MAX = 200, KILL_GRACE_MS = 2000 };

struct dws_hook {
	dws_hook_opts o;
	char *cmd, *mountpoint;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	bool stop;
	dws_step *queued, *running; /* held while queued or running */
	uint64_t prev;              /* the step of the last run that exited 0 */
	pid_t pid;                  /* of the running command, 0: none */
	dws_hook_stats st;
};

static int64_t now_ms(void) { return dws_real_clock.mono_ms(NULL); }

static bool secret(const char *kv)
{
	static const char *const names[] = {"HF_TOKEN=", "AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=",
					    "AWS_SESSION_TOKEN=", "AWS_CONTAINER_AUTHORIZATION_TOKEN="};
	for (size_t i = 0; i < DWS_ARRAY_LEN(names); i++)
		if (!strncmp(kv, names[i], strlen(names[i])))
			return true;
	return false;
}

static bool ours(const char *kv) { return !strncmp(kv, "DWSFS_", 6); }

/* The command's environment (malloc'd, NULL-terminated; free with envp_free). */
static char **envp_new(const dws_hook *h, uint64_t step, uint64_t prev)
{
	size_t n = 0;
	while (environ[n])
		n++;
	char **e = dws_xcalloc(n + 6, sizeof(*e));
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (!ours(environ[i]) && (h->o.keep_secrets || !secret(environ[i])))
			e[k++] = dws_xstrdup(environ[i]);
	e[k++] = dws_xasprintf("DWSFS_STEP=%llu", (unsigned long long)step);
	e[k++] = dws_xasprintf("DWSFS_PREV_STEP=%llu", (unsigned long long)prev);
	e[k++] = dws_xasprintf("DWSFS_MOUNT=%s", h->mountpoint ? h->mountpoint : "");
	char a[24], b[24];
	dws_step_dir_name(prev, a, sizeof(a));
	dws_step_dir_name(step, b, sizeof(b));
	const char *mp = h->mountpoint ? h->mountpoint : "";
	e[k++] = dws_xasprintf("DWSFS_STEP_DIR=%s/steps/%s", mp, b);
	/* the patch from what the server holds; none when it holds this step */
	e[k++] = prev < step ? dws_xasprintf("DWSFS_PATCH=%s/.dwsfs/patches/%s-%s.safetensors", mp, a, b)
			     : dws_xstrdup("DWSFS_PATCH=");
	return e;
}

static void envp_free(char **e)
{
	for (size_t i = 0; e[i]; i++)
		free(e[i]);
	free(e);
}

static int spawn(dws_hook *h, uint64_t step, uint64_t prev, int *out_fd, pid_t *pid)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) != 0)
		return errno;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_adddup2(&fa, p[1], 1);
	posix_spawn_file_actions_adddup2(&fa, p[1], 2);
	posix_spawnattr_init(&at);
	sigset_t none, all;
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &all); /* the daemon ignores SIGPIPE; the command need not */
	posix_spawnattr_setpgroup(&at, 0);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
	char **envp = envp_new(h, step, prev);
	char *argv[] = {"sh", "-c", h->cmd, NULL};
	int rc = posix_spawn(pid, "/bin/sh", &fa, &at, argv, envp);
	envp_free(envp);
	posix_spawnattr_destroy(&at);
	posix_spawn_file_actions_destroy(&fa);
	close(p[1]);
	if (rc) {
		close(p[0]);
		return rc;
	}
	*out_fd = p[0];
	return 0;
}

/* Log complete lines of buf[0..*len) (the rest stays); at the end, all. */
static void log_lines(char *buf, size_t *len, bool end, uint64_t step, unsigned *lines)
{
	size_t start = 0;
	for (size_t i = 0; i < *len; i++) {
		if (buf[i] != '\n' && !(end && i + 1 == *len) && i - start < LINE_MAX_LOGGED)
			continue;
		size_t n = i - start + (buf[i] != '\n');
		if (++*lines <= LINES_MAX)
			dws_log_info("on_swap (step %llu): %.*s", (unsigned long long)step, (int)n, buf + start);
		else if (*lines == LINES_MAX + 1)
			dws_log_info("on_swap (step %llu): (more output not logged)", (unsigned long long)step);
		start = i + 1;
	}
	memmove(buf, buf + start, *len - start);
	*len -= start;
}

static bool stopping(dws_hook *h)
{
	pthread_mutex_lock(&h->lock);
	bool stop = h->stop;
	pthread_mutex_unlock(&h->lock);
	return stop;
}

/* Read the command's output until it closes, its deadline or a stop: true
 * if it is to be killed. */
static bool collect(dws_hook *h, int fd, uint64_t step, int64_t deadline)
{
	char buf[4 * LINE_MAX_LOGGED];
	size_t len = 0;
	unsigned lines = 0;
	for (;;) {
		int64_t left = deadline ? deadline - now_ms() : 1000;
		if ((deadline && left <= 0) || stopping(h))
			break;
		struct pollfd pf = {fd, POLLIN, 0};
		int r = poll(&pf, 1, (int)(left > 1000 ? 1000 : left));
		if (r < 0 && errno != EINTR)
			break;
		if (r <= 0)
			continue;
		ssize_t n = read(fd, buf + len, sizeof(buf) - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			log_lines(buf, &len, true, step, &lines);
			return false;
		}
		len += (size_t)n;
		log_lines(buf, &len, len == sizeof(buf), step, &lines);
	}
	log_lines(buf, &len, true, step, &lines);
	return true;
}

/* Wait for pid; after a timeout (or a stop), kill its process group, first
 * with SIGTERM. Returns its status as a shell would ($?). */
static int reap(pid_t pid, bool kill_it)
{
	int status = 0;
	if (kill_it)
		kill(-pid, SIGTERM);
	for (int64_t until = now_ms() + KILL_GRACE_MS;;) {
		pid_t r = waitpid(pid, &status, kill_it ? WNOHANG : 0);
		if (r == pid)
			break;
		if (r < 0 && errno != EINTR)
			return 127;
		if (kill_it && now_ms() >= until) {
			kill(-pid, SIGKILL);
			kill_it = false; /* a blocking wait from now on */
		} else if (kill_it) {
			struct timespec ts = {0, 20 * 1000000};
			nanosleep(&ts, NULL);
		}
	}
	return WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 127;
}

static void run(dws_hook *h, dws_step *s)
{
	pthread_mutex_lock(&h->lock);
	uint64_t prev = h->prev;
	pthread_mutex_unlock(&h->lock);
	uint64_t step = dws_step_number(s);
	int64_t t0 = now_ms();
	int fd = -1;
	pid_t pid = 0;
	int e = spawn(h, step, prev, &fd, &pid);
	int status;
	if (e) {
		dws_log_error("on_swap (step %llu): cannot start /bin/sh: %s", (unsigned long long)step, strerror(e));
		status = 127;
	} else {
		pthread_mutex_lock(&h->lock);
		h->pid = pid;
		pthread_mutex_unlock(&h->lock);
		bool kill_it = collect(h, fd, step, h->o.timeout_ms ? t0 + h->o.timeout_ms : 0);
		close(fd);
		bool late = kill_it && !stopping(h);
		status = reap(pid, kill_it);
		if (late) {
			dws_log_warn("on_swap (step %llu): killed after its timeout of %u ms", (unsigned long long)step,
				     h->o.timeout_ms);
			status = 124;
		}
	}
	int64_t ms = now_ms() - t0;
	if (status)
		dws_log_warn("on_swap (step %llu): exit status %d after %lld ms", (unsigned long long)step, status, (long long)ms);
	else
		dws_log_info("on_swap (step %llu): done in %lld ms", (unsigned long long)step, (long long)ms);
	pthread_mutex_lock(&h->lock);
	h->pid = 0;
	if (!status)
		h->prev = step;
	h->st = (dws_hook_stats){.runs = h->st.runs + 1, .failures = h->st.failures + (status != 0), .has_last = true,
				 .last_step = step, .last_exit = status, .last_ms = ms};
	pthread_mutex_unlock(&h->lock);
}

static void *hook_main(void *arg)
{
	dws_hook *h = arg;
	pthread_mutex_lock(&h->lock);
	for (;;) {
		while (!h->stop && !h->queued)
			pthread_cond_wait(&h->cond, &h->lock);
		if (h->stop)
			break;
		h->running = h->queued;
		h->queued = NULL;
		pthread_mutex_unlock(&h->lock);
		run(h, h->running);
		pthread_mutex_lock(&h->lock);
		dws_step *done = h->running;
		h->running = NULL;
		pthread_mutex_unlock(&h->lock);
		dws_step_unref(done);
		pthread_mutex_lock(&h->lock);
	}
	pthread_mutex_unlock(&h->lock);
	return NULL;
}

int dws_hook_start(const dws_hook_opts *o, dws_hook **out, dws_error *err)
{
	dws_hook *h = dws_xcalloc(1, sizeof(*h));
	h->o = *o;
	h->cmd = dws_xstrdup(o->cmd);
	h->mountpoint = o->mountpoint ? dws_xstrdup(o->mountpoint) : NULL;
	h->prev = o->first_prev;
	pthread_mutex_init(&h->lock, NULL);
	pthread_cond_init(&h->cond, NULL);
	int e = pthread_create(&h->thread, NULL, hook_main, h);
	if (e) {
		pthread_mutex_destroy(&h->lock);
		pthread_cond_destroy(&h->cond);
		free(h->cmd);
		free(h->mountpoint);
		free(h);
		return dws_fail(err, DWS_EIO, "on_swap: cannot start its thread: %s", strerror(e));
	}
	*out = h;
	return DWS_OK;
}

void dws_hook_fire(dws_hook *h, dws_step *s)
{
	pthread_mutex_lock(&h->lock);
	dws_step *drop = h->queued;
	if (drop)
		dws_log_info("on_swap: step %llu skipped: step %llu came while a run was under way",
			     (unsigned long long)dws_step_number(drop), (unsigned long long)dws_step_number(s));
	h->queued = dws_step_ref(s);
	pthread_cond_signal(&h->cond);
	pthread_mutex_unlock(&h->lock);
	dws_step_unref(drop);
}

dws_step *dws_hook_step(dws_hook *h, uint64_t id)
{
	dws_step *s = NULL;
	pthread_mutex_lock(&h->lock);
	if (h->running && dws_step_id(h->running) == id)
		s = dws_step_ref(h->running);
	else if (h->queued && dws_step_id(h->queued) == id)
		s = dws_step_ref(h->queued);
	pthread_mutex_unlock(&h->lock);
	return s;
}

void dws_hook_stats_get(dws_hook *h, dws_hook_stats *out)
{
	pthread_mutex_lock(&h->lock);
	*out = h->st;
	out->running = h->running != NULL;
	pthread_mutex_unlock(&h->lock);
}

void dws_hook_stop(dws_hook *h)
{
	if (!h)
		return;
	pthread_mutex_lock(&h->lock);
	h->stop = true;
	if (h->pid)
		kill(-h->pid, SIGTERM); /* its output closes; run() reaps it */
	pthread_cond_signal(&h->cond);
	pthread_mutex_unlock(&h->lock);
	pthread_join(h->thread, NULL);
	dws_step_unref(h->queued);
	pthread_mutex_destroy(&h->lock);
	pthread_cond_destroy(&h->cond);
	free(h->cmd);
	free(h->mountpoint);
	free(h);
}
