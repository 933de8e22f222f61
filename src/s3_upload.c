/* One S3 object written from a file, whole or not at all.
 *
 * Up to the threshold (DWSFS_S3_MULTIPART_THRESHOLD, 64 MiB) it is one
 * PutObject. Past it, a multipart upload: CreateMultipartUpload (POST
 * ?uploads), the parts one after the other (PUT ?partNumber=N&uploadId=ID,
 * each read from the file at its offset, each with PutObject's deadline,
 * stall timeout and retries, so a failed part is sent again alone), then
 * CompleteMultipartUpload (POST ?uploadId=ID with the parts' ETags). S3 shows
 * the object only once that completes. Any failure, and a stop (SIGINT or
 * SIGTERM in dwsctl publish), sends AbortMultipartUpload (DELETE ?uploadId=)
 * so no parts stay stored, and billed, behind.
 *
 * Parts are DWSFS_S3_PART_SIZE (64 MiB; 5 MiB to 5 GiB), grown to whole MiB
 * where 10000 of them would not hold the object; objects up to 5 TiB.
 * Every query is built sorted (dws_http_query): libcurl 7.88 signs it as
 * sent. The XML answers are hostile input: at most 64 KiB, no DOCTYPE,
 * fields bounded, and a 200 whose body is an <Error> (which
 * CompleteMultipartUpload may send after its status) is a failure. */
#include "s3_upload.h"
#include "http.h"
#include "log.h"

#include <ctype.h>
#include <errno.h>
#include <expat.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SIZE (64ull << 20)
#define MAX_REPLY (64u << 10)

/* ---- settings ---- */

static int env_size(const char *name, uint64_t *out, dws_error *err)
{
	const char *v = getenv(name);
	*out = DEFAULT_SIZE;
	if (!v || !*v)
		return DWS_OK;
	if (strlen(v) > 32 || !dws_parse_size(v, out))
		return dws_fail(err, DWS_EINVAL, "%s='%.32s': not a size (bytes, or a number with K, M, G or T, as in 64M)",
				name, v);
	return DWS_OK;
}

int dws_s3_upload_conf_env(dws_s3_upload_conf *c, dws_error *err)
{
	const char *t = "DWSFS_S3_MULTIPART_THRESHOLD", *p = "DWSFS_S3_PART_SIZE";
	int rc = env_size(t, &c->threshold, err);
	if (!rc)
		rc = env_size(p, &c->part_size, err);
	if (rc)
		return rc;
	if (c->threshold > DWS_S3_PUT_MAX)
		return dws_fail(err, DWS_EINVAL, "%s=%s: over the 5 GiB a single PutObject takes", t, getenv(t));
	if (c->part_size < DWS_S3_PART_MIN)
		return dws_fail(err, DWS_EINVAL, "%s=%s: under S3's smallest part, 5 MiB", p, getenv(p));
	if (c->part_size > DWS_S3_PUT_MAX)
		return dws_fail(err, DWS_EINVAL, "%s=%s: over S3's largest part, 5 GiB", p, getenv(p));
	return DWS_OK;
}

uint64_t dws_s3_part_size(uint64_t len, uint64_t part)
{
	if (len > DWS_S3_OBJECT_MAX)
		return 0;
	uint64_t need = (len + DWS_S3_MAX_PARTS - 1) / DWS_S3_MAX_PARTS;
	if (part < need)
		part = (need + (1u << 20) - 1) & ~((uint64_t)(1u << 20) - 1);
	return part;
}

/* ---- the XML answers ---- */

struct reply {
	char root[64];          /* the root element's name */
	char upload_id[1024], code[128], message[384];
	char text[1024];
	size_t tl;
	bool cut, too_long;
	int depth;
	XML_Parser p;
};

static void XMLCALL on_start(void *ud, const XML_Char *name, const XML_Char **attrs)
{
	(void)attrs;
	struct reply *r = ud;
	if (++r->depth == 1)
		snprintf(r->root, sizeof(r->root), "%s", name);
	r->tl = 0;
	r->text[0] = 0;
	r->cut = false;
}

static void XMLCALL on_text(void *ud, const XML_Char *s, int len)
{
	struct reply *r = ud;
	if (r->tl + (size_t)len >= sizeof(r->text)) {
		r->cut = true;
		len = (int)(sizeof(r->text) - 1 - r->tl);
	}
	memcpy(r->text + r->tl, s, (size_t)len);
	r->tl += (size_t)len;
	r->text[r->tl] = 0;
}

static void take(struct reply *r, char *dst, size_t n)
{
	if (r->cut || r->tl >= n) {
		r->too_long = true;
		return;
	}
	/* it goes into a message or a URL: printable ASCII only */
	for (size_t i = 0; i < r->tl; i++)
		dst[i] = r->text[i] >= 0x20 && r->text[i] < 0x7f ? r->text[i] : '?';
	dst[r->tl] = 0;
}

static void XMLCALL on_end(void *ud, const XML_Char *name)
{
	struct reply *r = ud;
	if (r->depth == 2 && !strcmp(name, "UploadId"))
		take(r, r->upload_id, sizeof(r->upload_id));
	else if (r->depth == 2 && !strcmp(name, "Code"))
		take(r, r->code, sizeof(r->code));
	else if (r->depth == 2 && !strcmp(name, "Message"))
		take(r, r->message, sizeof(r->message));
	r->depth--;
	r->tl = 0;
	r->text[0] = 0;
	r->cut = false;
}

/* No DOCTYPE: entity tricks have no place in an S3 answer. */
static void XMLCALL on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid, const XML_Char *pubid,
			       int has_internal)
{
	(void)name, (void)sysid, (void)pubid, (void)has_internal;
	XML_StopParser(((struct reply *)ud)->p, XML_FALSE);
}

/* The answer to op parsed into r; its root must be want, else the <Error>
 * it holds (or what it is) is the one error line. */
static int parse_reply(const char *what, const char *op, const dws_http_resp *rs, const char *want, struct reply *r,
		       dws_error *err)
{
	memset(r, 0, sizeof(*r));
	r->p = XML_ParserCreate(NULL);
	XML_SetUserData(r->p, r);
	XML_SetElementHandler(r->p, on_start, on_end);
	XML_SetCharacterDataHandler(r->p, on_text);
	XML_SetStartDoctypeDeclHandler(r->p, on_doctype);
	int rc = DWS_OK;
	if (XML_Parse(r->p, rs->body, (int)rs->len, 1) != XML_STATUS_OK)
		rc = dws_fail(err, DWS_EFORMAT, "%s: %s answer is not XML S3 sends: %s at line %lu", what, op,
			      XML_GetErrorCode(r->p) == XML_ERROR_ABORTED ? "a DOCTYPE" : XML_ErrorString(XML_GetErrorCode(r->p)),
			      (unsigned long)XML_GetCurrentLineNumber(r->p));
	XML_ParserFree(r->p);
	r->p = NULL;
	if (rc)
		return rc;
	if (!strcmp(r->root, "Error"))
		return dws_fail(err, DWS_EIO, "%s: %s failed: %s: %s", what, op, r->code[0] ? r->code : "(no code)",
				r->message[0] ? r->message : "(no message)");
	if (strcmp(r->root, want) != 0)
		return dws_fail(err, DWS_EFORMAT, "%s: %s answer is <%s>, not <%s>", what, op, r->root, want);
	if (r->too_long)
		return dws_fail(err, DWS_EFORMAT, "%s: %s answer has an oversized field", what, op);
	return DWS_OK;
}

/* ---- requests ---- */

struct mpu {
	const dws_s3_put *p;
	uint64_t part;          /* bytes of every part but the last */
	uint32_t n;             /* parts */
	uint64_t base;          /* the current part's offset */
	char id[1024];          /* UploadId */
	char (*etags)[160];
};

/* The object's URL with a sorted query of n pairs. */
static char *url_with(const dws_s3_put *p, const char *const *kv, size_t n)
{
	char *q = dws_http_query(kv, n);
	char *url = dws_xasprintf("%s?%s", p->url, q);
	free(q);
	return url;
}

/* A PUT of len bytes of the file from off: PutObject or UploadPart. A large
 * one takes a while: a deadline for its bytes at 1 MiB/s. */
static int put_bytes(const dws_s3_put *p, const char *url, uint64_t off, uint64_t len,
		     void (*sent)(void *ctx, uint64_t bytes), void *ctx, dws_http_resp *rs, dws_error *err)
{
	dws_http_upload up = {.fd = p->fd, .off = off, .len = len, .sent = sent, .ctx = ctx};
	int64_t deadline = dws_now_ms() + 60000 + (int64_t)(len >> 20) * 1000;
	dws_http_req rq = {.url = url, .method = "PUT", .upload = &up, .cls = DWS_HTTP_S3, .what = p->what,
			   .deadline_ms = deadline, .stop = p->stop,
			   .headers = {off || len < p->len ? NULL : "Content-Type: application/octet-stream"}};
	return dws_http_do(p->http, &rq, rs, err);
}

static int put_object(const dws_s3_put *p, dws_error *err)
{
	dws_http_resp rs;
	int rc = put_bytes(p, p->url, 0, p->len, p->sent, p->ctx, &rs, err);
	dws_http_resp_free(&rs);
	return rc;
}

/* A POST of body (NULL: none) to url; its XML answer parsed into r. */
static int post_xml(struct mpu *m, const char *url, const char *op, const char *body, const char *want,
		    int64_t deadline, struct reply *r, dws_error *err)
{
	const dws_s3_put *p = m->p;
	dws_http_req rq = {.url = url, .method = "POST", .body = body, .cls = DWS_HTTP_S3, .what = p->what,
			   .content_type = body ? "application/xml" : "application/octet-stream", .max_body = MAX_REPLY,
			   .deadline_ms = deadline, .stop = p->stop};
	dws_http_resp rs;
	int rc = dws_http_do(p->http, &rq, &rs, err);
	if (!rc)
		rc = parse_reply(p->what, op, &rs, want, r, err);
	dws_http_resp_free(&rs);
	return rc;
}

static int mpu_create(struct mpu *m, dws_error *err)
{
	const char *kv[] = {"uploads", NULL};
	char *url = url_with(m->p, kv, 1);
	struct reply r;
	int rc = post_xml(m, url, "CreateMultipartUpload", NULL, "InitiateMultipartUploadResult", 0, &r, err);
	free(url);
	if (!rc && !r.upload_id[0])
		rc = dws_fail(err, DWS_EFORMAT, "%s: CreateMultipartUpload answer has no UploadId", m->p->what);
	if (!rc)
		memcpy(m->id, r.upload_id, sizeof(m->id));
	return rc;
}

static void part_sent(void *ctx, uint64_t bytes)
{
	struct mpu *m = ctx;
	if (m->p->sent)
		m->p->sent(m->p->ctx, m->base + bytes);
}

/* An ETag goes into CompleteMultipartUpload's XML: printable, no markup. */
static bool etag_ok(const char *e)
{
	size_t n = strlen(e);
	if (!n || n >= 158)
		return false;
	for (; *e; e++)
		if (*e < 0x20 || *e > 0x7e || *e == '<' || *e == '>' || *e == '&')
			return false;
	return true;
}

static int mpu_part(struct mpu *m, uint32_t i, dws_error *err)
{
	char num[16];
	snprintf(num, sizeof(num), "%u", i + 1);
	const char *kv[] = {"partNumber", num, "uploadId", m->id};
	char *url = url_with(m->p, kv, 2);
	m->base = (uint64_t)i * m->part;
	uint64_t len = m->p->len - m->base < m->part ? m->p->len - m->base : m->part;
	dws_http_resp rs;
	int rc = put_bytes(m->p, url, m->base, len, part_sent, m, &rs, err);
	free(url);
	if (!rc && !etag_ok(rs.etag))
		rc = dws_fail(err, DWS_EFORMAT, "%s: UploadPart %u of %u: %s", m->p->what, i + 1, m->n,
			      rs.etag[0] ? "its ETag is not one S3 sends" : "no ETag in the answer");
	if (!rc)
		snprintf(m->etags[i], sizeof(m->etags[i]), "%s", rs.etag);
	dws_http_resp_free(&rs);
	return rc;
}

static int mpu_complete(struct mpu *m, dws_error *err)
{
	size_t cap = (size_t)m->n * 224 + 128, len = 0;
	char *body = dws_xmalloc(cap);
	len += (size_t)snprintf(body, cap, "<CompleteMultipartUpload>");
	for (uint32_t i = 0; i < m->n; i++)
		len += (size_t)snprintf(body + len, cap - len, "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag></Part>", i + 1,
					m->etags[i]);
	snprintf(body + len, cap - len, "</CompleteMultipartUpload>");
	const char *kv[] = {"uploadId", m->id};
	char *url = url_with(m->p, kv, 1);
	/* S3 may take minutes to join the parts (it sends spaces meanwhile) */
	int64_t deadline = dws_now_ms() + 120000 + (int64_t)(m->p->len >> 30) * 1000;
	struct reply r;
	int rc = post_xml(m, url, "CompleteMultipartUpload", body, "CompleteMultipartUploadResult", deadline, &r, err);
	free(url);
	free(body);
	return rc;
}

/* AbortMultipartUpload, whatever stopped the upload (never stopped itself);
 * the error line says whether it went. */
static void mpu_abort(struct mpu *m, dws_error *err)
{
	const char *kv[] = {"uploadId", m->id};
	char *url = url_with(m->p, kv, 1);
	dws_http_req rq = {.url = url, .method = "DELETE", .cls = DWS_HTTP_S3, .what = m->p->what,
			   .deadline_ms = dws_now_ms() + 30000};
	dws_http_resp rs;
	dws_error ae = {0};
	int rc = dws_http_do(m->p->http, &rq, &rs, &ae);
	dws_http_resp_free(&rs);
	free(url);
	if (!err)
		return;
	size_t l = strlen(err->msg);
	if (rc && rc != DWS_ENOENT)
		snprintf(err->msg + l, sizeof(err->msg) - l,
			 "; aborting upload %.64s failed too (%.200s): its parts stay stored until a lifecycle rule or "
			 "an abort removes them", m->id, ae.msg);
	else
		snprintf(err->msg + l, sizeof(err->msg) - l, " (multipart upload aborted)");
}

/* The ETag S3 gives an object joined from these parts: the MD5 of their
 * MD5s (each part's ETag), then "-N". false: a part's ETag is not a plain
 * MD5 (SSE-KMS, say), so the object cannot be recognized by it. */
static bool joined_etag(const struct mpu *m, char *out, size_t cap)
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_md5(), NULL) == 1;
	for (uint32_t i = 0; ok && i < m->n; i++) {
		const char *e = m->etags[i];
		size_t n = strlen(e);
		if (n == 34 && e[0] == '"' && e[33] == '"')
			e++, n = 32;
		unsigned char md5[16];
		for (size_t k = 0; ok && k < 16; k++) {
			unsigned v = 0;
			ok = n == 32 && isxdigit((unsigned char)e[2 * k]) && isxdigit((unsigned char)e[2 * k + 1]) &&
			     sscanf(e + 2 * k, "%2x", &v) == 1;
			md5[k] = (unsigned char)v;
		}
		ok = ok && EVP_DigestUpdate(ctx, md5, 16) == 1;
	}
	unsigned char d[EVP_MAX_MD_SIZE];
	unsigned dl = 0;
	ok = ok && EVP_DigestFinal_ex(ctx, d, &dl) == 1 && dl == 16;
	EVP_MD_CTX_free(ctx);
	size_t len = 0;
	for (unsigned k = 0; ok && k < 16; k++)
		len += (size_t)snprintf(out + len, cap - len, "%02x", d[k]);
	if (ok)
		snprintf(out + len, cap - len, "-%u", m->n);
	return ok;
}

/* CompleteMultipartUpload said NoSuchUpload: an earlier try of it may have
 * joined the parts and its answer been lost on the way. True when the
 * object is there with this upload's size and joined ETag. */
static bool completed_before(const struct mpu *m)
{
	char want[48];
	if (!joined_etag(m, want, sizeof(want)))
		return false;
	dws_http_req rq = {.url = m->p->url, .method = "HEAD", .cls = DWS_HTTP_S3, .what = m->p->what,
			   .deadline_ms = dws_now_ms() + 30000};
	dws_http_resp rs;
	dws_error he = {0};
	bool yes = false;
	if (!dws_http_do(m->p->http, &rq, &rs, &he)) {
		const char *e = rs.etag;
		size_t n = strlen(e);
		if (n >= 2 && e[0] == '"' && e[n - 1] == '"')
			e++, n -= 2;
		yes = rs.has_content_length && rs.content_length == m->p->len && n == strlen(want) && !strncmp(e, want, n);
	}
	dws_http_resp_free(&rs);
	return yes;
}

static int multipart(const dws_s3_put *p, const dws_s3_upload_conf *c, dws_error *err)
{
	struct mpu m = {.p = p, .part = dws_s3_part_size(p->len, c->part_size)};
	m.n = (uint32_t)((p->len + m.part - 1) / m.part);
	int rc = mpu_create(&m, err);
	if (rc)
		return rc;
	m.etags = dws_xcalloc(m.n, sizeof(*m.etags));
	for (uint32_t i = 0; i < m.n && !rc; i++)
		rc = mpu_part(&m, i, err);
	if (!rc)
		rc = mpu_complete(&m, err);
	if (rc == DWS_ENOENT && completed_before(&m)) {
		dws_log_info("%s: CompleteMultipartUpload's answer was lost; the object is there, joined from these %u parts",
			     p->what, m.n);
		rc = DWS_OK;
		if (err)
			err->code = 0, err->msg[0] = 0;
	}
	if (rc)
		mpu_abort(&m, err);
	free(m.etags);
	return rc;
}

int dws_s3_upload(const dws_s3_put *p, const dws_s3_upload_conf *c, dws_error *err)
{
	if (p->len > DWS_S3_OBJECT_MAX)
		return dws_fail(err, DWS_EUNSUP, "%s: %llu bytes, over the 5 TiB an S3 object holds", p->what,
				(unsigned long long)p->len);
	if (p->sent)
		p->sent(p->ctx, 0); /* the upload starts */
	if (p->len <= c->threshold)
		return put_object(p, err);
	return multipart(p, c, err);
}
