/* Escaping for URLs: a query value, a path of segments (libcurl's rules). */
#include "http.h"

#include <curl/curl.h>
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
