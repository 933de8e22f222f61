/* dwsctl extract: write a step's folder atomically. Files go into a hidden
 * sibling folder that is renamed into place only when everything is written;
 * a failure removes it. */
#include "step.h"
#include "digest.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* 1 MiB: larger writes measured slower here (page reclaim of big buffers) */
enum { EXTRACT_BUF = 1 << 20 };

static int mkdirs_for(int dirfd, const char *path, dws_error *err)
{
	char *p = dws_xstrdup(path);
	int rc = DWS_OK;
	for (char *s = strchr(p, '/'); s; s = strchr(s + 1, '/')) {
		*s = 0;
		if (mkdirat(dirfd, p, 0755) != 0 && errno != EEXIST)
			rc = dws_fail(err, DWS_EIO, "%s: cannot create folder: %s", p, strerror(errno));
		*s = '/';
		if (rc)
			break;
	}
	free(p);
	return rc;
}

static int remove_tree(int dirfd, const char *name)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return unlinkat(dirfd, name, 0);
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -1;
	}
	struct dirent *de;
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			remove_tree(fd, de->d_name);
	closedir(d);
	return unlinkat(dirfd, name, AT_REMOVEDIR);
}

/* A two-stage pipeline over 1 MiB pieces in file order: a producer thread
 * reads and patches, this thread writes. Two writers to one file would only
 * queue on the inode lock; this way the patching overlaps the kernel's copy. */
enum { RING = 4 };

struct piece {
	size_t file;
	uint64_t off;
	size_t n;
	int state; /* 0 free, 1 filled, 2 failed */
	char *buf;
};

/* outdir must not exist, or be an empty folder (renamed over). */
static int check_outdir(const char *outdir, dws_error *err)
{
	struct stat st;
	if (lstat(outdir, &st) == 0) {
		bool empty = false;
		if (S_ISDIR(st.st_mode)) {
			DIR *d = opendir(outdir);
			empty = true;
			struct dirent *de;
			while (d && (de = readdir(d)))
				if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
					empty = false;
			if (d)
				closedir(d);
		}
		if (!empty)
			return dws_fail(err, DWS_EINVAL, "%s: already exists and is not an empty folder", outdir);
	}
	return DWS_OK;
}

struct job {
	dws_step *s;
	int *fds;
	size_t nf;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct piece ring[RING];
	bool stop;      /* the writer failed: the producer stops */
	dws_error err;  /* the producer's error */
};

/* The k-th piece in file order, or false past the end. */
static bool next_piece(const dws_step *s, size_t *file, uint64_t *off, size_t *n)
{
	while (*file < dws_step_file_count(s) && *off >= dws_step_file(s, *file)->size) {
		(*file)++;
		*off = 0;
	}
	if (*file >= dws_step_file_count(s))
		return false;
	uint64_t left = dws_step_file(s, *file)->size - *off;
	*n = left < EXTRACT_BUF ? (size_t)left : EXTRACT_BUF;
	return true;
}

static void *producer(void *arg)
{
	struct job *j = arg;
	size_t file = 0, n = 0;
	uint64_t off = 0;
	for (unsigned k = 0; next_piece(j->s, &file, &off, &n); k++) {
		struct piece *p = &j->ring[k % RING];
		pthread_mutex_lock(&j->lock);
		while (p->state != 0 && !j->stop)
			pthread_cond_wait(&j->cond, &j->lock);
		bool stop = j->stop;
		pthread_mutex_unlock(&j->lock);
		if (stop)
			break;
		dws_error e = {0};
		int64_t got = dws_step_read(j->s, file, off, p->buf, n, &e);
		pthread_mutex_lock(&j->lock);
		p->file = file;
		p->off = off;
		p->n = n;
		if (got != (int64_t)n) {
			if (got >= 0)
				dws_fail(&e, DWS_EIO, "%s: ended early at %llu", dws_step_file(j->s, file)->path, (unsigned long long)off);
			j->err = e;
			p->state = 2;
		} else {
			p->state = 1;
		}
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		if (got != (int64_t)n)
			break;
		off += n;
	}
	return NULL;
}

/* The writer: takes the pieces in order. */
static int write_pieces(struct job *j, const dws_progress *pr, uint64_t total, dws_error *err)
{
	size_t file = 0, n = 0;
	uint64_t off = 0, done = 0;
	int rc = DWS_OK;
	for (unsigned k = 0; !rc && next_piece(j->s, &file, &off, &n); k++, off += n) {
		struct piece *p = &j->ring[k % RING];
		pthread_mutex_lock(&j->lock);
		while (p->state == 0)
			pthread_cond_wait(&j->cond, &j->lock);
		int state = p->state;
		pthread_mutex_unlock(&j->lock);
		if (state == 2)
			return dws_fail(err, j->err.code, "%s", j->err.msg);
		const char *path = dws_step_file(j->s, p->file)->path;
		if (!dws_pwrite_all(j->fds[p->file], p->buf, p->n, p->off))
			rc = dws_fail(err, DWS_EIO, "%s: write: %s", path, strerror(errno));
		done += p->n;
		if (!rc && pr && pr->fn)
			pr->fn(pr->ctx, path, done, total);
		pthread_mutex_lock(&j->lock);
		p->state = 0;
		j->stop = rc != DWS_OK;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
	}
	return rc;
}

/* ---- the output folder: a hidden sibling renamed into place at the end ---- */

struct outdir {
	char *o1, *o2, *tmpname;
	const char *parent, *base;
	int pfd, tfd;
	int *fds;
	size_t nf;
};

/* Create the temp folder and every file of step s in it (empty). */
static int outdir_open(struct outdir *o, const char *outdir, const dws_step *s,
		       dws_error *err)
{
	memset(o, 0, sizeof(*o));
	o->pfd = o->tfd = -1;
	int rc = check_outdir(outdir, err);
	if (rc)
		return rc;
	o->o1 = dws_xstrdup(outdir);
	o->o2 = dws_xstrdup(outdir);
	o->parent = dirname(o->o1);
	o->base = basename(o->o2);
	o->tmpname = dws_xasprintf(".%s.dwsfs-tmp.%ld", o->base, (long)getpid());
	o->nf = dws_step_file_count(s);
	o->fds = dws_xcalloc(o->nf ? o->nf : 1, sizeof(int));
	for (size_t i = 0; i < o->nf; i++)
		o->fds[i] = -1;
	o->pfd = open(o->parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (o->pfd < 0)
		return dws_fail(err, DWS_EIO, "%s: cannot open the parent folder: %s", o->parent, strerror(errno));
	if (mkdirat(o->pfd, o->tmpname, 0755) != 0) {
		rc = dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", o->parent, o->tmpname, strerror(errno));
		close(o->pfd);
		o->pfd = -1; /* not ours to remove */
		return rc;
	}
	o->tfd = openat(o->pfd, o->tmpname, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (o->tfd < 0)
		return dws_fail(err, DWS_EIO, "%s/%s: cannot open: %s", o->parent, o->tmpname, strerror(errno));
	for (size_t i = 0; i < o->nf; i++) {
		const dws_file_info *fi = dws_step_file(s, i);
		rc = mkdirs_for(o->tfd, fi->path, err);
		if (rc)
			return rc;
		o->fds[i] = openat(o->tfd, fi->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644); /* read back: verify */
		if (o->fds[i] < 0)
			return dws_fail(err, DWS_EIO, "%s/%s: cannot create: %s", outdir, fi->path, strerror(errno));
	}
	return DWS_OK;
}

/* Close everything; on success move the folder into place, else remove it. */
static int outdir_close(struct outdir *o, const dws_step *s, const char *outdir,
			int rc, dws_error *err)
{
	for (size_t i = 0; i < o->nf; i++)
		if (o->fds[i] >= 0 && close(o->fds[i]) != 0 && !rc)
			rc = dws_fail(err, DWS_EIO, "%s: close: %s", dws_step_file(s, i)->path, strerror(errno));
	if (o->tfd >= 0)
		close(o->tfd);
	if (o->pfd >= 0) {
		if (!rc && renameat(o->pfd, o->tmpname, o->pfd, o->base) != 0)
			rc = dws_fail(err, DWS_EIO, "%s: cannot move the finished folder into place: %s", outdir, strerror(errno));
		if (rc)
			remove_tree(o->pfd, o->tmpname);
		close(o->pfd);
	}
	free(o->fds);
	free(o->tmpname);
	free(o->o1);
	free(o->o2);
	return rc;
}

/* What the written folder is checked against before it is moved into place:
 * the producer's state checksum of step `step` (want NULL: nothing). */
struct check {
	dws_builder *bl;
	uint64_t step;
	const char *want, *what;
};

struct written {
	const dws_layout *L;
	const int *fds;
};

/* Elements [e0, e0+n) of a slot's tensor, read back from the written file
 * (from the page cache: it was just written). */
static int written_bf16(void *ctx, size_t slot, uint64_t e0, uint64_t n, uint16_t *out,
			void *scratch, dws_error *err)
{
	const struct written *w = ctx;
	const dws_slot *sl = &w->L->slots[slot];
	size_t osz = dws_dtype_size(sl->dtype);
	char *raw = sl->dtype == DWS_DT_BF16 ? (void *)out : scratch;
	uint64_t off = sl->off + e0 * osz;
	for (size_t got = 0, want = (size_t)(n * osz); got < want;) {
		ssize_t r = pread(w->fds[sl->file], raw + got, want - got, (off_t)(off + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return dws_fail(err, DWS_EIO, "%s: reading back what was written: %s", w->L->files[sl->file].info.path,
					r < 0 ? strerror(errno) : "short file");
		got += (size_t)r;
	}
	dws_to_bf16(sl->dtype, raw, n, out);
	return DWS_OK;
}

/* The state digest of the folder just written (the tensors of s's layout
 * that are trained, or patched per `patched`, may be NULL) against the
 * producer's checksum. An F16 output holds patched BF16 values rounded, so
 * where one is trained the digest comes from the step built instead. */
static int check_written(const struct check *c, dws_step *s, const uint8_t *patched,
			 const int *fds, dws_error *err)
{
	if (!c || !c->want || !c->want[0])
		return DWS_OK;
	const dws_layout *L = dws_step_layout(s);
	dws_digest_item *items = dws_xcalloc(L->nslots ? L->nslots : 1, sizeof(*items));
	size_t n = 0;
	bool f16 = false;
	for (size_t i = 0; i < L->nslots; i++)
		if (dws_step_trained(s, i) || (patched && patched[i])) {
			items[n++] = (dws_digest_item){L->slots[i].trainer, L->slots[i].numel, i};
			f16 |= L->slots[i].dtype == DWS_DT_F16;
		}
	uint64_t h = 0;
	int rc;
	if (f16) {
		dws_step *built = NULL;
		rc = dws_builder_build(c->bl, c->step, &built, err);
		if (!rc)
			rc = dws_step_state_digest(built, &h, err);
		dws_step_unref(built);
	} else {
		struct written w = {L, fds};
		rc = dws_state_digest(items, n, written_bf16, &w, &h, err);
	}
	free(items);
	return rc ? rc : dws_state_check(h, c->want, c->what, c->step, err);
}

static int extract_built(dws_step *s, const char *outdir, const dws_progress *pr,
			 const struct check *c, dws_error *err)
{
	struct outdir o;
	int rc = outdir_open(&o, outdir, s, err);
	struct job j = {.s = s, .fds = o.fds, .nf = o.nf};
	uint64_t total = 0;
	for (size_t i = 0; i < o.nf; i++)
		total += dws_step_file(s, i)->size;
	if (!rc) {
		pthread_mutex_init(&j.lock, NULL);
		pthread_cond_init(&j.cond, NULL);
		for (int k = 0; k < RING; k++)
			j.ring[k].buf = dws_xmalloc(EXTRACT_BUF);
		pthread_t th;
		if (pthread_create(&th, NULL, producer, &j) != 0) {
			rc = dws_fail(err, DWS_EIO, "%s: cannot start a thread", outdir);
		} else {
			rc = write_pieces(&j, pr, total, err);
			pthread_mutex_lock(&j.lock);
			j.stop = true;
			pthread_cond_broadcast(&j.cond);
			pthread_mutex_unlock(&j.lock);
			pthread_join(th, NULL);
		}
		for (int k = 0; k < RING; k++)
			free(j.ring[k].buf);
		pthread_cond_destroy(&j.cond);
		pthread_mutex_destroy(&j.lock);
	}
	if (!rc)
		rc = check_written(c, s, NULL, o.fds, err);
	return outdir_close(&o, s, outdir, rc, err);
}

int dws_extract(dws_step *s, const char *outdir, const dws_progress *pr,
		dws_error *err)
{
	return extract_built(s, outdir, pr, NULL, err);
}

/* ---- streaming extract ----
 *
 * A step N = anchor + sparse deltas is written without building its patch
 * index: each tensor is read from the anchor window by window, every delta's
 * param for that tensor is applied to the window in chain order (newest wins)
 * straight from the file's encoded indices, and the window is written out.
 * The indices are checked as they are applied (ascending, inside the tensor),
 * exactly as decoding checks them; a bad one fails the extract and removes
 * the output. Tensors are shared among threads, largest first. */

enum { STREAM_WIN = 256 * 1024 }; /* bytes patched while they sit in L2 */

struct srun {
	const dws_delta_param *p;
	const char *what;
};

struct scur {
	uint64_t pos;   /* next entry */
	uint64_t last;  /* the index of entry pos-1; UINT64_MAX before the first */
};

struct sitem {
	size_t file, ext;
	uint64_t len;
};

/* A patched window waiting to be written. Buffered writes to one file take
 * its inode lock, so only one thread writes at a time: a thread that finds
 * the writer's lock free writes every queued window, the others go on
 * reading and patching. */
struct wbuf {
	unsigned char *buf;
	size_t n;
	uint64_t off;
	size_t file;
	struct wbuf *next;
};

struct stream {
	dws_step *first;
	const dws_layout *L;
	const int *fds;
	struct srun *runs;   /* grouped by slot, chain order within a slot */
	size_t *slot_run;    /* per slot + 1: where its runs start */
	struct sitem *items;
	size_t nitems;
	atomic_size_t next;
	atomic_bool failed;
	uint64_t done, total;   /* under wlock */
	const dws_progress *pr;
	pthread_mutex_t lock;   /* err, the queue and the free list */
	pthread_mutex_t wlock;  /* held while writing */
	struct wbuf *free, *head, **tail;
	struct wbuf *bufs;
	dws_error err;
};

static void stream_fail(struct stream *S, const dws_error *e)
{
	pthread_mutex_lock(&S->lock);
	if (!S->err.code)
		S->err = *e;
	pthread_mutex_unlock(&S->lock);
	atomic_store(&S->failed, true);
}

/* With wlock held: write every queued window. */
static void stream_drain(struct stream *S)
{
	for (;;) {
		pthread_mutex_lock(&S->lock);
		struct wbuf *w = S->head;
		if (w) {
			S->head = w->next;
			if (!S->head)
				S->tail = &S->head;
		}
		pthread_mutex_unlock(&S->lock);
		if (!w)
			return;
		dws_error e = {0};
		if (!atomic_load(&S->failed)) {
			const char *path = S->L->files[w->file].info.path;
			if (!dws_pwrite_all(S->fds[w->file], w->buf, w->n, w->off)) {
				dws_fail(&e, DWS_EIO, "%s: write: %s", path, strerror(errno));
				stream_fail(S, &e);
			}
			S->done += w->n;
			if (S->pr && S->pr->fn)
				S->pr->fn(S->pr->ctx, path, S->done, S->total);
		}
		pthread_mutex_lock(&S->lock);
		w->next = S->free;
		S->free = w;
		pthread_mutex_unlock(&S->lock);
	}
}

/* A free buffer; when none is, this thread writes the queue first. */
static struct wbuf *stream_get(struct stream *S)
{
	for (;;) {
		pthread_mutex_lock(&S->lock);
		struct wbuf *w = S->free;
		if (w)
			S->free = w->next;
		pthread_mutex_unlock(&S->lock);
		if (w)
			return w;
		pthread_mutex_lock(&S->wlock);
		stream_drain(S);
		pthread_mutex_unlock(&S->wlock);
	}
}

static void stream_put(struct stream *S, struct wbuf *w)
{
	w->next = NULL;
	pthread_mutex_lock(&S->lock);
	*S->tail = w;
	S->tail = &w->next;
	pthread_mutex_unlock(&S->lock);
	if (pthread_mutex_trylock(&S->wlock) == 0) {
		stream_drain(S);
		pthread_mutex_unlock(&S->wlock);
	}
}

/* The index of entry k of a param, or false if it breaks the order. */
static int order_error(const struct srun *r, const struct scur *c, dws_error *err)
{
	return dws_idx_order_fail(r->p, c->pos, c->last, r->what, err);
}

/* Apply the entries of run r with index in [w0, w1) to buf, which holds
 * elements [w0, w1) of the tensor in dtype out. */
static int apply_window(const struct srun *r, struct scur *c, uint64_t w0, uint64_t w1,
			unsigned char *buf, dws_dtype out, dws_error *err)
{
	const dws_delta_param *p = r->p;
	uint64_t pos = c->pos, last = c->last, n = p->count, ix;
	const unsigned char *val = p->val;
	if (out == DWS_DT_BF16 && ((uintptr_t)buf & 1) == 0) {
		uint16_t *d = (uint16_t *)(void *)buf;
		if (p->idx_kind == DWS_IDX_GAP16) {
			/* the common case, kept tight: the kind is a constant */
			for (; pos < n; pos++) {
				dws_idx_entry(DWS_IDX_GAP16, p->idx_raw, pos, last, &ix);
				if (ix >= w1)
					break;
				memcpy(&d[ix - w0], val + 2 * pos, 2);
				last = ix;
			}
		} else {
			for (; pos < n; pos++) {
				if (!dws_idx_entry(p->idx_kind, p->idx_raw, pos, last, &ix)) {
					*c = (struct scur){pos, last};
					return order_error(r, c, err);
				}
				if (ix >= w1)
					break;
				memcpy(&d[ix - w0], val + 2 * pos, 2);
				last = ix;
			}
		}
	} else {
		size_t osz = dws_dtype_size(out);
		for (; pos < n; pos++) {
			if (!dws_idx_entry(p->idx_kind, p->idx_raw, pos, last, &ix)) {
				*c = (struct scur){pos, last};
				return order_error(r, c, err);
			}
			if (ix >= w1)
				break;
			uint16_t v;
			memcpy(&v, val + 2 * pos, 2);
			unsigned char *e = buf + (ix - w0) * osz;
			if (out == DWS_DT_F32) {
				uint32_t u = (uint32_t)v << 16;
				memcpy(e, &u, 4);
			} else if (out == DWS_DT_F16) {
				uint16_t h = dws_bf16_to_f16(v);
				memcpy(e, &h, 2);
			} else {
				memcpy(e, &v, 2);
			}
			last = ix;
		}
	}
	*c = (struct scur){pos, last};
	return DWS_OK;
}

/* Entries left once the whole tensor is written lie past its end. */
static int check_consumed(const struct srun *r, const struct scur *c, uint64_t numel,
			  dws_error *err)
{
	if (c->pos >= r->p->count)
		return DWS_OK;
	uint64_t ix;
	if (!dws_idx_entry(r->p->idx_kind, r->p->idx_raw, c->pos, c->last, &ix))
		return order_error(r, c, err);
	return dws_idx_range_fail(r->p, ix, numel, r->what, err);
}

static int stream_item(struct stream *S, const struct sitem *it, dws_error *err)
{
	const dws_out_file *f = &S->L->files[it->file];
	const dws_extent *x = &f->ext[it->ext];
	const dws_slot *sl = x->slot >= 0 ? &S->L->slots[x->slot] : NULL;
	size_t r0 = sl ? S->slot_run[x->slot] : 0, nr = sl ? S->slot_run[x->slot + 1] - r0 : 0;
	size_t osz = sl ? dws_dtype_size(sl->dtype) : 1;
	struct scur *cur = nr ? dws_xcalloc(nr, sizeof(*cur)) : NULL;
	for (size_t r = 0; r < nr; r++)
		cur[r].last = UINT64_MAX;
	uint64_t win = STREAM_WIN - STREAM_WIN % osz;
	int rc = DWS_OK;
	for (uint64_t at = 0; !rc && at < x->len && !atomic_load(&S->failed); at += win) {
		size_t n = (size_t)(x->len - at < win ? x->len - at : win);
		struct wbuf *w = stream_get(S);
		int64_t got = dws_step_read(S->first, it->file, x->off + at, w->buf, n, err);
		if (got != (int64_t)n)
			rc = got < 0 ? (int)got : dws_fail(err, DWS_EIO, "%s: ended early at %llu", f->info.path, (unsigned long long)(x->off + at));
		uint64_t w0 = at / osz, w1 = w0 + n / osz;
		for (size_t r = 0; !rc && r < nr; r++)
			rc = apply_window(&S->runs[r0 + r], &cur[r], w0, w1, w->buf, sl->dtype, err);
		*w = (struct wbuf){w->buf, rc ? 0 : n, x->off + at, it->file, NULL};
		stream_put(S, w);
	}
	for (size_t r = 0; !rc && r < nr && !atomic_load(&S->failed); r++)
		rc = check_consumed(&S->runs[r0 + r], &cur[r], sl->numel, err);
	free(cur);
	return rc;
}

static void *stream_main(void *arg)
{
	struct stream *S = arg;
	for (;;) {
		size_t i = atomic_fetch_add(&S->next, 1);
		if (i >= S->nitems || atomic_load(&S->failed))
			break;
		dws_error e = {0};
		if (stream_item(S, &S->items[i], &e)) {
			stream_fail(S, &e);
			break;
		}
	}
	return NULL;
}

static int cmp_item(const void *a, const void *b)
{
	const struct sitem *x = a, *y = b;
	return x->len < y->len ? 1 : x->len > y->len ? -1 : 0;
}

static int stream_extract(dws_lazy_chain *lc, const char *outdir, const dws_progress *pr,
			  const struct check *c, dws_error *err)
{
	dws_step *first = lc->first;
	const dws_layout *L = dws_step_layout(first);
	struct stream S = {.first = first, .L = L, .pr = pr};
	/* runs grouped by slot (a counting sort that keeps chain order) */
	S.slot_run = dws_xcalloc(L->nslots + 1, sizeof(size_t));
	size_t total_runs = 0;
	for (size_t i = 0; i < lc->nfiles; i++)
		for (size_t k = 0; k < lc->files[i].np; k++) {
			S.slot_run[lc->files[i].ps[k].slot + 1]++;
			total_runs++;
		}
	for (size_t s = 0; s < L->nslots; s++)
		S.slot_run[s + 1] += S.slot_run[s];
	size_t *fill = dws_xcalloc(L->nslots + 1, sizeof(size_t));
	memcpy(fill, S.slot_run, L->nslots * sizeof(size_t));
	S.runs = dws_xcalloc(total_runs ? total_runs : 1, sizeof(*S.runs));
	int rc = DWS_OK;
	for (size_t i = 0; i < lc->nfiles; i++)
		for (size_t k = 0; k < lc->files[i].np; k++) {
			const dws_delta_param *p = &lc->files[i].ps[k];
			S.runs[fill[p->slot]++] = (struct srun){p, lc->files[i].what};
			/* a tensor with no bytes has no extent to check its runs */
			if (!rc && L->slots[p->slot].numel == 0 && p->count) {
				struct scur cur = {0, UINT64_MAX};
				rc = check_consumed(&S.runs[fill[p->slot] - 1], &cur, 0, err);
			}
		}
	free(fill);
	for (size_t fi = 0; fi < L->nfiles; fi++) {
		S.total += L->files[fi].info.size;
		for (size_t k = 0; k < L->files[fi].next; k++) {
			S.items = dws_xrealloc(S.items, (S.nitems + 1) * sizeof(*S.items));
			S.items[S.nitems++] = (struct sitem){fi, k, L->files[fi].ext[k].len};
		}
	}
	qsort(S.items, S.nitems, sizeof(*S.items), cmp_item);
	struct outdir o;
	if (!rc)
		rc = outdir_open(&o, outdir, first, err);
	else
		memset(&o, 0, sizeof(o)), o.pfd = o.tfd = -1;
	if (!rc) {
		S.fds = o.fds;
		pthread_mutex_init(&S.lock, NULL);
		pthread_mutex_init(&S.wlock, NULL);
		long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		size_t nth = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (size_t)ncpu;
		size_t nbuf = 4 * nth;
		S.bufs = dws_xcalloc(nbuf, sizeof(*S.bufs));
		S.tail = &S.head;
		for (size_t b = 0; b < nbuf; b++) {
			S.bufs[b].buf = dws_xmalloc(STREAM_WIN);
			S.bufs[b].next = S.free;
			S.free = &S.bufs[b];
		}
		pthread_t th[8];
		size_t started = 0;
		for (size_t t = 1; t < nth; t++) {
			if (pthread_create(&th[t], NULL, stream_main, &S) != 0)
				break;
			started = t;
		}
		stream_main(&S);
		for (size_t t = 1; t <= started; t++)
			pthread_join(th[t], NULL);
		stream_drain(&S); /* what the last trylocks missed */
		if (S.err.code)
			rc = dws_fail(err, S.err.code, "%s", S.err.msg);
		for (size_t b = 0; b < nbuf; b++)
			free(S.bufs[b].buf);
		free(S.bufs);
		pthread_mutex_destroy(&S.wlock);
		pthread_mutex_destroy(&S.lock);
	}
	if (!rc) {
		uint8_t *patched = dws_xcalloc(L->nslots ? L->nslots : 1, 1);
		for (size_t i = 0; i < L->nslots; i++)
			patched[i] = S.slot_run[i + 1] > S.slot_run[i];
		rc = check_written(c, first, patched, o.fds, err);
		free(patched);
	}
	rc = outdir_close(&o, first, outdir, rc, err);
	free(S.items);
	free(S.runs);
	free(S.slot_run);
	return rc;
}

int dws_extract_step(dws_builder *bl, uint64_t step, const char *outdir, bool verify,
		     const dws_progress *pr, dws_error *err)
{
	int rc = check_outdir(outdir, err);
	if (rc)
		return rc;
	const dws_catalog *cat = dws_builder_catalog(bl);
	const dws_stepfile *f = dws_catalog_find(cat, step);
	char *what = f ? dws_xasprintf("%s/%s", dws_bucket_uri(dws_catalog_bucket(cat)), f->obj.key) : NULL;
	struct check c = {bl, step, verify && f ? f->state_xxh3 : NULL, what};
	dws_lazy_chain *lc = NULL;
	rc = dws_builder_lazy_chain(bl, step, &lc, err);
	if (!rc && lc) {
		rc = stream_extract(lc, outdir, pr, &c, err);
	} else if (!rc) {
		/* an anchor, a base-only chain or one with dense files: build it */
		dws_step *s = NULL;
		rc = dws_builder_build(bl, step, &s, err);
		if (!rc)
			rc = extract_built(s, outdir, pr, &c, err);
		dws_step_unref(s);
	}
	dws_lazy_chain_free(lc);
	free(what);
	return rc;
}
