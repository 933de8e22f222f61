/* A tiny HTTP/1.1 server on 127.0.0.1 for the unit tests: one request per
 * connection, every answer from a handler the test gives. Bounded: request
 * heads of 16 KiB, 5 s socket timeouts, stopped by lb_stop. */
#ifndef DWS_TEST_LOOPBACK_H
#define DWS_TEST_LOOPBACK_H

#include <stdatomic.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct lb_reply {
	int status;
	char headers[2048];  /* extra header lines, each ending in \r\n */
	char *body;          /* malloc'd (freed by the server), or NULL */
	size_t len;
} lb_reply;

typedef struct lb_request {
	char method[16];
	char target[2048];
	char head[16384];    /* the whole request head */
} lb_request;

/* Fills r for rq; n counts the requests before this one. */
typedef void (*lb_handler)(void *ud, const lb_request *rq, int n, lb_reply *r);

typedef struct lb_server {
	int fd, port;
	pthread_t thread;
	atomic_bool stop;
	atomic_int requests;
	lb_handler fn;
	void *ud;
	char url[64];        /* http://127.0.0.1:PORT */
} lb_server;

int lb_start(lb_server *s, lb_handler fn, void *ud);
void lb_stop(lb_server *s);
/* The value of header name in a request head, copied into out ("" if none). */
void lb_header(const lb_request *rq, const char *name, char *out, size_t n);
/* A malloc'd body of n bytes of c. */
char *lb_fill(size_t n, char c);

#endif
