/* Credentials a remote backend's requests carry, kept current while a mount
 * runs: a Hub token re-read when its file changes or the Hub refuses it, AWS
 * keys refreshed before they expire. Where one comes from is a provider's
 * business (cred_hf.c, cred_aws.c); this module holds the current one under
 * a lock and decides when to ask the provider again. Every request takes a
 * copy (dws_cred_get), so a refresh never pulls a string from under a
 * transfer. Secrets never reach a message: a refused credential is
 * described by where it came from (dws_cred_explain). */
#ifndef DWSFS_CRED_H
#define DWSFS_CRED_H

#include "internal.h"

typedef struct dws_cred dws_cred;

/* One credential. Strings malloc'd, NULL where absent; all NULL: none was
 * found (source then says what was looked at). */
typedef struct dws_secret {
	char *token;                  /* a bearer token (the Hub) */
	char *key, *secret, *session; /* AWS: access key, secret, session token */
	int64_t expires;              /* unix seconds it stops working; 0: never */
	char source[320];             /* where it came from, for messages */
	uint64_t gen;                 /* which load it is (set by dws_cred) */
} dws_secret;

struct dws_cred_ops {
	/* Find the credential now into *out (zeroed). DWS_OK with nothing found
	 * is fine; an error is a source that exists and fails (an unreadable
	 * token_file, a metadata service answering garbage). */
	int (*load)(void *ctx, dws_secret *out, dws_error *err);
	/* Whether cur's source changed since it was loaded (a token file
	 * rewritten); asked at most once a second. NULL: never. */
	bool (*changed)(void *ctx, const dws_secret *cur);
	/* What to tell the user when a server refused cur with status (401,
	 * 403): where it came from and what to do, into buf. */
	void (*explain)(void *ctx, const dws_secret *cur, long status, char *buf, size_t n);
	void (*free)(void *ctx);
};

/* A credential kept by ops over ctx (owned from now on, freed by
 * ops->free even on failure), loaded once now. */
int dws_cred_new(const struct dws_cred_ops *ops, void *ctx, dws_cred **out, dws_error *err);
void dws_cred_free(dws_cred *c);
/* A copy of the current credential (dws_secret_clear it), reloaded first
 * when its source changed or it expires within DWS_CRED_REFRESH_S. Fails
 * only when it has expired and cannot be had again. */
int dws_cred_get(dws_cred *c, dws_secret *out, dws_error *err);
/* A server refused load `gen`: true when another credential is held now
 * (reloaded here, at most once every 2 s, or by another thread already):
 * worth one more try. */
bool dws_cred_rejected(dws_cred *c, uint64_t gen);
/* What to tell the user about a refusal (status) of the current one. */
void dws_cred_explain(dws_cred *c, long status, char *buf, size_t n);
/* Zero and free the strings of s. */
void dws_secret_clear(dws_secret *s);

/* The Hub's token (cred_hf.c): token_file (-o token_file; NULL: none),
 * else HF_TOKEN, HF_TOKEN_PATH, the hf CLI's file. None found is no error:
 * a public bucket needs none, and a refusal says what to do. */
int dws_cred_hf_new(const char *token_file, dws_cred **out, dws_error *err);

/* AWS keys (cred_aws.c), found as the AWS SDKs' default chain finds them
 * (the file's top comment), after key/secret when both are given. None
 * found is an error naming every way to give them. */
int dws_cred_aws_new(const char *key, const char *secret, dws_cred **out, dws_error *err);
/* The region and endpoint_url of the AWS profile's config section ("" for
 * none): where the environment names neither. */
void dws_aws_profile_place(char *region, size_t rn, char *endpoint, size_t en);

/* Temporary credentials are fetched again this long before they expire. */
#define DWS_CRED_REFRESH_S 300

#endif
