/* Polling a remote bucket within the Hub's quotas: each poll HEADs the names
 * the next steps would have (resolver calls); a bucket-info probe (one API
 * call) every info_poll_ms notices anything else (anchors, skipped step
 * numbers, restarts), and only then is the bucket listed again (API calls);
 * a full listing happens at least every relist_ms. S3 has no probe: its
 * listing is the poll. Used by the sync thread only. */
#ifndef DWSFS_POLLER_H
#define DWSFS_POLLER_H

#include "internal.h"

typedef struct dws_poller dws_poller;

/* Probes the bucket once (the token to compare with). */
dws_poller *dws_poller_new(dws_bucket *b, unsigned info_poll_ms, unsigned relist_ms, int64_t now);
void dws_poller_free(dws_poller *p);
/* One poll at time now, against the catalog the mount has: true when the
 * catalog must be loaded again, *relist saying whether from a full listing
 * or from the last one plus dws_poller_found(). A failure fills err (and
 * may still return true for what it found before). */
bool dws_poller_poll(dws_poller *p, const dws_catalog *cat, int64_t now, bool *relist, dws_error *err);
/* Objects found by HEAD since the last full listing. */
const dws_object *dws_poller_found(const dws_poller *p, size_t *n);
/* A full listing at time now took the found objects in. */
void dws_poller_listed(dws_poller *p, int64_t now);

#endif
