/* Open handles of the FUSE layer: every one is in a list, so the handles
 * whose release never came are freed at shutdown, and a merge can move the
 * open files of a step to its merged object. */
#include "fs.h"
#include "passthrough.h"

#include <stdlib.h>

/* step: the handle's reference, or NULL */
struct handle *handle_new(struct fs *f, enum handle_kind kind, dws_step *step)
{
	struct handle *h = calloc(1, sizeof(*h));
	if (!h)
		abort();
	h->kind = kind;
	h->step = step;
	pthread_mutex_init(&h->lock, NULL);
	pthread_mutex_lock(&f->handles_lock);
	h->next = f->handles;
	if (f->handles)
		f->handles->prev = h;
	f->handles = h;
	pthread_mutex_unlock(&f->handles_lock);
	return h;
}

void handle_free(struct fs *f, struct handle *h)
{
	pthread_mutex_lock(&f->handles_lock);
	if (h->prev)
		h->prev->next = h->next;
	else
		f->handles = h->next;
	if (h->next)
		h->next->prev = h->prev;
	pthread_mutex_unlock(&f->handles_lock);
	if (h->root_view && f->m)
		dws_mount_root_released(f->m);
	if (h->kind == H_FILE)
		pt_release(h->ino, h->id, h->file, h->backing);
	dws_step_unref(h->step);
	pthread_mutex_destroy(&h->lock);
	free(h->buf);
	free(h);
}

dws_step *handle_step(struct handle *h)
{
	pthread_mutex_lock(&h->lock);
	dws_step *s = dws_step_ref(h->step);
	pthread_mutex_unlock(&h->lock);
	return s;
}

void handles_free_all(struct fs *f)
{
	while (f->handles)
		handle_free(f, f->handles);
}

/* After a merge (called by the compaction thread, holding no lock): open
 * files of that step move to the merged object, the same bytes, so the
 * runs it replaced are freed now, not when the files close (a server that
 * keeps the model's files open or mapped would hold them for good). */
void dwsfs_on_merged(void *ctx, dws_step *s)
{
	struct fs *f = ctx;
	uint64_t id = dws_step_id(s);
	size_t n = 0, cap = 0;
	dws_step **drop = NULL;
	pthread_mutex_lock(&f->handles_lock);
	for (struct handle *h = f->handles; h; h = h->next) {
		if (!h->step || h->step == s || dws_step_id(h->step) != id)
			continue;
		if (n == cap) {
			size_t nc = cap ? 2 * cap : 16;
			dws_step **d = realloc(drop, nc * sizeof(*d));
			if (!d)
				break; /* those left keep their object: only memory */
			drop = d;
			cap = nc;
		}
		pthread_mutex_lock(&h->lock);
		drop[n++] = h->step;
		h->step = dws_step_ref(s);
		pthread_mutex_unlock(&h->lock);
	}
	pthread_mutex_unlock(&f->handles_lock);
	for (size_t i = 0; i < n; i++)
		dws_step_unref(drop[i]);
	free(drop);
}
