/* The catch-up patches a mount has made (patchfile.h), the last few kept:
 * each made once, one at a time, and handed out by reference. */
#ifndef DWSFS_PATCHCACHE_H
#define DWSFS_PATCHCACHE_H

#include "internal.h"

#include <pthread.h>

typedef struct dws_patchcache dws_patchcache;

/* Patches go to unnamed files under tmpdir (NULL: $TMPDIR, /tmp); `keep`
 * are kept. Making one takes build_lock (the builder is not shared). */
dws_patchcache *dws_patchcache_new(size_t keep, const char *tmpdir, pthread_mutex_t *build_lock);
void dws_patchcache_free(dws_patchcache *pc);
/* The patch from built step f to built step t: the kept one or a new one
 * (logged with its size and time). chain_only as dws_patchfile_make;
 * for_reader: someone is about to read it (see dws_patchcache_read_any). */
int dws_patchcache_get(dws_patchcache *pc, dws_builder *bl, dws_step *f, dws_step *t, bool chain_only, bool for_reader,
		       dws_patchfile **out, dws_error *err);
/* The same from step number `from` (content id from_id) within t's chain,
 * without that step built (patchfile.h: dws_patchfile_make_chain). */
int dws_patchcache_get_chain(dws_patchcache *pc, dws_builder *bl, uint64_t from, uint64_t from_id, dws_step *t,
			     bool for_reader, dws_patchfile **out, dws_error *err);
/* The kept patch between the steps with these content ids, or NULL. */
dws_patchfile *dws_patchcache_find(dws_patchcache *pc, uint64_t from_id, uint64_t to_id, bool for_reader);
/* Whether any patch was handed to a reader yet. */
bool dws_patchcache_read_any(dws_patchcache *pc);

#endif
