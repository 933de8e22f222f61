/* -o metrics_addr=HOST:PORT: the Prometheus text format at /metrics
 * (docs/metrics.md), served by libmicrohttpd on a thread of its own. Each
 * scrape renders a snapshot of the engine (dws_mount_status) and of the
 * FUSE layer's counters: it takes the engine's locks as a status read does,
 * never waits on a FUSE request and never calls into the kernel's FUSE side. */
#ifndef DWSFS_FS_METRICS_H
#define DWSFS_FS_METRICS_H

#include <stdbool.h>
#include <sys/socket.h>

struct fs;
struct metrics;

/* What metrics_addr takes, for the option's error line. */
#define METRICS_ADDR_TAKES \
	"HOST:PORT, a numeric IPv4 address or a bracketed IPv6 one and a port from 1 to 65535 " \
	"(127.0.0.1:9101, [::1]:9101; 0.0.0.0:9101 listens on every address)"

/* Parses HOST:PORT (see METRICS_ADDR_TAKES) into *ss; no name lookups. */
bool metrics_addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len);
/* A socket listening on addr (parsed already), close-on-exec; -1 with one
 * line on stderr (the address in use, ...). Before the bucket is opened. */
int metrics_listen(const char *addr);
/* Serves /metrics on the listening socket fd (taken, closed at the end)
 * for f's mount, which must stay open until metrics_stop. NULL on failure,
 * said on stderr. */
struct metrics *metrics_start(int fd, struct fs *f);
/* Stops serving (waits for a scrape under way); NULL is a no-op. */
void metrics_stop(struct metrics *mt);

#endif
