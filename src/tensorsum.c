/* Tensor checksums (see tensorsum.h). */
#include "tensorsum.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <xxhash.h>
#include <zlib.h>
#if DWS_XXH_DISPATCH
#include <xxh_x86dispatch.h>
#endif

struct dws_tsum {
	dws_xsum kind;
	XXH3_state_t *xxh;
	EVP_MD_CTX *md;
	uLong adler;
};

dws_tsum *dws_tsum_new(dws_xsum kind)
{
	if (kind != DWS_XSUM_XXH3_128 && kind != DWS_XSUM_SHA256 && kind != DWS_XSUM_ADLER32)
		return NULL;
	dws_tsum *t = dws_xcalloc(1, sizeof(*t));
	t->kind = kind;
	if (kind == DWS_XSUM_XXH3_128) {
		t->xxh = XXH3_createState();
		if (!t->xxh)
			abort(); /* out of memory: the core's policy */
		XXH3_128bits_reset(t->xxh);
	} else if (kind == DWS_XSUM_SHA256) {
		t->md = EVP_MD_CTX_new();
		if (!t->md || EVP_DigestInit_ex(t->md, EVP_sha256(), NULL) != 1)
			abort();
	} else {
		t->adler = adler32(0L, Z_NULL, 0); /* 1 */
	}
	return t;
}

void dws_tsum_update(dws_tsum *t, const void *p, size_t n)
{
	if (!t || !n)
		return;
	switch (t->kind) {
	case DWS_XSUM_XXH3_128:
#if DWS_XXH_DISPATCH
		XXH3_128bits_update_dispatch(t->xxh, p, n);
#else
		XXH3_128bits_update(t->xxh, p, n);
#endif
		break;
	case DWS_XSUM_SHA256:
		EVP_DigestUpdate(t->md, p, n);
		break;
	default:
		t->adler = adler32_z(t->adler, p, n);
		break;
	}
}

void dws_tsum_final(dws_tsum *t, char *hex)
{
	hex[0] = 0;
	if (!t)
		return;
	if (t->kind == DWS_XSUM_XXH3_128) {
		XXH128_hash_t h = XXH3_128bits_digest(t->xxh);
		snprintf(hex, 65, "%016llx%016llx", (unsigned long long)h.high64, (unsigned long long)h.low64);
	} else if (t->kind == DWS_XSUM_SHA256) {
		unsigned char d[32];
		unsigned len = 0;
		EVP_DigestFinal_ex(t->md, d, &len);
		for (unsigned i = 0; i < len && i < 32; i++)
			snprintf(hex + 2 * i, 3, "%02x", d[i]);
	} else {
		snprintf(hex, 65, "%08lx", (unsigned long)t->adler);
	}
	dws_tsum_free(t);
}

void dws_tsum_free(dws_tsum *t)
{
	if (!t)
		return;
	if (t->xxh)
		XXH3_freeState(t->xxh);
	EVP_MD_CTX_free(t->md);
	free(t);
}
