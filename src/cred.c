/* The current credential of a remote bucket and when to ask its provider
 * again (see cred.h). Lock order: a cred's lock is the last one taken; a
 * provider's load runs under it (a metadata service's answer is bounded by
 * its own short deadline), so threads wanting a credential wait for the
 * one reload rather than each starting their own. */
#include "cred.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHANGED_EVERY_MS 1000  /* a token file is looked at once a second */
#define REJECT_EVERY_MS 2000   /* a refusal reloads at most this often */
#define RETRY_REFRESH_MS 10000 /* a failed refresh of a still valid one */

struct dws_cred {
	const struct dws_cred_ops *ops;
	void *ctx;
	pthread_mutex_t lock;
	dws_secret cur;
	uint64_t gen;
	int64_t next_changed_ms, next_reject_ms, next_refresh_ms;
};

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void zfree(char *s)
{
	if (s) {
		explicit_bzero(s, strlen(s));
		free(s);
	}
}

void dws_secret_clear(dws_secret *s)
{
	zfree(s->token);
	zfree(s->key);
	zfree(s->secret);
	zfree(s->session);
	memset(s, 0, sizeof(*s));
}

static char *dup_or_null(const char *s) { return s ? dws_xstrdup(s) : NULL; }

static void copy_secret(const dws_secret *from, dws_secret *to)
{
	*to = *from;
	to->token = dup_or_null(from->token);
	to->key = dup_or_null(from->key);
	to->secret = dup_or_null(from->secret);
	to->session = dup_or_null(from->session);
}

static bool same_str(const char *a, const char *b) { return (!a && !b) || (a && b && !strcmp(a, b)); }

static bool same_secret(const dws_secret *a, const dws_secret *b)
{
	return same_str(a->token, b->token) && same_str(a->key, b->key) && same_str(a->secret, b->secret) &&
	       same_str(a->session, b->session);
}

/* Ask the provider again, under lock: true if it gave another credential
 * (kept); on failure the current one stays and err says why. */
static bool reload_locked(dws_cred *c, const char *why, dws_error *err)
{
	dws_secret s = {0};
	if (c->ops->load(c->ctx, &s, err) != DWS_OK) {
		dws_secret_clear(&s);
		return false;
	}
	bool other = !same_secret(&s, &c->cur);
	if (other) {
		dws_log("credentials: re-read from %s (%s)", s.source[0] ? s.source : "nowhere", why);
		s.gen = ++c->gen;
		dws_secret_clear(&c->cur);
		c->cur = s;
	} else {
		c->cur.expires = s.expires; /* the same keys, perhaps valid longer */
		dws_secret_clear(&s);
	}
	return other;
}

int dws_cred_new(const struct dws_cred_ops *ops, void *ctx, dws_cred **out, dws_error *err)
{
	*out = NULL;
	dws_secret s = {0};
	int rc = ops->load(ctx, &s, err);
	if (rc) {
		dws_secret_clear(&s);
		ops->free(ctx);
		return rc;
	}
	dws_cred *c = dws_xcalloc(1, sizeof(*c));
	c->ops = ops;
	c->ctx = ctx;
	pthread_mutex_init(&c->lock, NULL);
	c->cur = s;
	c->cur.gen = c->gen = 1;
	c->next_changed_ms = mono_ms() + CHANGED_EVERY_MS;
	*out = c;
	return DWS_OK;
}

void dws_cred_free(dws_cred *c)
{
	if (!c)
		return;
	dws_secret_clear(&c->cur);
	c->ops->free(c->ctx);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* Refresh what is about to expire, under lock; DWS_OK while the current one
 * still works. */
static int refresh_locked(dws_cred *c, int64_t now_ms, dws_error *err)
{
	if (!c->cur.expires || (int64_t)time(NULL) < c->cur.expires - DWS_CRED_REFRESH_S)
		return DWS_OK;
	dws_error e = {0};
	if (now_ms >= c->next_refresh_ms) {
		c->next_refresh_ms = now_ms + RETRY_REFRESH_MS;
		reload_locked(c, "about to expire", &e);
	}
	int64_t left = c->cur.expires ? c->cur.expires - (int64_t)time(NULL) : 1;
	if (left > 0) {
		if (e.code)
			dws_log("credentials from %s expire in %llds and could not be had again: %s", c->cur.source,
				(long long)left, e.msg);
		return DWS_OK;
	}
	if (e.code) {
		if (err)
			*err = e;
		return e.code;
	}
	return dws_fail(err, DWS_EIO, "the credentials from %s expired and could not be had again", c->cur.source);
}

int dws_cred_get(dws_cred *c, dws_secret *out, dws_error *err)
{
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&c->lock);
	int64_t now = mono_ms();
	if (c->ops->changed && now >= c->next_changed_ms) {
		c->next_changed_ms = now + CHANGED_EVERY_MS;
		if (c->ops->changed(c->ctx, &c->cur)) {
			dws_error e = {0};
			if (!reload_locked(c, "its file changed", &e) && e.code)
				dws_log("credentials: %s changed but cannot be read: %s (the one read before is kept)",
					c->cur.source, e.msg);
		}
	}
	int rc = refresh_locked(c, now, err);
	if (!rc)
		copy_secret(&c->cur, out);
	pthread_mutex_unlock(&c->lock);
	return rc;
}

bool dws_cred_rejected(dws_cred *c, uint64_t gen)
{
	pthread_mutex_lock(&c->lock);
	bool other = c->cur.gen != gen; /* another thread reloaded already */
	int64_t now = mono_ms();
	if (!other && now >= c->next_reject_ms) {
		c->next_reject_ms = now + REJECT_EVERY_MS;
		dws_error e = {0};
		other = reload_locked(c, "the server refused the one before", &e);
	}
	pthread_mutex_unlock(&c->lock);
	return other;
}

void dws_cred_explain(dws_cred *c, long status, char *buf, size_t n)
{
	pthread_mutex_lock(&c->lock);
	buf[0] = 0;
	c->ops->explain(c->ctx, &c->cur, status, buf, n);
	pthread_mutex_unlock(&c->lock);
}
