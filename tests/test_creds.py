"""Credentials: the Hub token from -o token_file, re-read when its file
changes or the Hub refuses it (a rotated token needs no remount); a refusal
that says where the token came from and what to do; a repo-not-found for
hf://NS/NAME that points at hf://buckets/NS/NAME."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hubserver import Hub
from test_http import DWSCTL, DWSFS, Mount, ctl, hf_env, same_tree, wait_until

TOKEN_A = "hf_rotation_token_AAAAAAAAAAAAAAAA"
TOKEN_B = "hf_rotation_token_BBBBBBBBBBBBBBBB"
TOKEN_C = "hf_rotation_token_CCCCCCCCCCCCCCCC"


@pytest.fixture(autouse=True)
def _need_binaries():
    if not (os.access(DWSFS, os.X_OK) and os.access(DWSCTL, os.X_OK)):
        pytest.skip("dwsfs/dwsctl not built")


def step_files(bucket):
    """{step: path} of a bucket folder's step files."""
    out = {}
    for p in Path(bucket).glob("*/step_*.safetensors*"):
        out[int(p.name.split("_")[1].split(".")[0])] = p
    return out


def hub_with_bucket(tmp_path, scenarios, hold_back=2):
    """A Hub over a copy of the v1 bucket without its last hold_back steps:
    (root, uri, bucket folder, info, [held back (step, file, bytes)])."""
    sdir, info = scenarios["v1"]
    root = tmp_path / "hubroot"
    dst = root / "buckets" / "test" / "v1"
    shutil.copytree(sdir / "bucket", dst, copy_function=shutil.copy2)
    files = step_files(dst)
    held = []
    for s in info["steps"][-hold_back:]:
        f = files[s]
        held.append((s, f, f.read_bytes()))
        f.unlink()
    return root, "hf://buckets/test/v1", dst, info, held


def install(path, blob):
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(blob)
    os.rename(tmp, path)


def write_token(path, token):
    """A new file renamed into place (a new inode), as secret managers do."""
    tmp = path.parent / (path.name + ".new")
    tmp.write_text(token + "\n")
    os.rename(tmp, path)


def test_token_file_option_checked_up_front(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")
    t0 = time.monotonic()
    p = subprocess.run([DWSFS, "-f", "hf://buckets/acme/run", str(mnt), "-o", "token_file=/no/such/token"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("dwsfs: token_file /no/such/token:"), p.stderr
    assert time.monotonic() - t0 < 2


def test_token_file_rotated_without_remount(tmp_path, scenarios):
    """The mount reads its token from -o token_file. The Hub's token is
    rotated and the file rewritten: the next step is served. Rotated again
    with the file rewritten in place (same inode, size and mtime, so only
    the Hub's 401 can tell): re-read on the 401, the last step served."""
    root, uri, dst, info, held = hub_with_bucket(tmp_path, scenarios)
    sdir = scenarios["v1"][0]
    tok = tmp_path / "token"
    write_token(tok, TOKEN_A)
    with Hub(str(root), token=TOKEN_A).start() as h:
        env = hf_env(h, tmp_path / "cache")
        with Mount(uri, tmp_path / "mnt", ["poll=1", f"token_file={tok}"], env=env) as m:
            first = info["steps"][-3]
            assert m.status()["step"] == first
            # rotation 1: a new file in place, then the Hub takes only the new token
            write_token(tok, TOKEN_B)
            time.sleep(1.5)  # the file is looked at once a second
            h.token = TOKEN_B
            (s1, f1, b1), (s2, f2, b2) = held
            install(f1, b1)
            wait_until(lambda: m.status()["step"] == s1, 30, f"step {s1} after the first rotation")
            # rotation 2: the Hub first, the file rewritten in place, its stat unchanged
            st = os.stat(tok)
            h.token = TOKEN_C
            with open(tok, "r+") as f:
                f.write(TOKEN_C + "\n")
            os.utime(tok, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert os.stat(tok).st_ino == st.st_ino and os.stat(tok).st_size == st.st_size
            install(f2, b2)
            wait_until(lambda: m.status()["step"] == s2, 30, f"step {s2} after the second rotation")
            same_tree(m.mnt, sdir / "expected" / str(s2))
        log = (tmp_path / "mnt.log").read_text()
    for t in (TOKEN_A, TOKEN_B, TOKEN_C):
        assert t not in log
    assert "re-read" in log, log


def one_line(p):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    return lines[0]


def test_refusal_names_the_token_source_and_what_to_do(tmp_path, scenarios):
    root, uri, dst, info, held = hub_with_bucket(tmp_path, scenarios, hold_back=0)
    with Hub(str(root), token=TOKEN_A).start() as h:
        env = hf_env(h, tmp_path / "cache")
        # no token anywhere
        line = one_line(ctl("ls", uri, env=env, check=False))
        assert "401" in line and "no Hub token" in line and "HF_TOKEN" in line and "hf auth login" in line, line
        # a wrong HF_TOKEN
        line = one_line(ctl("ls", uri, env=dict(env, HF_TOKEN="hf_wrong_token_xyz"), check=False))
        assert "401" in line and "HF_TOKEN" in line and "hf_wrong_token_xyz" not in line, line
        # a wrong token in the hf CLI's file ($HF_HOME/token)
        hfhome = Path(env["HF_HOME"])
        hfhome.mkdir(parents=True, exist_ok=True)
        (hfhome / "token").write_text("hf_wrong_token_xyz\n")
        line = one_line(ctl("ls", uri, env=env, check=False))
        assert str(hfhome / "token") in line and "hf auth login" in line and "hf_wrong_token_xyz" not in line, line
        # a 403: the token is good but may not read the bucket
        h.set_faults({"class": "api", "kind": "status", "status": 403, "count": 100})
        line = one_line(ctl("ls", uri, env=dict(env, HF_TOKEN=TOKEN_A), check=False))
        assert "403" in line and "HF_TOKEN" in line and "access" in line, line
        h.clear_faults()


def test_repo_not_found_suggests_buckets(hub, scenarios, tmp_path):
    h, root = hub
    sdir, _ = scenarios["v1"]
    shutil.copytree(sdir / "bucket", root / "buckets" / "test" / "v1")
    env = hf_env(h, tmp_path / "cache")
    line = one_line(ctl("ls", "hf://test/v1", env=env, check=False))
    assert "404" in line and "hf://buckets/test/v1" in line, line


# ---------------------------------------------------------------- s3

import datetime  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import urllib.parse  # noqa: E402

from test_http import s3, s3_env, s3_put_tree  # noqa: E402,F401

AUTH_RE = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                     r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


def _hm(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_check(method, target, headers, secrets):
    """(access key, signed headers) if the request's SigV4 signature is right
    for the secret `secrets` holds for its key, else None."""
    m = AUTH_RE.match(headers.get("Authorization", ""))
    if not m:
        return None
    key, date, region, service, signed, sig = m.groups()
    if key not in secrets:
        return None
    path, _, query = target.partition("?")
    pairs = []
    for part in query.split("&") if query else []:
        k, _, v = part.partition("=")
        q = lambda s: urllib.parse.quote(urllib.parse.unquote(s), safe="-_.~")  # noqa: E731
        pairs.append((q(k), q(v)))
    cq = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    if any(headers.get(h) is None for h in signed.split(";")):
        return None  # a signed header the request does not carry (libcurl signed "Expect:" unsent)
    ch = "".join(f"{h}:{' '.join(headers.get(h).split())}\n" for h in signed.split(";"))
    creq = "\n".join([method, path, cq, ch, signed, headers.get("x-amz-content-sha256", "")])
    sts = "\n".join(["AWS4-HMAC-SHA256", headers.get("x-amz-date", ""), f"{date}/{region}/{service}/aws4_request",
                     hashlib.sha256(creq.encode()).hexdigest()])
    k = _hm(("AWS4" + secrets[key]).encode(), date)
    for part in (region, service, "aws4_request"):
        k = _hm(k, part)
    if hmac.new(k, sts.encode(), hashlib.sha256).hexdigest() != sig:
        return None
    return key, signed.split(";")


class Loopback:
    """A loopback HTTP server answering with handler(method, target, headers)
    -> (status, body bytes); records every request."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(min(n, 1 << 20))
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, body = outer.handler(self.command, self.path, self.headers)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = _any

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        self.t = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.srv.shutdown()
        self.srv.server_close()
        self.t.join(5)


EMPTY_LIST = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix></Prefix>'
              b'<KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>')


def aws_env(tmp_path, **kw):
    """An environment with no AWS setting of the machine's, profile files
    under tmp_path, and never the real metadata address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true",
               DWSFS_CACHE_DIR=str(tmp_path / "cache"))
    env.update(kw)
    return env


def test_s3_profile_with_session_token_signed(tmp_path, scenarios):
    """Keys and a session token from a profile of the shared credentials file,
    the region from the config file: every request carries the token in
    x-amz-security-token, and SigV4 signs it (checked as S3 would)."""
    aws = tmp_path / "home" / ".aws"
    aws.mkdir(parents=True)
    (aws / "credentials").write_text("[default]\naws_access_key_id = AKWRONG\naws_secret_access_key = x\n"
                                     "[trainer]\naws_access_key_id = AKPROFILE\n"
                                     "aws_secret_access_key = secret/of+the=profile\n"
                                     "aws_session_token = SESSION-TOKEN-123\n")
    (aws / "config").write_text("[profile trainer]\nregion = eu-central-1\n")
    seen, puts = [], []

    def handler(method, target, headers):
        ok = sigv4_check(method, target, headers, {"AKPROFILE": "secret/of+the=profile"})
        seen.append((ok, headers.get("x-amz-security-token"), headers.get("Authorization", "")))
        if method == "PUT":
            puts.append((target, ok, int(headers.get("Content-Length") or 0)))
        good = ok and "x-amz-security-token" in ok[1] and headers.get("x-amz-security-token") == "SESSION-TOKEN-123"
        return (200, EMPTY_LIST) if good else (403, b"<Error><Code>AccessDenied</Code></Error>")

    with Loopback(handler) as srv:
        env = aws_env(tmp_path, AWS_PROFILE="trainer", AWS_ENDPOINT_URL=srv.url)
        p = ctl("ls", "s3://bkt/run", env=env, check=False)
        assert p.returncode == 0, p.stderr
        assert seen and all(ok for ok, _, _ in seen), seen
        assert all("/eu-central-1/s3/" in auth for _, _, auth in seen), seen
        # a publish: its PutObject signed the same way (content type and token among the signed headers)
        ckpt = scenarios["gaps"][0] / "expected" / str(scenarios["gaps"][1]["steps"][0])
        p = ctl("publish", "-", ckpt, "s3://bkt/run", "--step", 1, "--format", "anchor", env=env, check=False)
        assert p.returncode == 0, p.stderr
        assert len(puts) == 1 and puts[0][0] == "/bkt/run/anchors/step_000001.safetensors" and puts[0][1], puts
        assert "content-type" in puts[0][1][1] and puts[0][2] > 0, puts
        assert all(ok for ok, _, _ in seen), seen
        # the same keys from the environment, with AWS_SESSION_TOKEN
        seen.clear()
        env = aws_env(tmp_path, AWS_ENDPOINT_URL=srv.url, AWS_ACCESS_KEY_ID="AKPROFILE",
                      AWS_SECRET_ACCESS_KEY="secret/of+the=profile", AWS_SESSION_TOKEN="SESSION-TOKEN-123")
        assert ctl("ls", "s3://bkt/run", env=env, check=False).returncode == 0 and all(ok for ok, _, _ in seen)
        # a wrong token: refused, and the line says where the keys came from
        env["AWS_SESSION_TOKEN"] = "SESSION-TOKEN-999"
        line = one_line(ctl("ls", "s3://bkt/run", env=env, check=False))
        assert "403" in line and "AWS_ACCESS_KEY_ID" in line and "SESSION-TOKEN" not in line, line


def test_s3_without_credentials_names_the_ways(tmp_path):
    line = one_line(ctl("ls", "s3://bkt/run", env=aws_env(tmp_path, AWS_ENDPOINT_URL="http://127.0.0.1:9"),
                        check=False))
    assert "s3_key" not in line, line
    for want in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "role"):
        assert want in line, line


def iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("provider", ["container", "instance"])
def test_s3_role_credentials_refreshed_under_a_mount(s3, scenarios, tmp_path, provider):
    """Keys from a container agent or the instance metadata (IMDSv2) against
    s3rver: the mount serves, has the keys again before they expire (each
    issue lives 300 s + 4 s, and they are had again 300 s before), and serves
    a step published after that."""
    sdir, info = scenarios["v1"]
    last = info["latest"]
    s3_put_tree(s3, sdir / "bucket", "run1")
    held = [f"run1/{d}/step_{last:06d}.safetensors" for d in ("deltas", "anchors")]
    for key in held:  # the last step arrives later
        subprocess.run(["curl", "-s", "-X", "DELETE", "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", "S3RVER:S3RVER",
                        "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", f"{s3}/grpo/{key}"], check=True, timeout=30)
    issued = []

    def keys():
        issued.append(time.time())
        return json.dumps({"Code": "Success", "AccessKeyId": "S3RVER", "SecretAccessKey": "S3RVER",
                           "Token": f"tok-{len(issued)}", "Expiration": iso(time.time() + 304)}).encode()

    def handler(method, target, headers):
        if provider == "container":
            ok = target == "/creds" and headers.get("Authorization") == "agent-secret"
            return (200, keys()) if ok else (401, b"")
        if method == "PUT" and target == "/latest/api/token":
            return 200, b"imds-token"
        if headers.get("X-aws-ec2-metadata-token") != "imds-token":
            return 401, b""
        if target == "/latest/meta-data/iam/security-credentials/":
            return 200, b"node-role"
        if target == "/latest/meta-data/iam/security-credentials/node-role":
            return 200, keys()
        return 404, b""

    with Loopback(handler) as meta:
        env = aws_env(tmp_path, AWS_ENDPOINT_URL=s3, AWS_REGION="us-east-1")
        if provider == "container":
            env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=meta.url + "/creds",
                       AWS_CONTAINER_AUTHORIZATION_TOKEN="agent-secret")
        else:
            env.pop("AWS_EC2_METADATA_DISABLED")
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = meta.url
        prev = info["steps"][-2]
        with Mount("s3://grpo/run1", tmp_path / "mnt", ["poll=1"], env=env) as m:
            assert m.status()["step"] == prev
            wait_until(lambda: len(issued) >= 2, 20, "the keys had again before they expire")
            assert m.status()["last_error"] in (None, ""), m.status()
            for key in held:
                f = sdir / "bucket" / key[len("run1/"):]
                if f.exists():
                    subprocess.run(["curl", "-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", "S3RVER:S3RVER",
                                    "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", str(f), f"{s3}/grpo/{key}"],
                                   check=True, timeout=60)
            wait_until(lambda: m.status()["step"] == last, 30, f"step {last}")
            same_tree(m.mnt, sdir / "expected" / str(last))
        log = (tmp_path / "mnt.log").read_text()
        assert "re-read from" in log and ("instance role node-role" in log or "container" in log), log
        assert "tok-" not in log
