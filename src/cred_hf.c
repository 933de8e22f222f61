/* The Hub token (see cred.h): -o token_file, else $HF_TOKEN, else the file
 * $HF_TOKEN_PATH names, else the hf CLI's ($HF_HOME/token, by default
 * ~/.cache/huggingface/token). A token read from a file is read again when
 * the file changes (another inode, size or mtime: a secret renamed into
 * place, `hf auth login` again) and when the Hub refuses it, so a rotated
 * token needs no remount. A token is one line of printable characters: it
 * goes into a header, and nothing else may. */
#include "cred.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TOKEN_MAX 4096

enum src_kind { SRC_NONE, SRC_OPTION, SRC_ENV, SRC_ENV_PATH, SRC_CLI };

struct hf_cred {
	char *token_file;    /* -o token_file; NULL none */
	enum src_kind kind;  /* of the one loaded last */
	char path[4096];     /* the file it was read from, "" none */
	struct stat st;      /* that file as it was read */
	char cli_path[4096]; /* where the hf CLI keeps its token */
};

static bool token_ok(const char *t)
{
	if (!*t)
		return false;
	for (; *t; t++)
		if ((unsigned char)*t < 0x21 || (unsigned char)*t > 0x7e)
			return false;
	return true;
}

/* The token in path (its first line, trailing blanks cut) into out->token.
 * A missing file is no token unless must_exist. */
static int read_token(struct hf_cred *h, const char *path, bool must_exist, dws_secret *out, dws_error *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		if (errno == ENOENT && !must_exist)
			return DWS_OK;
		return dws_fail(err, DWS_EINVAL, "token file %s: %s", path, strerror(errno));
	}
	char buf[TOKEN_MAX + 1];
	struct stat st;
	ssize_t n = fstat(fd, &st) == 0 ? read(fd, buf, sizeof(buf)) : -1;
	int e = errno;
	close(fd);
	if (n < 0)
		return dws_fail(err, DWS_EINVAL, "token file %s: %s", path, strerror(e));
	if (n > TOKEN_MAX)
		return dws_fail(err, DWS_EINVAL, "token file %s: over %d bytes, not a token", path, TOKEN_MAX);
	buf[n] = 0;
	buf[strcspn(buf, "\r\n")] = 0;
	size_t len = strlen(buf);
	while (len && (buf[len - 1] == ' ' || buf[len - 1] == '\t'))
		buf[--len] = 0;
	int rc = DWS_OK;
	if (!token_ok(buf))
		rc = len ? dws_fail(err, DWS_EINVAL, "token file %s: not a token (a space or control character in it)", path)
			 : (must_exist ? dws_fail(err, DWS_EINVAL, "token file %s: empty", path) : DWS_OK);
	else
		out->token = dws_xstrdup(buf);
	explicit_bzero(buf, sizeof(buf));
	if (out->token) {
		snprintf(h->path, sizeof(h->path), "%s", path);
		h->st = st;
	}
	return rc;
}

static int hf_load(void *ctx, dws_secret *out, dws_error *err)
{
	struct hf_cred *h = ctx;
	h->path[0] = 0;
	h->kind = SRC_NONE;
	if (h->token_file) {
		h->kind = SRC_OPTION;
		snprintf(out->source, sizeof(out->source), "token_file %.290s", h->token_file);
		return read_token(h, h->token_file, true, out, err);
	}
	const char *t = getenv("HF_TOKEN");
	if (t && *t) {
		if (!token_ok(t))
			return dws_fail(err, DWS_EINVAL, "HF_TOKEN: not a token (a space or control character in it)");
		h->kind = SRC_ENV;
		snprintf(out->source, sizeof(out->source), "HF_TOKEN");
		out->token = dws_xstrdup(t);
		return DWS_OK;
	}
	const char *p = getenv("HF_TOKEN_PATH");
	if (p && *p) {
		snprintf(out->source, sizeof(out->source), "the file HF_TOKEN_PATH names (%.270s)", p);
		int rc = read_token(h, p, false, out, err);
		h->kind = out->token ? SRC_ENV_PATH : SRC_NONE;
		return rc;
	}
	if (h->cli_path[0]) {
		snprintf(out->source, sizeof(out->source), "the hf CLI's token file %.280s", h->cli_path);
		int rc = read_token(h, h->cli_path, false, out, err);
		h->kind = out->token ? SRC_CLI : SRC_NONE;
		return rc;
	}
	return DWS_OK;
}

static bool hf_changed(void *ctx, const dws_secret *cur)
{
	(void)cur;
	struct hf_cred *h = ctx;
	struct stat st;
	if (!h->path[0] || stat(h->path, &st) != 0)
		return false; /* gone for a moment (a rotation): a 401 reloads */
	return st.st_ino != h->st.st_ino || st.st_dev != h->st.st_dev || st.st_size != h->st.st_size ||
	       st.st_mtim.tv_sec != h->st.st_mtim.tv_sec || st.st_mtim.tv_nsec != h->st.st_mtim.tv_nsec;
}

static void hf_explain(void *ctx, const dws_secret *cur, long status, char *buf, size_t n)
{
	struct hf_cred *h = ctx;
	if (!cur->token) {
		const char *p = getenv("HF_TOKEN_PATH");
		snprintf(buf, n,
			 "no Hub token (HF_TOKEN is not set, no token in %s): set HF_TOKEN, pass -o token_file=PATH, or log in "
			 "with `hf auth login`",
			 p && *p ? p : h->cli_path[0] ? h->cli_path : "~/.cache/huggingface/token");
	} else if (status == 403) {
		snprintf(buf, n,
			 "the token from %s has no access to this bucket: check the token's access (a fine-grained token needs "
			 "read access to the bucket's namespace), or use another",
			 cur->source);
	} else {
		snprintf(buf, n, "the Hub refused the token from %s (not found, or it may not see this bucket): %s", cur->source,
			 h->kind == SRC_CLI ? "log in again with `hf auth login`, or set HF_TOKEN"
			 : h->kind == SRC_ENV ? "set a valid token in HF_TOKEN, or unset it and log in with `hf auth login`"
					      : "put a valid token there, or log in with `hf auth login`");
	}
}

static void hf_free(void *ctx)
{
	struct hf_cred *h = ctx;
	free(h->token_file);
	free(h);
}

static const struct dws_cred_ops hf_ops = {
	.load = hf_load, .changed = hf_changed, .explain = hf_explain, .free = hf_free,
};

int dws_cred_hf_new(const char *token_file, dws_cred **out, dws_error *err)
{
	struct hf_cred *h = dws_xcalloc(1, sizeof(*h));
	h->token_file = token_file && *token_file ? dws_xstrdup(token_file) : NULL;
	const char *home = getenv("HF_HOME"), *user = getenv("HOME");
	if (home && *home)
		snprintf(h->cli_path, sizeof(h->cli_path), "%s/token", home);
	else if (user && *user)
		snprintf(h->cli_path, sizeof(h->cli_path), "%s/.cache/huggingface/token", user);
	return dws_cred_new(&hf_ops, h, out, err);
}
