/* libFuzzer target: the sparse delta decoders.
 *
 * The input is a safetensors file. If its header parses, it is decoded as each
 * sparse variant with a resolver that accepts every parameter name and gives
 * it a size derived from a hash of the name (numel_for). A decode that succeeds must hand
 * back exactly what the file holds: one entry per .val/.idx pair, strictly
 * ascending indices below the resolved size, values inside the data. */
#include "fuzz_common.h"
#include "delta.h"

typedef struct resolved {
	char *name;
	uint64_t numel;
} resolved;

typedef struct resolve_ctx {
	uint64_t salt;
	resolved *v;
	size_t n, cap;
} resolve_ctx;

static uint64_t fnv1a(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= (unsigned char)s[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* The size the "model" gives a parameter: a pure function of its name and of
 * the file's model_version metadata (so that seeds with the same parameter
 * names still get different sizes). Most names get a size big enough for the
 * seeds' indices (so whole files decode and the checks below run); 1 in 256 gets a
 * tiny one (out of range indices), and 2 in 256 sit on the 2^32 element limit of
 * patches, either side of it. */
static uint64_t numel_for(const char *name, size_t n, uint64_t salt)
{
	uint64_t h = fnv1a(name, n) ^ salt;
	h *= 0x9e3779b97f4a7c15ull;
	h ^= h >> 29;
	unsigned bucket = (unsigned)(h >> 56);
	if (bucket == 0)
		return 1 + h % 128;
	if (bucket == 1)
		return (uint64_t)UINT32_MAX + 1; /* the largest supported */
	if (bucket == 2)
		return (uint64_t)UINT32_MAX + 2; /* refused: DWS_EUNSUP */
	return 1 + h % (1u << 22);
}

static int resolve(void *vctx, const char *name, size_t *slot, uint64_t *numel)
{
	resolve_ctx *c = vctx;
	FUZZ_CHECK(name && name[0]);
	if (c->n == c->cap) {
		c->cap = c->cap ? 2 * c->cap : 16;
		c->v = realloc(c->v, c->cap * sizeof(*c->v));
		FUZZ_CHECK(c->v);
	}
	c->v[c->n].name = strdup(name);
	FUZZ_CHECK(c->v[c->n].name);
	c->v[c->n].numel = numel_for(name, strlen(name), c->salt);
	*slot = c->n;
	*numel = c->v[c->n].numel;
	c->n++;
	return 0;
}

static void ctx_free(resolve_ctx *c)
{
	for (size_t i = 0; i < c->n; i++)
		free(c->v[i].name);
	free(c->v);
	c->v = NULL;
	c->n = c->cap = 0;
}

static const dws_st_tensor *find_pair(const dws_st_file *st, const char *stem,
				      size_t stem_len, const char *suf)
{
	size_t sl = strlen(suf);
	char *name = malloc(stem_len + sl + 1);
	FUZZ_CHECK(name);
	memcpy(name, stem, stem_len);
	memcpy(name + stem_len, suf, sl + 1);
	const dws_st_tensor *t = dws_st_find(st, name);
	free(name);
	return t;
}

static uint32_t rd32(const unsigned char *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static uint16_t rd16(const unsigned char *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return v;
}

static void check_decoded(const dws_st_file *st, const unsigned char *data,
			  uint64_t data_len, dws_variant v,
			  const dws_delta_param *ps, size_t np,
			  const resolve_ctx *c)
{
	const char *isuf = v == DWS_VAR_V1 ? ".indices" : ".idx";
	const char *vsuf = v == DWS_VAR_V1 ? ".values" : ".val";
	size_t vl = strlen(vsuf);
	uint64_t total = 0;
	volatile unsigned sink = 0;

	/* every tensor is one half of a pair, each pair is one entry */
	FUZZ_CHECK(dws_st_count(st) == 2 * np);
	FUZZ_CHECK(np <= c->n);
	for (size_t i = 0; i < np; i++) {
		const dws_delta_param *p = &ps[i];
		FUZZ_CHECK(p->name && p->name[0]);
		/* p->name is the value tensor's name (or, in older versions of
		 * delta.h, the parameter name): find the stem either way */
		size_t nl = strlen(p->name), stem_len = nl;
		if (nl > vl && strcmp(p->name + nl - vl, vsuf) == 0)
			stem_len = nl - vl;
		const dws_st_tensor *tv = find_pair(st, p->name, stem_len, vsuf);
		const dws_st_tensor *ti = find_pair(st, p->name, stem_len, isuf);
		FUZZ_CHECK(tv && ti);
		FUZZ_CHECK(tv->dtype == DWS_DT_BF16 && tv->ndim == 1);
		FUZZ_CHECK(ti->ndim == 1);
		FUZZ_CHECK(p->count == tv->numel && p->count == ti->numel);

		/* the slot is what the resolver returned for this very name */
		FUZZ_CHECK(p->slot < c->n);
		const resolved *r = &c->v[p->slot];
		FUZZ_CHECK(strlen(r->name) == stem_len &&
			   memcmp(r->name, p->name, stem_len) == 0);
		for (size_t j = 0; j < i; j++)
			FUZZ_CHECK(ps[j].slot != p->slot);
		uint64_t numel = r->numel;

		/* values: the value tensor's bytes, in place */
		FUZZ_CHECK(p->val == data + tv->begin);
		FUZZ_CHECK(tv->end <= data_len && tv->end - tv->begin == 2 * p->count);
		for (uint64_t k = 0; k < 2 * p->count; k++)
			sink += p->val[k];

		/* indices: ascending, in range, and what the file says */
		FUZZ_CHECK(p->count == 0 || p->idx);
		const unsigned char *src = data + ti->begin;
		uint64_t expect = 0;
		for (uint64_t k = 0; k < p->count; k++) {
			FUZZ_CHECK(p->idx[k] < numel);
			if (k)
				FUZZ_CHECK(p->idx[k] > p->idx[k - 1]);
			switch (v) {
			case DWS_VAR_V1:
			case DWS_VAR_RAW:
				FUZZ_CHECK(ti->dtype == DWS_DT_I32);
				FUZZ_CHECK((int32_t)rd32(src + 4 * k) == (int64_t)p->idx[k]);
				break;
			case DWS_VAR_GAP_DELTA:
				if (ti->dtype == DWS_DT_U16)
					expect += (uint64_t)rd16(src + 2 * k) + (k ? 1 : 0);
				else {
					FUZZ_CHECK(ti->dtype == DWS_DT_U32);
					expect += (uint64_t)rd32(src + 4 * k) + (k ? 1 : 0);
				}
				FUZZ_CHECK(expect == p->idx[k]);
				break;
			default:
				FUZZ_CHECK(0);
			}
		}
		total += p->count;
	}
	(void)sink;

	/* counts agree with the metadata that states them */
	const char *s = dws_st_meta_get(st, "num_changed_params");
	uint64_t want;
	if (s) {
		FUZZ_CHECK(dws_parse_u64(s, &want));
		FUZZ_CHECK(want == np);
	}
	s = dws_st_meta_get(st, "total_changed_elements");
	if (s) {
		FUZZ_CHECK(dws_parse_u64(s, &want));
		FUZZ_CHECK(want == total);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	dws_st_file *st = NULL;
	uint64_t need = 0;
	dws_error err = {0};
	int rc = dws_st_parse(data, size, size, "fuzz", &st, &need, &err);
	if (rc != 0) {
		if (rc < 0)
			fuzz_check_error(rc, &err);
		return 0;
	}
	const unsigned char *sec = data + dws_st_data_start(st);
	uint64_t sec_len = size - dws_st_data_start(st);

	const char *mv = dws_st_meta_get(st, "model_version");
	uint64_t salt = mv ? fnv1a(mv, strlen(mv)) : 0;

	static const dws_variant vars[] = {DWS_VAR_V1, DWS_VAR_RAW, DWS_VAR_GAP_DELTA};
	for (size_t vi = 0; vi < sizeof(vars) / sizeof(vars[0]); vi++) {
		resolve_ctx c = {.salt = salt};
		dws_delta_param *ps = NULL;
		size_t np = 0;
		memset(&err, 0, sizeof(err));
		rc = dws_delta_decode(st, sec, sec_len, vars[vi], "fuzz", resolve,
				      &c, &ps, &np, &err);
		if (rc == 0) {
			FUZZ_CHECK(err.code == 0);
			FUZZ_CHECK(np == 0 || ps);
			check_decoded(st, sec, sec_len, vars[vi], ps, np, &c);
			if (fuzz_verbose())
				fprintf(stderr, "fuzz: decoded as %s: %zu params\n",
					dws_variant_name(vars[vi]), np);
			dws_delta_free(ps, np);
		} else {
			fuzz_check_error(rc, &err);
		}
		ctx_free(&c);
	}

	/* nvcomp is refused, never decoded */
	{
		resolve_ctx c = {.salt = salt};
		dws_delta_param *ps = NULL;
		size_t np = 0;
		memset(&err, 0, sizeof(err));
		rc = dws_delta_decode(st, sec, sec_len, DWS_VAR_NVCOMP, "fuzz",
				      resolve, &c, &ps, &np, &err);
		FUZZ_CHECK(rc == DWS_EUNSUP && c.n == 0);
		fuzz_check_error(rc, &err);
		ctx_free(&c);
	}
	dws_st_free(st);
	return 0;
}
