/* The checksums SkyRL and miles write of each resulting tensor: xxh3-128
 * (libxxhash), sha256 (OpenSSL's libcrypto, which libcurl's TLS already
 * links), adler32 (zlib). blake3 has no Debian 12 library: refused by the
 * caller unless verification is off. Streaming: init, update, then the hex
 * digest in the producers' form. */
#ifndef DWSFS_TENSORSUM_H
#define DWSFS_TENSORSUM_H

#include "format.h"

typedef struct dws_tsum dws_tsum;
/* A new running checksum; NULL for DWS_XSUM_NONE and BLAKE3. */
dws_tsum *dws_tsum_new(dws_xsum kind);
void dws_tsum_update(dws_tsum *t, const void *p, size_t n);
/* The digest as lowercase hex (room: 65 bytes) and the state freed. */
void dws_tsum_final(dws_tsum *t, char *hex);
void dws_tsum_free(dws_tsum *t);

#endif
