/* See loopback.h. */
#include "loopback.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static const char *reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 206: return "Partial Content";
	case 302: return "Found";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 410: return "Gone";
	case 412: return "Precondition Failed";
	case 503: return "Service Unavailable";
	default: return "Whatever";
	}
}

static void send_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k <= 0)
			return; /* the client went away (it may stop reading a body) */
		p += k;
		n -= (size_t)k;
	}
}

static void serve_one(lb_server *s, int c)
{
	struct timeval tv = {5, 0};
	setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	lb_request *rq = calloc(1, sizeof(*rq));
	size_t got = 0;
	while (got < sizeof(rq->head) - 1 && !strstr(rq->head, "\r\n\r\n")) {
		ssize_t k = recv(c, rq->head + got, sizeof(rq->head) - 1 - got, 0);
		if (k <= 0)
			break;
		got += (size_t)k;
		rq->head[got] = 0;
	}
	if (sscanf(rq->head, "%15s %2047s", rq->method, rq->target) == 2) {
		lb_reply r = {.status = 500};
		int n = atomic_fetch_add(&s->requests, 1);
		s->fn(s->ud, rq, n, &r);
		char head[4096];
		int hl = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nContent-Length: %zu\r\nConnection: close\r\n%s\r\n",
				  r.status, reason(r.status), r.len, r.headers);
		send_all(c, head, (size_t)hl);
		if (strcmp(rq->method, "HEAD") != 0 && r.body)
			send_all(c, r.body, r.len);
		free(r.body);
	}
	free(rq);
	shutdown(c, SHUT_WR);
	close(c);
}

static void *run(void *arg)
{
	lb_server *s = arg;
	while (!atomic_load(&s->stop)) {
		struct pollfd p = {s->fd, POLLIN, 0};
		if (poll(&p, 1, 50) <= 0)
			continue;
		int c = accept(s->fd, NULL, NULL);
		if (c >= 0)
			serve_one(s, c);
	}
	return NULL;
}

int lb_start(lb_server *s, lb_handler fn, void *ud)
{
	memset(s, 0, sizeof(*s));
	s->fn = fn;
	s->ud = ud;
	s->fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof(a);
	if (s->fd < 0 || bind(s->fd, (struct sockaddr *)&a, sizeof(a)) || listen(s->fd, 16) ||
	    getsockname(s->fd, (struct sockaddr *)&a, &al)) {
		if (s->fd >= 0)
			close(s->fd);
		return -1;
	}
	s->port = ntohs(a.sin_port);
	snprintf(s->url, sizeof(s->url), "http://127.0.0.1:%d", s->port);
	if (pthread_create(&s->thread, NULL, run, s)) {
		close(s->fd);
		return -1;
	}
	return 0;
}

void lb_stop(lb_server *s)
{
	atomic_store(&s->stop, true);
	pthread_join(s->thread, NULL);
	close(s->fd);
}

void lb_header(const lb_request *rq, const char *name, char *out, size_t n)
{
	size_t nl = strlen(name);
	out[0] = 0;
	for (const char *l = strstr(rq->head, "\r\n"); l && l[2]; l = strstr(l + 2, "\r\n")) {
		const char *p = l + 2;
		if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
			p += nl + 1;
			while (*p == ' ')
				p++;
			size_t vl = strcspn(p, "\r\n");
			snprintf(out, n, "%.*s", (int)vl, p);
			return;
		}
	}
}

char *lb_fill(size_t n, char c)
{
	char *b = malloc(n ? n : 1);
	memset(b, c, n);
	return b;
}
