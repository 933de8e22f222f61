/* Unit tests of where credentials and the cache come from: the default
 * cache folder without HOME, and the AWS credential chain (environment,
 * profile files, container and instance metadata against a loopback
 * server), its precedence and its refresh before expiry. The last line is
 * "N passed, N failed". */
#include "cred.h"
#include "check.h"
#include "loopback.h"
#include "remote.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>


/* ---- the cache folder ---- */

static void test_cache_default_dir(void)
{
	unsetenv("DWSFS_CACHE_DIR");
	unsetenv("XDG_CACHE_HOME");
	setenv("HOME", "/home/someone", 1);
	char *d = dws_cache_default_dir();
	CHECK(!strcmp(d, "/home/someone/.cache/dwsfs"), "HOME set: %s", d);
	free(d);
	setenv("XDG_CACHE_HOME", "/xdg", 1);
	d = dws_cache_default_dir();
	CHECK(!strcmp(d, "/xdg/dwsfs"), "XDG_CACHE_HOME first: %s", d);
	free(d);
	unsetenv("XDG_CACHE_HOME");
	unsetenv("HOME"); /* a system service: no HOME */
	d = dws_cache_default_dir();
	if (geteuid() == 0)
		CHECK(!strcmp(d, "/var/cache/dwsfs"), "root without HOME: /var/cache/dwsfs, not %s", d);
	else
		CHECK(d[0] == '/' && strstr(d, "dwsfs") && !strstr(d, "/var/cache/.cache"), "no HOME: %s", d);
	free(d);
	setenv("HOME", "", 1);
	d = dws_cache_default_dir();
	CHECK(d[0] == '/' && !strstr(d, "/var/cache/.cache"), "empty HOME: %s", d);
	free(d);
}


/* ---- the AWS chain ---- */

static const char *const AWS_VARS[] = {
	"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
	"AWS_CONFIG_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
	"AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
	"AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_DISABLED", "AWS_REGION", "AWS_DEFAULT_REGION"};

static char tmpdir[64];

/* A clean AWS environment: no variable, profile files in tmpdir, and never
 * the real instance metadata address. */
static void aws_clean(void)
{
	for (size_t i = 0; i < sizeof(AWS_VARS) / sizeof(AWS_VARS[0]); i++)
		unsetenv(AWS_VARS[i]);
	setenv("HOME", tmpdir, 1);
	setenv("AWS_EC2_METADATA_DISABLED", "true", 1);
}

static void write_file(const char *name, const char *text)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
}

/* The current secret of a new AWS credential (rc into *rc). */
static dws_secret aws_secret(int *rc, dws_error *e, dws_cred **keep)
{
	dws_secret s = {0};
	dws_cred *c = NULL;
	memset(e, 0, sizeof(*e));
	*rc = dws_cred_aws_new(NULL, NULL, &c, e);
	if (!*rc)
		*rc = dws_cred_get(c, &s, e);
	if (keep)
		*keep = c;
	else
		dws_cred_free(c);
	return s;
}

static void test_aws_env_and_profiles(void)
{
	int rc;
	dws_error e;
	aws_clean();
	dws_secret s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EINVAL && strstr(e.msg, "AWS_ACCESS_KEY_ID") && strstr(e.msg, "AWS_PROFILE") &&
	      strstr(e.msg, "instance role") && strstr(e.msg, "AWS_EC2_METADATA_DISABLED"), "none: %s", e.msg);
	dws_secret_clear(&s);

	setenv("AWS_ACCESS_KEY_ID", "AKENV", 1);
	setenv("AWS_SECRET_ACCESS_KEY", "skenv", 1);
	setenv("AWS_SESSION_TOKEN", "tokenv", 1);
	mkdir(strcat(strcpy((char[128]){0}, tmpdir), "/.aws"), 0700);
	write_file(".aws/credentials", "[default]\naws_access_key_id = AKFILE\naws_secret_access_key = skfile\n"
				       "[prof]\n# a comment\naws_access_key_id=AKPROF\naws_secret_access_key= skprof \n"
				       "aws_session_token = tokprof\n[roleonly]\nrole_arn = arn:aws:iam::1:role/x\n"
				       "source_profile = default\n");
	write_file(".aws/config", "[default]\nregion = eu-west-1\n[profile prof]\nregion=ap-south-1\n"
				  "endpoint_url = http://127.0.0.1:9000\ns3 =\n  addressing_style = path\n");
	s = aws_secret(&rc, &e, NULL);
	CHECK(!rc && !strcmp(s.key, "AKENV") && !strcmp(s.session, "tokenv") && strstr(s.source, "environment"),
	      "the environment first: %s %s", s.key ? s.key : "-", e.msg);
	dws_secret_clear(&s);
	unsetenv("AWS_ACCESS_KEY_ID");
	s = aws_secret(&rc, &e, NULL);
	CHECK(!rc && !strcmp(s.key, "AKFILE") && !s.session && strstr(s.source, "profile default"),
	      "then the default profile: %s %s", s.key ? s.key : "-", e.msg);
	dws_secret_clear(&s);
	char region[64], ep[512];
	dws_aws_profile_place(region, sizeof(region), ep, sizeof(ep));
	CHECK(!strcmp(region, "eu-west-1") && !ep[0], "the default profile's region: %s %s", region, ep);

	setenv("AWS_PROFILE", "prof", 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(!rc && !strcmp(s.key, "AKPROF") && !strcmp(s.secret, "skprof") && !strcmp(s.session, "tokprof") &&
	      strstr(s.source, "profile prof"), "AWS_PROFILE: %s %s", s.key ? s.key : "-", e.msg);
	dws_secret_clear(&s);
	dws_aws_profile_place(region, sizeof(region), ep, sizeof(ep));
	CHECK(!strcmp(region, "ap-south-1") && !strcmp(ep, "http://127.0.0.1:9000"), "its config: %s %s", region, ep);

	setenv("AWS_PROFILE", "roleonly", 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EUNSUP && strstr(e.msg, "role_arn"), "an assume-role profile is named: %s", e.msg);
	setenv("AWS_PROFILE", "nosuch", 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EINVAL && strstr(e.msg, "nosuch") && strstr(e.msg, "credentials"), "a missing profile: %s", e.msg);
	unsetenv("AWS_PROFILE");

	/* the files' places are overridable */
	write_file("creds2", "[default]\naws_access_key_id = AKMOVED\naws_secret_access_key = skmoved\n");
	char path[256];
	snprintf(path, sizeof(path), "%s/creds2", tmpdir);
	setenv("AWS_SHARED_CREDENTIALS_FILE", path, 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(!rc && !strcmp(s.key, "AKMOVED"), "AWS_SHARED_CREDENTIALS_FILE: %s", e.msg);
	dws_secret_clear(&s);
	setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/x", 1);
	unsetenv("AWS_SHARED_CREDENTIALS_FILE");
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EUNSUP && strstr(e.msg, "web identity"), "web identity comes before profiles, refused: %s", e.msg);
}

/* A container agent and an instance metadata service on one loopback
 * server. Keys are numbered by issue; each expires `life` s after it. */
struct meta {
	atomic_int issued, puts;
	int life;
	bool bad_auth;
	char last_auth[256], last_token[256], ttl[64];
};

static void iso_time(time_t t, char *buf, size_t n)
{
	struct tm tm;
	gmtime_r(&t, &tm);
	strftime(buf, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void keys_reply(struct meta *m, lb_reply *r)
{
	int k = atomic_fetch_add(&m->issued, 1) + 1;
	char exp[32];
	iso_time(time(NULL) + m->life, exp, sizeof(exp));
	r->status = 200;
	r->body = dws_xasprintf("{\"Code\":\"Success\",\"AccessKeyId\":\"AKROLE%d\",\"SecretAccessKey\":\"sk%d\","
				"\"Token\":\"tok%d\",\"Expiration\":\"%s\"}", k, k, k, exp);
	r->len = strlen(r->body);
}

static void on_meta(void *ud, const lb_request *rq, int n, lb_reply *r)
{
	(void)n;
	struct meta *m = ud;
	r->status = 404;
	if (!strcmp(rq->target, "/creds")) { /* the container agent */
		lb_header(rq, "Authorization", m->last_auth, sizeof(m->last_auth));
		if (strcmp(m->last_auth, "Bearer agent-token"))
			r->status = 401;
		else
			keys_reply(m, r);
	} else if (!strcmp(rq->method, "PUT") && !strcmp(rq->target, "/latest/api/token")) {
		atomic_fetch_add(&m->puts, 1);
		lb_header(rq, "X-aws-ec2-metadata-token-ttl-seconds", m->ttl, sizeof(m->ttl));
		r->status = 200;
		r->body = dws_xstrdup("imds-session");
		r->len = strlen(r->body);
	} else if (!strncmp(rq->target, "/latest/meta-data/iam/security-credentials/", 43)) {
		lb_header(rq, "X-aws-ec2-metadata-token", m->last_token, sizeof(m->last_token));
		if (strcmp(m->last_token, "imds-session")) {
			r->status = 401;
		} else if (!rq->target[43]) {
			r->status = 200;
			r->body = dws_xstrdup("grpo-node-role\n");
			r->len = strlen(r->body);
		} else if (!strcmp(rq->target + 43, "grpo-node-role")) {
			keys_reply(m, r);
		}
	}
}

static void test_aws_container_and_instance(void)
{
	struct meta m = {.life = 3600};
	lb_server srv;
	if (lb_start(&srv, on_meta, &m)) {
		CHECK(0, "loopback server");
		return;
	}
	int rc;
	dws_error e;
	aws_clean();
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials", 1); /* no profile */
	setenv("AWS_CONFIG_FILE", "/nonexistent/config", 1);
	char url[128], tokf[128];
	snprintf(url, sizeof(url), "%s/creds", srv.url);
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", url, 1);
	snprintf(tokf, sizeof(tokf), "%s/agent-token", tmpdir);
	write_file("agent-token", "Bearer agent-token\n");
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", tokf, 1);
	dws_secret s = aws_secret(&rc, &e, NULL);
	CHECK(!rc && s.key && !strcmp(s.key, "AKROLE1") && !strcmp(s.session, "tok1") && s.expires > time(NULL) + 3000 &&
	      strstr(s.source, "container"), "container credentials with the token file's Authorization: %s", e.msg);
	dws_secret_clear(&s);
	unsetenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
	setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "Bearer wrong", 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc && strstr(e.msg, "401") && strstr(e.msg, "container"), "a refused agent is an error: %s", e.msg);
	setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.1.2.3/creds", 1);
	int before = atomic_load(&srv.requests);
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EINVAL && strstr(e.msg, "loopback") && atomic_load(&srv.requests) == before,
	      "plain http elsewhere refused unasked: %s", e.msg);
	unsetenv("AWS_CONTAINER_CREDENTIALS_FULL_URI");
	unsetenv("AWS_CONTAINER_AUTHORIZATION_TOKEN");

	/* the instance role: keys that expire soon are had again before */
	unsetenv("AWS_EC2_METADATA_DISABLED");
	setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.url, 1);
	m.life = DWS_CRED_REFRESH_S + 2;
	atomic_store(&m.issued, 0);
	dws_cred *c = NULL;
	s = aws_secret(&rc, &e, &c);
	CHECK(!rc && s.key && !strcmp(s.key, "AKROLE1") && !strcmp(s.session, "tok1") && strstr(s.source, "grpo-node-role") &&
	      !strcmp(m.ttl, "21600") && !strcmp(m.last_token, "imds-session"), "IMDSv2: token, role, keys: %s", e.msg);
	dws_secret_clear(&s);
	if (c) {
		rc = dws_cred_get(c, &s, &e);
		CHECK(!rc && !strcmp(s.key, "AKROLE1") && atomic_load(&m.issued) == 1, "still valid: kept (%d issued)",
		      atomic_load(&m.issued));
		dws_secret_clear(&s);
		struct timespec ts = {2, 600 * 1000000};
		nanosleep(&ts, NULL); /* now within DWS_CRED_REFRESH_S of expiring */
		rc = dws_cred_get(c, &s, &e);
		CHECK(!rc && s.key && !strcmp(s.key, "AKROLE2") && !strcmp(s.session, "tok2") && atomic_load(&m.puts) == 2,
		      "refreshed before expiry: %s (%s)", s.key ? s.key : "-", e.msg);
		dws_secret_clear(&s);
		dws_cred_free(c);
	}
	lb_stop(&srv);
	/* no metadata service: the chain ends, saying so */
	setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.url, 1); /* stopped: refused at once */
	setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials", 1);
	setenv("AWS_CONFIG_FILE", "/nonexistent/config", 1);
	s = aws_secret(&rc, &e, NULL);
	CHECK(rc == DWS_EINVAL && strstr(e.msg, "no instance metadata"), "nothing anywhere: %s", e.msg);
	aws_clean();
}

int main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/dwsfs-cred-unit.XXXXXX");
	if (!mkdtemp(tmpdir))
		return 1;
	test_cache_default_dir();
	test_aws_env_and_profiles();
	test_aws_container_and_instance();
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
