/* Open handles of the FUSE layer: every one is in a list, so the handles
 * whose release never came are freed at shutdown. */
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
	else if (h->kind == H_PATCH)
		pt_release_fd(h->ino, h->backing);
	dws_step_unref(h->step);
	dws_patchfile_unref(h->patch);
	free(h->buf);
	free(h);
}

void handles_free_all(struct fs *f)
{
	while (f->handles)
		handle_free(f, f->handles);
}
