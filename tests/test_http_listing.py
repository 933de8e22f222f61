"""Listed keys a remote bucket cannot serve (a control character, over 1,023
bytes, not a safe path): each is skipped with one log line per bucket,
however often the bucket is listed again; the rest of the listing is served."""
import os
import subprocess
import time

import pytest

from test_http import (DWSCTL, DWSFS, Mount, add_bucket, ctl, hf_env, s3, s3_env, s3_put_tree,  # noqa: F401
                       same_tree, wait_until)

LONG = "/".join(["d" * 200] * 6)  # 1,205 bytes: S3 allows 1,024 at most


@pytest.fixture(autouse=True)
def _need_binaries():
    if not (os.access(DWSFS, os.X_OK) and os.access(DWSCTL, os.X_OK)):
        pytest.skip("dwsfs/dwsctl not built")


def s3_put(ep, key_escaped, data, tmp_path):
    f = tmp_path / "obj"
    f.write_bytes(data)
    subprocess.run(["curl", "-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", "S3RVER:S3RVER",
                    "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", str(f), f"{ep}/grpo/{key_escaped}"],
                   check=True, timeout=60)


def ignored_lines(log):
    return [ln for ln in log.splitlines() if "ignoring listed object" in ln]


BAD_S3_KEYS = {  # URL-escaped key under run1/: what the log line says
    "control": ("deltas/bad%01name", "control character"),
    "long": ("anchors/" + LONG, "over 1023 bytes"),
    "backslash": ("deltas/back%5Cslash", "not a safe path"),
}


@pytest.mark.parametrize("bad", sorted(BAD_S3_KEYS))
def test_s3_unservable_key_skipped_logged_once(s3, scenarios, tmp_path, bad):
    """s3rver sends a control character raw (expat refused the whole answer
    for it) and a long key whole (it did not fit the parser's buffer: the
    whole listing refused). Now ls and the mount work, and a mount that
    lists every poll logs the key once."""
    sdir, info = scenarios["v1"]
    s3_put_tree(s3, sdir / "bucket", "run1")
    key, why = BAD_S3_KEYS[bad]
    s3_put(s3, "run1/" + key, b"x", tmp_path)
    env = s3_env(s3, tmp_path / "cache")
    p = ctl("ls", "s3://grpo/run1", env=env, check=False)
    assert p.returncode == 0, p.stderr
    assert len(ignored_lines(p.stderr)) == 1, p.stderr
    with Mount("s3://grpo/run1", tmp_path / "mnt", ["poll=1"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]))
        n0 = m.status()["s3_requests"]
        wait_until(lambda: m.status()["s3_requests"] >= n0 + 3, 20, "three more polls (each a listing)")
        lines = ignored_lines(m.log())
        assert len(lines) == 1 and why in lines[0], lines


def test_hf_unsafe_key_logged_once(hub, scenarios, tmp_path):
    """A Hub bucket listing keys that are no safe path (a control character,
    a backslash): each logged once, through relists (each change to the
    bucket makes the mount list it again)."""
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, dst = add_bucket(root, "v1", sdir)
    (dst / "deltas" / "bad\x01name").write_bytes(b"x")
    (dst / "anchors" / "back\\slash").write_bytes(b"y")
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=1", "info_poll=1"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]))
        for i in range(3):
            (dst / "other").mkdir(exist_ok=True)
            (dst / "other" / f"f{i}").write_bytes(b"%d" % i)   # the bucket changed: listed again
            n = sum(v for k, v in h.stats()["by_path"].items() if "/tree/" in k)
            wait_until(lambda: sum(v for k, v in h.stats()["by_path"].items() if "/tree/" in k) > n, 20,
                       f"a relist after change {i}")
        time.sleep(0.2)
        lines = ignored_lines(m.log())
        assert len(lines) == 2, lines
