/* Steps that did not build or verify, by step id. A bad file fails for good
 * (its id changes when the file does); a failure that may pass (the network,
 * a server: dws_code_transient) is tried again, later each time. Not thread
 * safe: the engine holds its lock. */
#ifndef DWSFS_FAILURES_H
#define DWSFS_FAILURES_H

#include "internal.h"

typedef struct dws_failures dws_failures;

dws_failures *dws_failures_new(void);
void dws_failures_free(dws_failures *f);
/* id failed with err at time now (ms): returns the ms until its next try,
 * 1 s doubling to 60 s, or 0 when it failed for good. */
int64_t dws_failures_note(dws_failures *f, uint64_t id, const dws_error *err, int64_t now);
/* The failure of id, or NULL. */
const dws_error *dws_failures_get(const dws_failures *f, uint64_t id);
/* Whether id failed for good. */
bool dws_failures_bad(const dws_failures *f, uint64_t id);
/* Whether id is not worth a build at time now: bad, or its next try is to come. */
bool dws_failures_hold(const dws_failures *f, uint64_t id, int64_t now);
/* Whether a failed id is due for another try at time now. */
bool dws_failures_due(const dws_failures *f, int64_t now);
void dws_failures_forget(dws_failures *f, uint64_t id);
/* Forget every id not in ids[0..n) (the bucket no longer holds them). */
void dws_failures_keep(dws_failures *f, const uint64_t *ids, size_t n);

#endif
