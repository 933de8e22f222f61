/* The step views of steps/N (see stepcache.h). */
#include "stepcache.h"

#include <pthread.h>
#include <stdlib.h>

struct entry {
	dws_step *step;
	uint64_t last_use;
};

struct dws_stepcache {
	pthread_mutex_t lock;
	struct entry *v;
	size_t n, max;
	uint64_t tick;
};

dws_stepcache *dws_stepcache_new(size_t max)
{
	dws_stepcache *c = dws_xcalloc(1, sizeof(*c));
	c->max = max ? max : 1;
	c->v = dws_xcalloc(c->max, sizeof(*c->v));
	pthread_mutex_init(&c->lock, NULL);
	return c;
}

void dws_stepcache_free(dws_stepcache *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++)
		dws_step_unref(c->v[i].step);
	free(c->v);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

static struct entry *find(dws_stepcache *c, uint64_t id)
{
	for (size_t i = 0; i < c->n; i++)
		if (dws_step_id(c->v[i].step) == id)
			return &c->v[i];
	return NULL;
}

dws_step *dws_stepcache_get(dws_stepcache *c, uint64_t id)
{
	pthread_mutex_lock(&c->lock);
	struct entry *e = find(c, id);
	dws_step *s = NULL;
	if (e) {
		e->last_use = ++c->tick;
		s = dws_step_ref(e->step);
	}
	pthread_mutex_unlock(&c->lock);
	return s;
}

void dws_stepcache_put(dws_stepcache *c, dws_step *s)
{
	dws_step *drop = NULL;
	pthread_mutex_lock(&c->lock);
	if (find(c, dws_step_id(s))) {
		pthread_mutex_unlock(&c->lock);
		return;
	}
	if (c->n == c->max) {
		size_t old = 0;
		for (size_t i = 1; i < c->n; i++)
			if (c->v[i].last_use < c->v[old].last_use)
				old = i;
		drop = c->v[old].step;
		c->v[old] = c->v[--c->n];
	}
	c->v[c->n++] = (struct entry){dws_step_ref(s), ++c->tick};
	pthread_mutex_unlock(&c->lock);
	dws_step_unref(drop);
}
