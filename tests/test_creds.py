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
