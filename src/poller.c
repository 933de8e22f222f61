/* Remote polling (see poller.h). */
#include "poller.h"

#include <stdlib.h>
#include <string.h>

enum { HEAD_AHEAD = 16 }; /* step names HEADed past the newest, at most */

struct dws_poller {
	dws_bucket *b;
	unsigned info_poll_ms, relist_ms;
	bool has_probe;
	char info_token[256];
	int64_t next_info, next_relist;
	bool discovered;   /* HEADs found objects since the last probe */
	dws_object *found; /* since the last full listing */
	size_t nfound;
};

dws_poller *dws_poller_new(dws_bucket *b, unsigned info_poll_ms, unsigned relist_ms, int64_t now)
{
	dws_poller *p = dws_xcalloc(1, sizeof(*p));
	p->b = b;
	p->info_poll_ms = info_poll_ms;
	p->relist_ms = relist_ms;
	p->next_info = now + info_poll_ms;
	p->next_relist = now + relist_ms;
	dws_error e = {0};
	p->has_probe = dws_bucket_probe(b, p->info_token, sizeof(p->info_token), &e) != DWS_EUNSUP;
	return p;
}

void dws_poller_free(dws_poller *p)
{
	if (!p)
		return;
	dws_objects_free(p->found, p->nfound);
	free(p);
}

const dws_object *dws_poller_found(const dws_poller *p, size_t *n)
{
	*n = p->nfound;
	return p->found;
}

void dws_poller_listed(dws_poller *p, int64_t now)
{
	p->next_relist = now + p->relist_ms;
	dws_objects_free(p->found, p->nfound);
	p->found = NULL;
	p->nfound = 0;
}

/* The info probe: true when the bucket changed in a way the HEADs did not
 * explain. */
static int probe(dws_poller *p, int64_t now, bool *changed, dws_error *err)
{
	char tok[256];
	int rc = dws_bucket_probe(p->b, tok, sizeof(tok), err);
	p->next_info = now + p->info_poll_ms;
	if (rc && rc != DWS_EUNSUP)
		return rc;
	if (!rc && strcmp(tok, p->info_token) != 0) {
		*changed = !p->discovered && p->info_token[0];
		snprintf(p->info_token, sizeof(p->info_token), "%s", tok);
	}
	p->discovered = false;
	return DWS_OK;
}

bool dws_poller_poll(dws_poller *p, const dws_catalog *cat, int64_t now, bool *relist, dws_error *err)
{
	*relist = now >= p->next_relist || !p->has_probe;
	if (!p->has_probe)
		return true;
	if (now >= p->next_info) {
		bool changed = false;
		if (probe(p, now, &changed, err))
			return false;
		*relist |= changed;
	}
	if (*relist)
		return true;
	char *keys[HEAD_AHEAD];
	size_t nk = dws_catalog_next_keys(cat, keys, HEAD_AHEAD);
	bool found_any = false;
	for (size_t k = 0; k < nk; k++) {
		dws_object o;
		dws_error e = {0};
		int rc = dws_bucket_head(p->b, keys[k], &o, &e);
		if (rc) {
			if (rc != DWS_ENOENT)
				*err = e;
			break;
		}
		p->found = dws_xrealloc(p->found, (p->nfound + 1) * sizeof(*p->found));
		p->found[p->nfound++] = o;
		p->discovered = found_any = true;
	}
	for (size_t k = 0; k < nk; k++)
		free(keys[k]);
	return found_any;
}
