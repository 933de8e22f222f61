/* The step views kept for steps/N, by step id, least recently used first
 * out: at most max of them. Thread safe. */
#ifndef DWSFS_STEPCACHE_H
#define DWSFS_STEPCACHE_H

#include "internal.h"

typedef struct dws_stepcache dws_stepcache;

dws_stepcache *dws_stepcache_new(size_t max);
void dws_stepcache_free(dws_stepcache *c);
/* The step with this id (a new reference), or NULL. */
dws_step *dws_stepcache_get(dws_stepcache *c, uint64_t id);
/* Keep s (a reference is taken); the least recently used goes if full
 * (open files keep their own references: evicting is safe). */
void dws_stepcache_put(dws_stepcache *c, dws_step *s);

#endif
