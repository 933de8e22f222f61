/* Errors, checked allocation, small parsers and a string map. */
#include "internal.h"
#include "log.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <string.h>
#include <xxhash.h>
#if DWS_XXH_DISPATCH
#include <xxh_x86dispatch.h>
#endif

const char *dws_code_name(int code)
{
	switch (code) {
	case DWS_OK: return "ok";
	case DWS_EIO: return "I/O error";
	case DWS_EFORMAT: return "bad format";
	case DWS_EUNSUP: return "unsupported";
	case DWS_ENOENT: return "not found";
	case DWS_ENOMEM: return "out of memory";
	case DWS_EINVAL: return "invalid argument";
	case DWS_ETIMEDOUT: return "timed out";
	case DWS_EVERIFY: return "verification failed";
	}
	return "unknown error";
}

bool dws_code_transient(int code)
{
	return code == DWS_EIO || code == DWS_ETIMEDOUT || code == DWS_ENOENT;
}

int dws_fail(dws_error *err, int code, const char *fmt, ...)
{
	if (err && !err->code) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
		/* one line per error, whatever the input held */
		for (char *p = err->msg; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
		err->code = code;
	}
	return code;
}

/* The out-of-memory policy: no caller handles a failed allocation; the
 * process says so in one line, where its log goes, and aborts (a mount that
 * cannot allocate cannot serve a right byte either). */
static void oom(void)
{
	dws_log_error("out of memory: aborting");
	fputs("dwsfs: out of memory\n", stderr);
	abort();
}

void *dws_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		oom();
	return p;
}

void *dws_xcalloc(size_t n, size_t m)
{
	void *p = calloc(n ? n : 1, m ? m : 1);
	if (!p)
		oom();
	return p;
}

void *dws_xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		oom();
	return p;
}

enum { HUGE = 2u << 20 };

void dws_big_hint(void *p, size_t n)
{
	if (n >= 2 * HUGE && ((uintptr_t)p & (HUGE - 1)) == 0)
		madvise(p, n & ~(size_t)(HUGE - 1), MADV_HUGEPAGE); /* a hint: failure is fine */
}

void *dws_big_alloc_unhinted(size_t n)
{
	if (n < 2 * HUGE)
		return dws_xmalloc(n);
	void *p = NULL;
	if (posix_memalign(&p, HUGE, n) != 0)
		oom();
	return p;
}

void *dws_big_alloc(size_t n)
{
	void *p = dws_big_alloc_unhinted(n);
	dws_big_hint(p, n);
	return p;
}

char *dws_xstrdup(const char *s)
{
	char *p = strdup(s);
	if (!p)
		oom();
	return p;
}

char *dws_xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *s;
	va_start(ap, fmt);
	int r = vasprintf(&s, fmt, ap);
	va_end(ap);
	if (r < 0)
		oom();
	return s;
}

bool dws_parse_size(const char *s, uint64_t *out)
{
	if (!s || *s < '0' || *s > '9')
		return false;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return false;
	static const char units[] = "KMGT";
	unsigned shift = 0;
	const char *u = *end ? strchr(units, *end & ~0x20) : NULL;
	if (u) {
		shift = 10 * (unsigned)(u - units + 1);
		end++;
		if (end[0] == 'i' && end[1] == 'B')
			end += 2;
	}
	if (*end || v > (uint64_t)INT64_MAX >> shift)
		return false;
	*out = (uint64_t)v << shift;
	return true;
}

bool dws_parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	if (!s || !*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return false;
		if (!dws_mul_ok(v, 10, &v) || !dws_add_ok(v, (uint64_t)(*s - '0'), &v))
			return false;
	}
	*out = v;
	return true;
}

bool dws_pread_all(int fd, void *p, size_t n, uint64_t off)
{
	for (size_t done = 0; done < n;) {
		ssize_t r = pread(fd, (char *)p + done, n - done, (off_t)(off + done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0)
				errno = EIO; /* the file ends short */
			return false;
		}
		done += (size_t)r;
	}
	return true;
}

bool dws_pwrite_all(int fd, const void *p, size_t n, uint64_t off)
{
	for (size_t done = 0; done < n;) {
		ssize_t w = pwrite(fd, (const char *)p + done, n - done, (off_t)(off + done));
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			if (w == 0)
				errno = EIO; /* no progress */
			return false;
		}
		done += (size_t)w;
	}
	return true;
}

void dws_objects_free(dws_object *v, size_t n)
{
	if (!v)
		return;
	for (size_t i = 0; i < n; i++)
		free(v[i].key);
	free(v);
}

/* ---- bulk hashing ---- */

uint64_t dws_xxh3(const void *p, size_t n)
{
#if DWS_XXH_DISPATCH
	return XXH3_64bits_dispatch(p, n);
#else
	return XXH3_64bits(p, n);
#endif
}

void dws_xxh3_update(struct XXH3_state_s *st, const void *p, size_t n)
{
#if DWS_XXH_DISPATCH
	XXH3_64bits_update_dispatch(st, p, n);
#else
	XXH3_64bits_update(st, p, n);
#endif
}

/* ---- string map ---- */

static uint64_t hash_str(const char *s)
{
	return XXH3_64bits(s, strlen(s));
}

void dws_strmap_init(dws_strmap *m)
{
	memset(m, 0, sizeof(*m));
}

void dws_strmap_free(dws_strmap *m)
{
	free(m->keys);
	free(m->vals);
	memset(m, 0, sizeof(*m));
}

static void strmap_grow(dws_strmap *m)
{
	size_t cap = m->cap ? m->cap * 2 : 64;
	const char **keys = dws_xcalloc(cap, sizeof(*keys));
	size_t *vals = dws_xcalloc(cap, sizeof(*vals));
	for (size_t i = 0; i < m->cap; i++) {
		if (!m->keys[i])
			continue;
		size_t j = hash_str(m->keys[i]) & (cap - 1);
		while (keys[j])
			j = (j + 1) & (cap - 1);
		keys[j] = m->keys[i];
		vals[j] = m->vals[i];
	}
	free(m->keys);
	free(m->vals);
	m->keys = keys;
	m->vals = vals;
	m->cap = cap;
}

void dws_strmap_put(dws_strmap *m, const char *key, size_t val)
{
	if ((m->len + 1) * 4 >= m->cap * 3)
		strmap_grow(m);
	size_t j = hash_str(key) & (m->cap - 1);
	while (m->keys[j]) {
		if (strcmp(m->keys[j], key) == 0) {
			m->vals[j] = val;
			return;
		}
		j = (j + 1) & (m->cap - 1);
	}
	m->keys[j] = key;
	m->vals[j] = val;
	m->len++;
}

bool dws_strmap_get(const dws_strmap *m, const char *key, size_t *val)
{
	if (!m->cap)
		return false;
	size_t j = hash_str(key) & (m->cap - 1);
	while (m->keys[j]) {
		if (strcmp(m->keys[j], key) == 0) {
			*val = m->vals[j];
			return true;
		}
		j = (j + 1) & (m->cap - 1);
	}
	return false;
}

bool dws_key_is_safe(const char *key)
{
	if (!key || !*key || key[0] == '/')
		return false;
	const char *p = key;
	while (*p) {
		const char *e = strchr(p, '/');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		if (n == 0 || (n == 1 && p[0] == '.') ||
		    (n == 2 && p[0] == '.' && p[1] == '.'))
			return false;
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)p[i] < 0x20 || p[i] == '\\')
				return false;
		p += n;
		if (*p == '/')
			p++;
		if (e && !*p)
			return false; /* trailing slash */
	}
	return true;
}
