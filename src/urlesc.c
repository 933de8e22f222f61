/* Escaping for URLs: a query value, a path of segments (libcurl's rules),
 * a canonical (SigV4) query string. */
#include "http.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *dws_http_escape(const char *s)
{
	dws_http_global_init();
	char *e = curl_easy_escape(NULL, s, (int)strlen(s));
	char *out = dws_xstrdup(e);
	curl_free(e);
	return out;
}

char *dws_http_escape_path(const char *path)
{
	dws_http_global_init();
	size_t cap = strlen(path) * 3 + 1, len = 0;
	char *out = dws_xmalloc(cap);
	const char *p = path;
	for (;;) {
		size_t n = strcspn(p, "/");
		char *seg = curl_easy_escape(NULL, p, (int)n);
		size_t sl = strlen(seg);
		memcpy(out + len, seg, sl);
		len += sl;
		curl_free(seg);
		p += n;
		if (!*p)
			break;
		out[len++] = '/';
		p++;
	}
	out[len] = 0;
	return out;
}

struct qpair {
	char *name, *value;
};

static int qpair_cmp(const void *a, const void *b)
{
	const struct qpair *x = a, *y = b;
	int c = strcmp(x->name, y->name);
	return c ? c : strcmp(x->value, y->value);
}

char *dws_http_query(const char *const *kv, size_t n)
{
	struct qpair *q = dws_xcalloc(n ? n : 1, sizeof(*q));
	size_t len = 1;
	for (size_t i = 0; i < n; i++) {
		q[i].name = dws_http_escape(kv[2 * i]);
		q[i].value = dws_http_escape(kv[2 * i + 1] ? kv[2 * i + 1] : "");
		len += strlen(q[i].name) + strlen(q[i].value) + 2;
	}
	/* escaped names sort as SigV4 says: by byte, after escaping */
	qsort(q, n, sizeof(*q), qpair_cmp);
	char *out = dws_xmalloc(len), *p = out;
	*p = 0;
	for (size_t i = 0; i < n; i++) {
		p += sprintf(p, "%s%s=%s", i ? "&" : "", q[i].name, q[i].value);
		free(q[i].name);
		free(q[i].value);
	}
	free(q);
	return out;
}
