/* Layouts (see layout.h). */
#include "layout.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* a + b * c, saturating: the sizes below are bounds, not sizes to allocate */
static uint64_t add_mul(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t p, s;
	return dws_mul_ok(b, c, &p) && dws_add_ok(a, p, &s) ? s : UINT64_MAX;
}

static uint32_t tree_add(dws_layout *L, uint32_t parent, const char *name,
			 size_t len, int64_t file)
{
	char *key = dws_xasprintf("%u/%.*s", parent, (int)len, name);
	size_t found;
	if (dws_strmap_get(&L->by_node_path, key, &found)) {
		free(key);
		return (uint32_t)found;
	}
	uint32_t i = (uint32_t)L->nnodes++;
	L->nodes = dws_xrealloc(L->nodes, L->nnodes * sizeof(*L->nodes));
	L->node_keys = dws_xrealloc(L->node_keys, L->nnodes * sizeof(*L->node_keys));
	L->node_keys[i] = key;
	/* the name is the tail of the key, which lives as long as the layout */
	L->nodes[i] = (dws_node){key + strlen(key) - len, parent, DWS_NODE_NONE, DWS_NODE_NONE, file};
	if (i) {
		dws_node *p = &L->nodes[parent];
		if (p->child == DWS_NODE_NONE) {
			p->child = i;
		} else {
			uint32_t c = p->child;
			while (L->nodes[c].next != DWS_NODE_NONE)
				c = L->nodes[c].next;
			L->nodes[c].next = i;
		}
	}
	dws_strmap_put(&L->by_node_path, key, i);
	return i;
}

static void build_tree(dws_layout *L)
{
	dws_strmap_init(&L->by_node_path);
	tree_add(L, 0, "", 0, -1);
	for (size_t f = 0; f < L->nfiles; f++) {
		const char *p = L->files[f].info.path;
		uint32_t dir = 0;
		for (;;) {
			const char *slash = strchr(p, '/');
			if (!slash) {
				tree_add(L, dir, p, strlen(p), (int64_t)f);
				break;
			}
			dir = tree_add(L, dir, p, (size_t)(slash - p), -1);
			if (L->nodes[dir].file >= 0)
				break; /* a file and a folder of one name: the file wins */
			p = slash + 1;
		}
	}
}

static int cmp_ext(const void *a, const void *b)
{
	const dws_extent *x = a, *y = b;
	return x->off < y->off ? -1 : x->off > y->off;
}

int dws_layout_add_file(dws_layout *L, const char *path, dws_blob *blob, const dws_st_file *st,
			char *(*trainer_name)(void *ctx, const char *name), void *ctx, dws_error *err)
{
	L->files = dws_xrealloc(L->files, (L->nfiles + 1) * sizeof(*L->files));
	dws_out_file *f = &L->files[L->nfiles];
	memset(f, 0, sizeof(*f));
	f->info.path = dws_xstrdup(path);
	f->info.size = dws_blob_size(blob);
	f->info.kind = st ? DWS_FILE_SAFETENSORS : DWS_FILE_PLAIN;
	f->blob = dws_blob_ref(blob);
	uint32_t fi = (uint32_t)L->nfiles++;
	size_t nt = st ? dws_st_count(st) : 0;
	f->ext = dws_xcalloc(2 * nt + 2, sizeof(*f->ext));
	if (!st) {
		f->ext[f->next++] = (dws_extent){0, f->info.size, -1};
		return DWS_OK;
	}
	uint64_t ds = dws_st_data_start(st);
	dws_extent *tx = dws_xcalloc(nt ? nt : 1, sizeof(*tx));
	size_t ntx = 0;
	L->slots = dws_xrealloc(L->slots, (L->nslots + nt) * sizeof(*L->slots));
	for (size_t i = 0; i < nt; i++) {
		const dws_st_tensor *t = dws_st_at(st, i);
		size_t dup;
		if (dws_strmap_get(&L->by_name, t->name, &dup)) {
			free(tx);
			return dws_fail(err, DWS_EFORMAT, "%s: tensor '%s' is also in %s", dws_blob_name(blob), t->name,
					L->files[L->slots[dup].file].info.path);
		}
		dws_slot *sl = &L->slots[L->nslots];
		sl->name = dws_xstrdup(t->name);
		sl->trainer = trainer_name(ctx, t->name);
		sl->file = fi;
		sl->off = ds + t->begin;
		sl->dtype = t->dtype;
		sl->numel = t->numel;
		sl->ndim = t->ndim;
		sl->shape = dws_xcalloc(t->ndim ? t->ndim : 1, sizeof(uint64_t));
		memcpy(sl->shape, t->shape, t->ndim * sizeof(uint64_t));
		dws_strmap_put(&L->by_name, sl->name, L->nslots);
		if (t->end > t->begin)
			tx[ntx++] = (dws_extent){ds + t->begin, t->end - t->begin, (int64_t)L->nslots};
		L->nslots++;
	}
	qsort(tx, ntx, sizeof(*tx), cmp_ext);
	uint64_t pos = 0;
	for (size_t i = 0; i < ntx; i++) {
		if (tx[i].off > pos)
			f->ext[f->next++] = (dws_extent){pos, tx[i].off - pos, -1};
		f->ext[f->next++] = tx[i];
		pos = tx[i].off + tx[i].len;
	}
	if (pos < f->info.size)
		f->ext[f->next++] = (dws_extent){pos, f->info.size - pos, -1};
	free(tx);
	return DWS_OK;
}

dws_layout *dws_layout_new(void)
{
	dws_layout *L = dws_xcalloc(1, sizeof(*L));
	atomic_init(&L->refs, 1);
	dws_strmap_init(&L->by_name);
	dws_strmap_init(&L->by_path);
	return L;
}

void dws_layout_seal(dws_layout *L)
{
	for (size_t i = 0; i < L->nfiles; i++)
		dws_strmap_put(&L->by_path, L->files[i].info.path, i);
	build_tree(L);
}

dws_layout *dws_layout_ref(dws_layout *L)
{
	atomic_fetch_add(&L->refs, 1);
	return L;
}

void dws_layout_unref(dws_layout *l)
{
	if (!l || atomic_fetch_sub(&l->refs, 1) != 1)
		return;
	for (size_t i = 0; i < l->nfiles; i++) {
		free((char *)l->files[i].info.path);
		free(l->files[i].ext);
		dws_blob_unref(l->files[i].blob);
	}
	for (size_t i = 0; i < l->nslots; i++) {
		free(l->slots[i].name);
		free(l->slots[i].trainer);
		free(l->slots[i].shape);
	}
	for (size_t i = 0; i < l->nnodes; i++)
		free(l->node_keys[i]);
	free(l->node_keys);
	free(l->nodes);
	dws_strmap_free(&l->by_node_path);
	dws_strmap_free(&l->by_name);
	dws_strmap_free(&l->by_path);
	free(l->files);
	free(l->slots);
	free(l);
}

uint64_t dws_layout_patchable(const dws_layout *L)
{
	uint64_t n = 0;
	for (size_t i = 0; i < L->nslots; i++)
		if (dws_dtype_is_float(L->slots[i].dtype))
			n = add_mul(n, L->slots[i].numel, 1);
	return n;
}

uint64_t dws_layout_tensor_bytes(const dws_layout *L)
{
	uint64_t n = 0;
	for (size_t i = 0; i < L->nslots; i++)
		n = add_mul(n, L->slots[i].numel, dws_dtype_size(L->slots[i].dtype));
	return n;
}

uint32_t dws_layout_node_lookup(const dws_layout *L, uint32_t dir, const char *name)
{
	char *key = dws_xasprintf("%u/%s", dir, name);
	size_t i;
	bool ok = dws_strmap_get(&L->by_node_path, key, &i);
	free(key);
	return ok ? (uint32_t)i : DWS_NODE_NONE;
}

bool dws_layout_same(const dws_layout *a, const dws_layout *b)
{
	if (a == b)
		return true;
	if (a->nslots != b->nslots || a->nfiles != b->nfiles)
		return false;
	for (size_t i = 0; i < a->nslots; i++) {
		const dws_slot *x = &a->slots[i], *y = &b->slots[i];
		if (strcmp(x->name, y->name) || x->file != y->file || x->off != y->off || x->dtype != y->dtype ||
		    x->numel != y->numel || x->ndim != y->ndim || memcmp(x->shape, y->shape, x->ndim * sizeof(uint64_t)))
			return false;
	}
	return true;
}
