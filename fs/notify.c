/* Service notifications (see notify.h). The protocol is systemd's stable
 * interface and a few lines to speak (sd_notify(3), "Standalone
 * Implementations"): one datagram per message, no libsystemd. A send never
 * blocks (MSG_DONTWAIT: the sync thread swaps on), and a failed one is
 * logged, never fatal. */
#include "notify.h"

#include <dwsfs/dwsfs.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static struct {
	pthread_mutex_t lock;
	struct sockaddr_un sa;
	socklen_t len;            /* 0: no socket to tell */
	uint64_t step;
	bool ready, warned;
} nt = {.lock = PTHREAD_MUTEX_INITIALIZER};

void notify_init(void)
{
	const char *e = getenv("NOTIFY_SOCKET");
	if (!e || !*e)
		return;
	size_t n = strlen(e);
	if ((e[0] == '/' || e[0] == '@') && n < sizeof(nt.sa.sun_path)) {
		nt.sa.sun_family = AF_UNIX;
		memcpy(nt.sa.sun_path, e, n);
		if (e[0] == '@') /* the abstract namespace */
			nt.sa.sun_path[0] = 0;
		nt.len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
	} else {
		dws_log_at(DWS_LOG_WARN, "NOTIFY_SOCKET=%s: not a unix socket path or @name; systemd is not told", e);
	}
	unsetenv("NOTIFY_SOCKET");
}

/* Under nt.lock. */
static void send_locked(const char *msg)
{
	if (!nt.len)
		return;
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	ssize_t w = fd < 0 ? -1 : sendto(fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT, (struct sockaddr *)&nt.sa, nt.len);
	if (w < 0 && !nt.warned) {
		nt.warned = true; /* once: a gone manager would fill the log */
		dws_log_at(DWS_LOG_WARN, "NOTIFY_SOCKET: %s; systemd is not told", strerror(errno));
	}
	if (fd >= 0)
		close(fd);
}

void notify_step(uint64_t step)
{
	pthread_mutex_lock(&nt.lock);
	nt.step = step;
	if (nt.ready) {
		char msg[64];
		snprintf(msg, sizeof(msg), "STATUS=serving step %llu", (unsigned long long)step);
		send_locked(msg);
	}
	pthread_mutex_unlock(&nt.lock);
}

void notify_ready(void)
{
	pthread_mutex_lock(&nt.lock);
	if (!nt.ready) {
		char msg[80];
		snprintf(msg, sizeof(msg), "READY=1\nSTATUS=serving step %llu", (unsigned long long)nt.step);
		send_locked(msg);
		nt.ready = true;
	}
	pthread_mutex_unlock(&nt.lock);
}

void notify_stopping(void)
{
	pthread_mutex_lock(&nt.lock);
	send_locked("STOPPING=1");
	pthread_mutex_unlock(&nt.lock);
}
