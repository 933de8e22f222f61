"""Range reads pinned to the object the listing named: an object rewritten
while it is read (small blocks, so many ranges) is never mixed into what a
read returns. Every byte read equals the old file, or the read fails with
EIO; a new listing (a new extract) then gives the new file. Against servers
that do not pin content by URL: the Hub's CDN serving by path
(hubserver cdn_by_path), a model repo whose resolver answers with the bytes
itself (resolve_direct), and S3 (s3rver)."""
import os
import shutil
import subprocess
import time

import pytest

from test_http import (DWSCTL, DWSFS, Mount, add_bucket, big_anchor_bucket, ctl, hf_env, read_all,  # noqa: F401
                       s3, s3_env, s3_put_tree, wait_until)

BS = 65536
CHUNK = 128 * 1024


@pytest.fixture(autouse=True)
def _need_binaries():
    if not (os.access(DWSFS, os.X_OK) and os.access(DWSCTL, os.X_OK)):
        pytest.skip("dwsfs/dwsctl not built")


def flipped(data, start):
    """The same bytes up to start, every byte after it changed: same size,
    same safetensors header, other content."""
    return data[:start] + bytes(b ^ 0x5A for b in data[start:])


def replace(path, data, tmp):
    """Rewrite path atomically, as an upload replaces an object."""
    t = tmp / ("new-" + path.name)
    t.write_bytes(data)
    os.replace(t, path)


def read_while_rewritten(path, old, rewrite, after):
    """Read path in chunks, calling rewrite() once `after` bytes are in.
    Returns (bytes read, errno of the read that failed or None); every byte
    read is checked against old: a mix of old and new bytes fails here."""
    got = bytearray()
    err = None
    with open(path, "rb") as f:
        for _ in range(len(old) // CHUNK + 2):
            if len(got) >= after and rewrite:
                rewrite()
                rewrite = None
            try:
                b = f.read(CHUNK)
            except OSError as e:
                err = e.errno
                break
            if not b:
                break
            got += b
    n = len(got)
    bad = next((i for i in range(0, n, 4096) if got[i:i + 4096] != old[i:i + 4096]), None)
    assert bad is None, f"mixed bytes: {n} read, they differ from the old file at {bad}"
    return n, err


def test_bucket_rewritten_mid_read_cdn_by_path(hub, tmp_path):
    """A 4 MiB anchor read in 64 KiB blocks while it is replaced, with a CDN
    that serves its current bytes whatever the URL named: the reads before
    the change return old bytes, the first range after it fails (EIO), no
    read returns new bytes; once the bucket is listed again, the step's view
    and a new extract have the new file."""
    h, root = hub
    h.cdn_by_path = True
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=4, mib=1)
    anchor = dst / "anchors" / "step_000001.safetensors"
    old = anchor.read_bytes()
    new = flipped(old, 4096)
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=1", "info_poll=1", f"block_size={BS}"],
               env=env) as m:
        f = m.mnt / "model.safetensors"
        n, err = read_while_rewritten(f, old, lambda: replace(anchor, new, tmp_path), after=len(old) // 4)
        assert err == 5 and n < len(old), (n, err)
        assert "changed" in m.log()

        def reads_new():  # once the poll has listed the bucket again (a new step view)
            try:
                return read_all(m.mnt / "steps" / "000001" / "model.safetensors") == new
            except OSError:
                return False
        wait_until(reads_new, 30, "the new content after a new listing")
    out = tmp_path / "out"
    ctl("extract", "hf://buckets/test/big", out, env=env)
    assert read_all(out / "model.safetensors") == new


def model_base(root, sdir, size):
    """v3gap's base model as a model repo, with a big extra file (served
    verbatim at the root) of `size` random bytes."""
    base = root / "models" / "acme" / "base" / "main"
    shutil.copytree(sdir / "base", base, copy_function=shutil.copy2)
    big = base / "vocab.bin"
    big.write_bytes(os.urandom(size))
    return big


@pytest.mark.parametrize("when", ["mid-read", "before-first-read"])
def test_model_repo_rewritten_resolve_direct(hub, scenarios, tmp_path, when):
    """A base model's file in a model repo whose resolver answers 200/206
    with the bytes (no redirect, no CDN): rewritten in the middle of a read,
    or after the listing and before its first range read, never a mix."""
    h, root = hub
    h.resolve_direct = True
    sdir, info = scenarios["v3gap"]
    uri, _ = add_bucket(root, "v3gap", sdir)
    big = model_base(root, sdir, 2 << 20)
    old = big.read_bytes()
    new = flipped(old, 0)
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=60", f"block_size={BS}", "cache_size=0", "base=hf://acme/base@main"],
               env=env) as m:
        assert os.path.getsize(m.mnt / "vocab.bin") == len(old)
        after = len(old) // 4 if when == "mid-read" else 0
        n, err = read_while_rewritten(m.mnt / "vocab.bin", old, lambda: replace(big, new, tmp_path), after)
        assert err == 5 and n < len(old), (n, err)
        if when == "before-first-read":
            assert n == 0
    out = tmp_path / "out"
    ctl("extract", uri, out, "--base", "hf://acme/base@main", env=env)
    assert read_all(out / "vocab.bin") == new


def test_s3_rewritten_mid_read(s3, tmp_path):
    """The same over S3 (s3rver serves by key; the ETag is the pin)."""
    src = tmp_path / "src"
    big_anchor_bucket(src, tensors=4, mib=1)
    s3_put_tree(s3, src, "big")
    old = (src / "anchors" / "step_000001.safetensors").read_bytes()
    new = flipped(old, 4096)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "step_000001.safetensors").write_bytes(new)

    def rewrite():
        subprocess.run(["curl", "-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", "S3RVER:S3RVER",
                        "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T",
                        str(tmp_path / "new" / "step_000001.safetensors"),
                        f"{s3}/grpo/big/anchors/step_000001.safetensors"], check=True, timeout=60)

    env = s3_env(s3, tmp_path / "cache")
    with Mount("s3://grpo/big", tmp_path / "mnt", ["poll=60", f"block_size={BS}", "cache_size=0"], env=env) as m:
        n, err = read_while_rewritten(m.mnt / "model.safetensors", old, rewrite, after=len(old) // 4)
        assert err == 5 and n < len(old), (n, err)
    out = tmp_path / "out"
    ctl("extract", "s3://grpo/big", out, env=env)
    assert read_all(out / "model.safetensors") == new
