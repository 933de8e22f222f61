"""dwsctl publish to s3:// past DWSFS_S3_MULTIPART_THRESHOLD: a multipart
upload (src/s3_upload.c). The round trip runs against s3rver; failures,
interrupts and SigV4 against a small S3 in this file (127.0.0.1 only) that
checks every request's signature as S3 does (query sorted: libcurl 7.88 signs
it as sent), records every request, and fails where a test says."""
import datetime
import hashlib
import hmac
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import dwsgen
from mountutil import s3rver_running
from test_http import s3_env, wait_until
from test_publish import tensors

MIB = 1 << 20
SMALL = {"DWSFS_S3_MULTIPART_THRESHOLD": "5M", "DWSFS_S3_PART_SIZE": "5MiB"}


def make_model(folder, mib):
    """A checkpoint folder of about mib MiB of BF16 that does not compress."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    n = mib * MIB // 2 // 4
    ts = {f"layer{i}.weight": dwsgen.tensor("BF16", dwsgen.f32_to_bf16(rng.standard_normal(n, dtype=np.float32)))
          for i in range(4)}
    (folder / "model.safetensors").write_bytes(dwsgen.safetensors_bytes(ts))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("mpu") / "ckpt", 13)


def publish(dwsctl, model, uri, env, step=1, **kw):
    return subprocess.run([dwsctl, "publish", "-", str(model), uri, "--step", str(step), "--format", "anchor"],
                          capture_output=True, text=True, env=env, timeout=kw.get("timeout", 120))


# ---------------------------------------------------------------- s3rver

@pytest.fixture
def s3rver(tmp_path):
    """s3rver with its log kept (it says "Stored part N of ID")."""
    with s3rver_running(tmp_path, 20000 + (os.getpid() + 7) % 20000, log=tmp_path / "s3rver.log") as ep:
        yield ep, tmp_path / "s3rver.log"


def test_multipart_roundtrip_on_s3rver(dwsctl, model, tmp_path, s3rver):
    """A 13 MiB step in 5 MiB parts: three UploadParts, and the step read back
    from the store has the same bytes."""
    ep, log = s3rver
    env = dict(s3_env(ep, tmp_path / "cache"), **SMALL)
    uri = "s3://grpo/mpu/run"
    p = publish(dwsctl, model, uri, env)
    assert p.returncode == 0, p.stderr
    parts = re.findall(r"Stored part (\d+) of", log.read_text())
    assert sorted(parts) == ["1", "2", "3"], log.read_text()[-2000:]
    out = tmp_path / "out"
    e = subprocess.run([dwsctl, "extract", uri, str(out), "--step", "1"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert e.returncode == 0, e.stderr
    assert tensors(out / "model.safetensors") == tensors(model / "model.safetensors")
    # the default threshold (64 MiB): one PutObject, no parts
    before = len(parts)
    p = publish(dwsctl, model, "s3://grpo/mpu/run2", s3_env(ep, tmp_path / "cache2"))
    assert p.returncode == 0, p.stderr
    assert len(re.findall(r"Stored part (\d+) of", log.read_text())) == before


# ---------------------------------------------------------------- a checking S3

KEY, SECRET, REGION = "AKIDMPU", "mpu-secret-key", "us-east-1"


def enc(s):
    return urllib.parse.quote(s, safe="-_.~")


def sigv4_ok(h, method, raw_path, raw_query):
    """Whether the request's SigV4 signature is the one S3 computes: the query
    decoded, re-escaped and sorted."""
    m = re.match(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, ?"
                 r"SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$", h.get("Authorization", ""))
    if not m or m.group(1) != KEY:
        return False
    date, region, signed, sig = m.group(2), m.group(3), m.group(4).split(";"), m.group(5)
    pairs = []
    for kv in raw_query.split("&") if raw_query else []:
        k, _, v = kv.partition("=")
        pairs.append((enc(urllib.parse.unquote(k)), enc(urllib.parse.unquote(v))))
    query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    headers = "".join(f"{n}:{' '.join((h.get(n) or '').split())}\n" for n in signed)
    creq = "\n".join([method, raw_path, query, headers, ";".join(signed), h.get("x-amz-content-sha256", "")])
    scope = f"{date}/{region}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", h.get("x-amz-date", ""), scope, hashlib.sha256(creq.encode()).hexdigest()])
    k = ("AWS4" + SECRET).encode()
    for part in (date, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(hmac.new(k, sts.encode(), hashlib.sha256).hexdigest(), sig)


class FakeS3:
    """S3 enough for publish: ListObjectsV2 (two pages, the second behind a
    continuation token with characters to escape), multipart uploads. fail:
    {"part": N, "status": S} answers part N with S; "complete_error": a 200
    whose body is an <Error>; "hold_part": N holds part N until released;
    "complete_lost": CompleteMultipartUpload joins the parts and drops the
    connection unanswered, its retry gets NoSuchUpload."""

    def __init__(self, fail=None):
        self.fail = fail or {}
        self.requests = []         # (method, path, query)
        self.bad_signatures = []
        self.parts = {}            # part number -> bytes
        self.joined = None         # (ETag, size) once an upload completed
        self.part_started = threading.Event()
        self.release = threading.Event()
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def answer(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one(self):
                path, _, query = self.path.partition("?")
                fake.requests.append((self.command, path, query))
                if not sigv4_ok(self.headers, self.command, path, query):
                    fake.bad_signatures.append((self.command, self.path))
                    self.close_connection = True
                    return self.answer(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
                q = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
                fake.route(self, q)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def body(self, h):
        n = int(h.headers.get("Content-Length", "0"))
        return h.rfile.read(n) if n else b""

    def route(self, h, q):
        xml = [("Content-Type", "application/xml")]
        if h.command == "GET" and "list-type" in q:
            nxt = "" if "continuation-token" in q else "<NextContinuationToken>t/1+=</NextContinuationToken>"
            trunc = "false" if nxt == "" else "true"
            return h.answer(200, f"<ListBucketResult><IsTruncated>{trunc}</IsTruncated>{nxt}</ListBucketResult>".encode(),
                            xml)
        if h.command == "POST" and "uploads" in q:
            return h.answer(200, b"<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>k</Key>"
                                 b"<UploadId>up.ID-1~x</UploadId></InitiateMultipartUploadResult>", xml)
        if h.command == "PUT" and "partNumber" in q:
            n = int(q["partNumber"])
            if self.fail.get("hold_part") == n:
                self.part_started.set()
                self.release.wait(30)
                h.close_connection = True
                return h.answer(500)
            data = self.body(h)
            if self.fail.get("part") == n:
                return h.answer(self.fail["status"], b"<Error><Code>Refused</Code></Error>", xml)
            self.parts[n] = data
            return h.answer(200, b"", [("ETag", '"%s"' % hashlib.md5(data).hexdigest())])
        if h.command == "POST" and "uploadId" in q:
            self.body(h)
            if self.fail.get("complete_lost"):
                if self.joined:  # the retry: that upload is gone
                    return h.answer(404, b"<Error><Code>NoSuchUpload</Code></Error>", xml)
                # joined, and the connection drops before the answer
                md5s = b"".join(hashlib.md5(self.parts[i]).digest() for i in sorted(self.parts))
                self.joined = (hashlib.md5(md5s).hexdigest() + f"-{len(self.parts)}",
                               sum(len(v) for v in self.parts.values()))
                h.close_connection = True
                return None
            if self.fail.get("complete_error"):
                return h.answer(200, b"<?xml version=\"1.0\"?>\n<Error><Code>InternalError</Code><Message>We "
                                     b"encountered an internal error.\nPlease try again.</Message></Error>", xml)
            return h.answer(200, b"<CompleteMultipartUploadResult><ETag>\"x-3\"</ETag></CompleteMultipartUploadResult>",
                            xml)
        if h.command == "DELETE" and "uploadId" in q:
            return h.answer(204)
        if h.command == "HEAD" and self.joined:
            h.send_response(200)
            h.send_header("ETag", f'"{self.joined[0]}"')
            h.send_header("Content-Length", str(self.joined[1]))
            h.end_headers()
            return None
        return h.answer(404, b"<Error><Code>NoSuchKey</Code></Error>", xml)

    def count(self, method, what):
        return sum(1 for m, _, q in self.requests if m == method and what in q)

    def close(self):
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def fake():
    made = []

    def make(fail=None):
        made.append(FakeS3(fail))
        return made[-1]
    yield make
    for f in made:
        f.close()


def fake_env(f, tmp_path, **extra):
    return dict(os.environ, AWS_ENDPOINT_URL=f.url, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                AWS_REGION=REGION, DWSFS_CACHE_DIR=str(tmp_path / "cache"), **dict(SMALL, **extra))


def test_multipart_flow_signed_as_s3_checks(dwsctl, model, tmp_path, fake):
    """Every request's signature is the one S3 computes, the listing's second
    page (continuation-token) too; the parts are the file's bytes in order and
    CompleteMultipartUpload names them all."""
    f = fake()
    p = publish(dwsctl, model, "s3://bkt/run", fake_env(f, tmp_path))
    assert p.returncode == 0, p.stderr
    assert f.bad_signatures == [], f.bad_signatures
    assert f.count("GET", "continuation-token=t%2F1%2B%3D") >= 1, f.requests
    assert sorted(f.parts) == [1, 2, 3] and all(len(f.parts[i]) == 5 * MIB for i in (1, 2)), sorted(f.parts)
    assert f.count("POST", "uploads=") == 1 and f.count("POST", "uploadId=up.ID-1~x") == 1
    assert f.count("DELETE", "uploadId") == 0


def test_complete_answer_lost_object_there(dwsctl, model, tmp_path, fake):
    """CompleteMultipartUpload joined the parts but its answer was lost: the
    retry's NoSuchUpload is not a failure once a HEAD shows the object with
    this upload's size and joined ETag (the MD5 of the parts' MD5s, -N)."""
    f = fake({"complete_lost": True})
    p = publish(dwsctl, model, "s3://bkt/run", fake_env(f, tmp_path))
    assert p.returncode == 0, p.stderr
    assert f.count("POST", "uploadId=") >= 2 and f.count("HEAD", "") >= 1, f.requests
    assert f.count("DELETE", "uploadId") == 0, f.requests


@pytest.mark.parametrize("how", ["part", "complete_error"])
def test_a_failed_upload_is_aborted(dwsctl, model, tmp_path, fake, how):
    """Part 2 refused, or CompleteMultipartUpload's 200 with an <Error> body:
    publish fails with one line and AbortMultipartUpload is sent."""
    f = fake({"part": 2, "status": 400} if how == "part" else {"complete_error": True})
    p = publish(dwsctl, model, "s3://bkt/run", fake_env(f, tmp_path))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "multipart upload aborted" in p.stderr, p.stderr
    if how == "part":
        assert "HTTP 400" in p.stderr and f.count("POST", "uploadId=") == 0, p.stderr
        assert f.count("PUT", "partNumber=3") == 0
    else:
        assert "CompleteMultipartUpload failed: InternalError" in p.stderr, p.stderr
    assert f.requests[-1][0] == "DELETE" and "uploadId=up.ID-1~x" in f.requests[-1][2], f.requests[-3:]
    assert f.bad_signatures == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_upload_is_aborted(dwsctl, model, tmp_path, fake, sig):
    """SIGINT or SIGTERM while part 2 goes: the upload is aborted, then dwsctl
    dies of the signal."""
    f = fake({"hold_part": 2})
    p = subprocess.Popen([dwsctl, "publish", "-", str(model), "s3://bkt/run", "--step", "1", "--format", "anchor"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fake_env(f, tmp_path))
    try:
        assert f.part_started.wait(60), "part 2 never came"
        t0 = time.monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -sig, (p.returncode, err)
    assert time.monotonic() - t0 < 10
    assert "interrupted" in err and "multipart upload aborted" in err, err
    assert f.count("DELETE", "uploadId=up.ID-1~x") == 1 and f.count("POST", "uploadId=") == 0, f.requests


@pytest.mark.parametrize("var,value,says", [
    ("DWSFS_S3_PART_SIZE", "lots", "not a size"),
    ("DWSFS_S3_PART_SIZE", "-5M", "not a size"),
    ("DWSFS_S3_PART_SIZE", "99999999999999999999", "not a size"),
    ("DWSFS_S3_PART_SIZE", "4M", "under S3's smallest part"),
    ("DWSFS_S3_PART_SIZE", "6G", "over S3's largest part"),
    ("DWSFS_S3_MULTIPART_THRESHOLD", "5GiB1", "not a size"),
    ("DWSFS_S3_MULTIPART_THRESHOLD", "6G", "over the 5 GiB a single PutObject takes"),
])
def test_bad_settings_refused_before_anything(dwsctl, model, tmp_path, fake, var, value, says):
    f = fake()
    p = publish(dwsctl, model, "s3://bkt/run", fake_env(f, tmp_path, **{var: value}))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert var in p.stderr and says in p.stderr, p.stderr
    assert f.requests == []

