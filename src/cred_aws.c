/* AWS credentials for s3:// (see cred.h), found where the AWS SDKs' default
 * chain looks, in its order, the first that has them winning:
 *   the caller's s3_key/s3_secret (dws_bucket_opts);
 *   the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN;
 *   web identity (AWS_WEB_IDENTITY_TOKEN_FILE): not supported, said so;
 *   the profile (AWS_PROFILE, else default) in the shared credentials file
 *     (AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials), then in the
 *     config file (AWS_CONFIG_FILE, else ~/.aws/config; [profile NAME]);
 *   container credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (on
 *     169.254.170.2) or _FULL_URI (https, or a loopback or the ECS/EKS
 *     agents' address), with AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE or _TOKEN;
 *   the instance role through IMDSv2 (a PUT for a session token, then the
 *     role, then its keys) at AWS_EC2_METADATA_SERVICE_ENDPOINT, else
 *     169.254.169.254; AWS_EC2_METADATA_DISABLED=true skips it.
 * Keys from a container or instance role expire: cred.c has them again
 * before they do. Everything read is hostile: bounded files and answers,
 * no control character into a header. */
#include "bucket.h"
#include "cred.h"
#include "http.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define INI_MAX (1u << 20)   /* a profile file larger than this is refused */
#define INI_KEYS 32
#define META_BODY (64u << 10)

struct aws_cred {
	char *key, *secret;  /* the caller's, NULL none */
};

/* ---- profile files ---- */

typedef struct ini {
	bool found;          /* the section exists */
	size_t n;
	char key[INI_KEYS][64];
	char *val[INI_KEYS];
} ini;

static void ini_free(ini *s)
{
	for (size_t i = 0; i < s->n; i++) {
		explicit_bzero(s->val[i], strlen(s->val[i]));
		free(s->val[i]);
	}
	memset(s, 0, sizeof(*s));
}

static char *trim(char *p)
{
	while (*p == ' ' || *p == '\t')
		p++;
	size_t n = strlen(p);
	while (n && strchr(" \t\r\n", p[n - 1]))
		p[--n] = 0;
	return p;
}

/* One line of a profile file: a section header sets *in, a key = value of
 * the wanted section is kept. */
static void ini_line(char *line, const char *want, bool *in, ini *out)
{
	bool indented = line[0] == ' ' || line[0] == '\t';
	char *p = trim(line);
	if (!*p || *p == '#' || *p == ';')
		return;
	if (*p == '[') {
		char *e = strchr(p, ']');
		if (e) {
			*e = 0;
			*in = !strcmp(trim(p + 1), want);
			out->found |= *in;
		}
		return;
	}
	char *eq = strchr(p, '=');
	if (!*in || !eq || indented || out->n == INI_KEYS)
		return; /* indented lines are a nested setting's (s3 = ...) */
	*eq = 0;
	snprintf(out->key[out->n], sizeof(out->key[0]), "%s", trim(p));
	out->val[out->n++] = dws_xstrdup(trim(eq + 1));
}

/* Section `want` of the file at path; a missing file has no sections. */
static int ini_read(const char *path, const char *want, ini *out, dws_error *err)
{
	memset(out, 0, sizeof(*out));
	FILE *f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? DWS_OK : dws_fail(err, DWS_EINVAL, "%s: %s", path, strerror(errno));
	char line[8192];
	size_t total = 0;
	bool in = false;
	int rc = DWS_OK;
	while (fgets(line, sizeof(line), f)) {
		total += strlen(line);
		if (total > INI_MAX) {
			rc = dws_fail(err, DWS_EINVAL, "%s: larger than %u bytes", path, INI_MAX);
			break;
		}
		ini_line(line, want, &in, out);
	}
	explicit_bzero(line, sizeof(line));
	fclose(f);
	return rc;
}

static const char *ini_get(const ini *s, const char *key)
{
	for (size_t i = 0; i < s->n; i++)
		if (!strcasecmp(s->key[i], key) && s->val[i][0])
			return s->val[i];
	return NULL;
}

static const char *env(const char *name)
{
	const char *v = getenv(name);
	return v && *v ? v : NULL;
}

/* The shared credentials or config file's path (malloc'd, NULL: no HOME). */
static char *aws_file(const char *var, const char *name)
{
	const char *p = env(var), *home = env("HOME");
	return p ? dws_xstrdup(p) : home ? dws_xasprintf("%s/.aws/%s", home, name) : NULL;
}

static const char *profile_name(void)
{
	const char *p = env("AWS_PROFILE");
	return p ? p : "default";
}

/* The profile's section of the config file ("default" is [default], any
 * other [profile NAME]). */
static int config_section(ini *out, char **path, dws_error *err)
{
	*path = aws_file("AWS_CONFIG_FILE", "config");
	if (!*path) {
		memset(out, 0, sizeof(*out));
		return DWS_OK;
	}
	const char *name = profile_name();
	char *sec = strcmp(name, "default") ? dws_xasprintf("profile %s", name) : dws_xstrdup("default");
	int rc = ini_read(*path, sec, out, err);
	free(sec);
	return rc;
}

void dws_aws_profile_place(char *region, size_t rn, char *endpoint, size_t en)
{
	region[0] = endpoint[0] = 0;
	ini s;
	char *path = NULL;
	dws_error e = {0};
	if (!config_section(&s, &path, &e)) {
		const char *r = ini_get(&s, "region"), *ep = ini_get(&s, "endpoint_url");
		if (r && strlen(r) < rn)
			snprintf(region, rn, "%s", r);
		if (ep && strlen(ep) < en)
			snprintf(endpoint, en, "%s", ep);
	}
	ini_free(&s);
	free(path);
}

static bool header_safe(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s == 0x7f)
			return false;
	return true;
}

/* key, secret and session (may be NULL) into out, checked. */
static int take_keys(const char *key, const char *secret, const char *session, dws_secret *out, dws_error *err)
{
	if (!header_safe(key) || !header_safe(secret) || (session && !header_safe(session)) || strchr(key, ':'))
		return dws_fail(err, DWS_EINVAL, "the credentials from %s hold a control character", out->source);
	out->key = dws_xstrdup(key);
	out->secret = dws_xstrdup(secret);
	out->session = session && *session ? dws_xstrdup(session) : NULL;
	return DWS_OK;
}

/* What no credential support here names, when it is what the profile has. */
static const char *unsupported(const ini *s)
{
	if (ini_get(s, "role_arn"))
		return "role_arn (assume role)";
	if (ini_get(s, "sso_session") || ini_get(s, "sso_start_url"))
		return "IAM Identity Center (sso)";
	if (ini_get(s, "credential_process"))
		return "credential_process";
	if (ini_get(s, "web_identity_token_file"))
		return "web_identity_token_file";
	return NULL;
}

/* The profile: *found when it had keys (or failed). */
static int from_profile(dws_secret *out, bool *found, dws_error *err)
{
	const char *name = profile_name();
	bool named = env("AWS_PROFILE") != NULL;
	char *cpath = aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), *fpath = NULL;
	ini c = {0}, f = {0};
	int rc = cpath ? ini_read(cpath, name, &c, err) : DWS_OK;
	if (!rc)
		rc = config_section(&f, &fpath, err);
	const ini *use = ini_get(&c, "aws_access_key_id") ? &c : &f;
	const char *path = use == &c ? cpath : fpath;
	const char *key = ini_get(use, "aws_access_key_id"), *secret = ini_get(use, "aws_secret_access_key");
	const char *other = unsupported(&c) ? unsupported(&c) : unsupported(&f);
	*found = rc || (key && secret) || ((c.found || f.found) && other) || (named && !c.found && !f.found);
	if (rc) {
		/* the file's own error */
	} else if (key && secret) {
		snprintf(out->source, sizeof(out->source), "profile %.64s in %.200s", name, path);
		rc = take_keys(key, secret, ini_get(use, "aws_session_token"), out, err);
	} else if ((c.found || f.found) && other) {
		rc = dws_fail(err, DWS_EUNSUP, "AWS profile %s uses %s, which dwsfs does not support: give it static keys, or "
			      "set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN", name, other);
	} else if (*found) {
		rc = dws_fail(err, DWS_EINVAL, "AWS_PROFILE names profile %s, which is in neither %s nor %s", name,
			      cpath ? cpath : "~/.aws/credentials", fpath ? fpath : "~/.aws/config");
	}
	ini_free(&c);
	ini_free(&f);
	free(cpath);
	free(fpath);
	return rc;
}

/* ---- container and instance metadata ---- */

static dws_http *meta_http(dws_error *err)
{
	/* a metadata service answers at once or is not there: short waits */
	dws_http_opts o = {.connect_timeout_ms = 1000, .stall_timeout_ms = 2000, .deadline_ms = 3000,
			   .max_attempts = 2, .backoff_base_ms = 100, .backoff_cap_ms = 200};
	dws_http *h = NULL;
	return dws_http_new(&o, &h, err) ? NULL : h;
}

/* {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"} into out. */
static int parse_keys(const char *body, const char *what, dws_secret *out, dws_error *err)
{
	json_t *j = json_loads(body, JSON_REJECT_DUPLICATES, NULL);
	const char *key = json_string_value(json_object_get(j, "AccessKeyId"));
	const char *secret = json_string_value(json_object_get(j, "SecretAccessKey"));
	const char *token = json_string_value(json_object_get(j, "Token"));
	const char *exp = json_string_value(json_object_get(j, "Expiration"));
	const char *code = json_string_value(json_object_get(j, "Code"));
	int rc;
	if (code && strcmp(code, "Success"))
		rc = dws_fail(err, DWS_EIO, "%s: answered Code %.64s", what, code);
	else if (!key || !secret || !*key || !*secret)
		rc = dws_fail(err, DWS_EIO, "%s: the answer has no AccessKeyId and SecretAccessKey", what);
	else
		rc = take_keys(key, secret, token, out, err);
	if (!rc && exp) {
		out->expires = dws_parse_time_ns(exp) / 1000000000;
		if (out->expires <= 0)
			rc = dws_fail(err, DWS_EIO, "%s: Expiration '%.40s' is not a time", what, exp);
	}
	json_decref(j);
	return rc;
}

/* An address the container provider may be sent to over plain http. */
static bool container_host_ok(const char *url)
{
	static const char *const ok[] = {"http://127.", "http://localhost:", "http://localhost/", "http://[::1]",
					 "http://169.254.170.2:", "http://169.254.170.2/", "http://169.254.170.23:",
					 "http://169.254.170.23/", "http://[fd00:ec2::23]"};
	if (!strncmp(url, "https://", 8))
		return true;
	for (size_t i = 0; i < DWS_ARRAY_LEN(ok); i++)
		if (!strncmp(url, ok[i], strlen(ok[i])))
			return true;
	return false;
}

static int container_auth(char *line, size_t n, dws_error *err)
{
	line[0] = 0;
	const char *file = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"), *tok = env("AWS_CONTAINER_AUTHORIZATION_TOKEN");
	char buf[4096] = "";
	if (file) {
		FILE *f = fopen(file, "re");
		if (!f)
			return dws_fail(err, DWS_EINVAL, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE %s: %s", file, strerror(errno));
		size_t k = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
		buf[k] = 0;
		tok = trim(buf);
	}
	int rc = DWS_OK;
	if (tok && !header_safe(tok))
		rc = dws_fail(err, DWS_EINVAL, "the container authorization token holds a control character");
	else if (tok)
		snprintf(line, n, "Authorization: %s", tok);
	explicit_bzero(buf, sizeof(buf));
	return rc;
}

static int from_container(dws_secret *out, bool *found, dws_error *err)
{
	const char *rel = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"), *full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI");
	*found = rel || full;
	if (!*found)
		return DWS_OK;
	char *url = rel ? dws_xasprintf("http://169.254.170.2%s%s", rel[0] == '/' ? "" : "/", rel) : dws_xstrdup(full);
	char auth[4200];
	int rc = DWS_OK;
	if (!rel && !container_host_ok(url))
		rc = dws_fail(err, DWS_EINVAL, "AWS_CONTAINER_CREDENTIALS_FULL_URI %.200s: plain http only to a loopback address "
			      "or the ECS/EKS agents' (169.254.170.2, 169.254.170.23)", url);
	if (!rc)
		rc = container_auth(auth, sizeof(auth), err);
	dws_http *h = rc ? NULL : meta_http(err);
	if (h) {
		size_t q = strcspn(url, "?#");
		snprintf(out->source, sizeof(out->source), "container credentials (%.*s)", (int)(q < 200 ? q : 200), url);
		dws_http_req rq = {.url = url, .cls = DWS_HTTP_API, .what = out->source, .max_body = META_BODY,
				   .headers = {auth[0] ? auth : NULL}};
		dws_http_resp rs;
		rc = dws_http_do(h, &rq, &rs, err);
		if (!rc)
			rc = parse_keys(rs.body, out->source, out, err);
		dws_http_resp_free(&rs);
		dws_http_free(h);
	} else if (!rc) {
		rc = DWS_EIO;
	}
	explicit_bzero(auth, sizeof(auth));
	free(url);
	return rc;
}

/* GET path of the instance metadata with the session token; the body. */
static int imds_get(dws_http *h, const char *ep, const char *path, const char *tokhdr, dws_http_resp *rs,
		    dws_error *err)
{
	char *url = dws_xasprintf("%s%s", ep, path);
	dws_http_req rq = {.url = url, .cls = DWS_HTTP_API, .what = "instance metadata", .max_body = META_BODY,
			   .headers = {tokhdr}};
	int rc = dws_http_do(h, &rq, rs, err);
	free(url);
	return rc;
}

/* The instance role's keys; *found unless no metadata service answered or
 * it has no role. *why: what was seen, for the no-credentials line. */
static int from_instance(dws_secret *out, bool *found, char *why, size_t wn, dws_error *err)
{
	*found = false;
	const char *off = env("AWS_EC2_METADATA_DISABLED");
	if (off && !strcasecmp(off, "true")) {
		snprintf(why, wn, "instance metadata: AWS_EC2_METADATA_DISABLED");
		return DWS_OK;
	}
	const char *e = env("AWS_EC2_METADATA_SERVICE_ENDPOINT");
	char ep[256];
	snprintf(ep, sizeof(ep), "%s", e ? e : "http://169.254.169.254");
	for (size_t n = strlen(ep); n && ep[n - 1] == '/';)
		ep[--n] = 0;
	dws_http *h = meta_http(err);
	if (!h)
		return DWS_EIO;
	char *url = dws_xasprintf("%s/latest/api/token", ep);
	dws_http_req rq = {.url = url, .method = "PUT", .body = "", .cls = DWS_HTTP_API, .what = "instance metadata",
			   .max_body = 4096, .headers = {"X-aws-ec2-metadata-token-ttl-seconds: 21600"}};
	dws_http_resp rs;
	dws_error te = {0};
	int rc = dws_http_do(h, &rq, &rs, &te);
	free(url);
	char tokhdr[4200] = "";
	if (rc) {
		snprintf(why, wn, "no instance metadata at %.200s", ep); /* not on an instance */
		rc = DWS_OK;
	} else if (!header_safe(trim(rs.body)) || !rs.body[0]) {
		rc = dws_fail(err, DWS_EIO, "instance metadata at %s: a bad session token", ep);
	} else {
		snprintf(tokhdr, sizeof(tokhdr), "X-aws-ec2-metadata-token: %s", trim(rs.body));
		dws_http_resp_free(&rs);
		rc = imds_get(h, ep, "/latest/meta-data/iam/security-credentials/", tokhdr, &rs, &te);
		char role[256] = "";
		if (!rc)
			snprintf(role, sizeof(role), "%.*s", (int)strcspn(rs.body, "\r\n"), rs.body);
		if (rc || !role[0] || strchr(role, '/') || !header_safe(role)) {
			snprintf(why, wn, "instance metadata at %.200s: no instance role", ep);
			rc = DWS_OK;
		} else {
			*found = true;
			dws_http_resp_free(&rs);
			snprintf(out->source, sizeof(out->source), "instance role %.100s (instance metadata at %.150s)", role, ep);
			char *path = dws_xasprintf("/latest/meta-data/iam/security-credentials/%s", role);
			rc = imds_get(h, ep, path, tokhdr, &rs, err);
			free(path);
			if (!rc)
				rc = parse_keys(rs.body, out->source, out, err);
		}
	}
	explicit_bzero(tokhdr, sizeof(tokhdr));
	dws_http_resp_free(&rs);
	dws_http_free(h);
	return rc;
}

/* ---- the chain ---- */

static int aws_load(void *ctx, dws_secret *out, dws_error *err)
{
	struct aws_cred *a = ctx;
	if (a->key && a->secret) {
		snprintf(out->source, sizeof(out->source), "the bucket options (s3_key)");
		return take_keys(a->key, a->secret, NULL, out, err);
	}
	const char *key = env("AWS_ACCESS_KEY_ID"), *secret = env("AWS_SECRET_ACCESS_KEY");
	if (key && secret) {
		snprintf(out->source, sizeof(out->source), "the environment (AWS_ACCESS_KEY_ID)");
		return take_keys(key, secret, env("AWS_SESSION_TOKEN"), out, err);
	}
	if (env("AWS_WEB_IDENTITY_TOKEN_FILE"))
		return dws_fail(err, DWS_EUNSUP, "AWS_WEB_IDENTITY_TOKEN_FILE is set: web identity (IRSA) credentials are not "
			      "supported; use EKS Pod Identity (container credentials) or set AWS_ACCESS_KEY_ID, "
			      "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN");
	bool found = false;
	int rc = from_profile(out, &found, err);
	if (!found)
		rc = from_container(out, &found, err);
	char why[300] = "";
	if (!found)
		rc = from_instance(out, &found, why, sizeof(why), err);
	if (!found)
		return dws_fail(err, DWS_EINVAL,
				"no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
				"temporary keys), name a profile of ~/.aws/credentials with AWS_PROFILE, or run where a container "
				"or instance role provides them (%s)", why);
	return rc;
}

static void aws_explain(void *ctx, const dws_secret *cur, long status, char *buf, size_t n)
{
	(void)ctx;
	snprintf(buf, n,
		 "the store refused the credentials from %s (HTTP %ld): check the access key and secret (and "
		 "AWS_SESSION_TOKEN for temporary keys), and that they may use this bucket",
		 cur->source, status);
}

static void aws_free(void *ctx)
{
	struct aws_cred *a = ctx;
	if (a->secret)
		explicit_bzero(a->secret, strlen(a->secret));
	free(a->key);
	free(a->secret);
	free(a);
}

static const struct dws_cred_ops aws_ops = {.load = aws_load, .explain = aws_explain, .free = aws_free};

int dws_cred_aws_new(const char *key, const char *secret, dws_cred **out, dws_error *err)
{
	struct aws_cred *a = dws_xcalloc(1, sizeof(*a));
	a->key = key ? dws_xstrdup(key) : NULL;
	a->secret = secret ? dws_xstrdup(secret) : NULL;
	return dws_cred_new(&aws_ops, a, out, err);
}
