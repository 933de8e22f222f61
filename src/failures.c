/* The failed steps (see failures.h). */
#include "failures.h"

#include <stdlib.h>
#include <string.h>

enum { RETRY_FIRST_MS = 1000, RETRY_MAX_MS = 60000 };

struct failure {
	uint64_t id;
	dws_error err;
	unsigned attempts;
	int64_t retry_at;  /* transient only */
};

struct dws_failures {
	struct failure *v;
	size_t n;
};

dws_failures *dws_failures_new(void) { return dws_xcalloc(1, sizeof(dws_failures)); }

void dws_failures_free(dws_failures *f)
{
	if (f)
		free(f->v);
	free(f);
}

static struct failure *find(const dws_failures *f, uint64_t id)
{
	for (size_t i = 0; i < f->n; i++)
		if (f->v[i].id == id)
			return &f->v[i];
	return NULL;
}

int64_t dws_failures_note(dws_failures *f, uint64_t id, const dws_error *err, int64_t now)
{
	struct failure *x = find(f, id);
	if (!x) {
		f->v = dws_xrealloc(f->v, (f->n + 1) * sizeof(*f->v));
		x = &f->v[f->n++];
		memset(x, 0, sizeof(*x));
		x->id = id;
	}
	x->err = *err;
	if (!dws_code_transient(err->code))
		return 0;
	int64_t wait = RETRY_FIRST_MS;
	for (unsigned i = 0; i < x->attempts && wait < RETRY_MAX_MS; i++)
		wait *= 2;
	if (wait > RETRY_MAX_MS)
		wait = RETRY_MAX_MS;
	x->attempts++;
	x->retry_at = now + wait;
	return wait;
}

const dws_error *dws_failures_get(const dws_failures *f, uint64_t id)
{
	const struct failure *x = find(f, id);
	return x ? &x->err : NULL;
}

bool dws_failures_bad(const dws_failures *f, uint64_t id)
{
	const struct failure *x = find(f, id);
	return x && !dws_code_transient(x->err.code);
}

bool dws_failures_hold(const dws_failures *f, uint64_t id, int64_t now)
{
	const struct failure *x = find(f, id);
	return x && (!dws_code_transient(x->err.code) || now < x->retry_at);
}

bool dws_failures_due(const dws_failures *f, int64_t now)
{
	for (size_t i = 0; i < f->n; i++)
		if (dws_code_transient(f->v[i].err.code) && now >= f->v[i].retry_at)
			return true;
	return false;
}

void dws_failures_forget(dws_failures *f, uint64_t id)
{
	struct failure *x = find(f, id);
	if (x)
		*x = f->v[--f->n];
}

void dws_failures_keep(dws_failures *f, const uint64_t *ids, size_t n)
{
	for (size_t i = 0; i < f->n;) {
		bool kept = false;
		for (size_t k = 0; k < n && !kept; k++)
			kept = ids[k] == f->v[i].id;
		if (kept)
			i++;
		else
			f->v[i] = f->v[--f->n];
	}
}
