"""What a mount keeps open: the step files and decompressed .zst copies of
the steps it holds in memory, not one of each per anchor it ever built; and
where it puts those copies (cache_dir, made when missing)."""
import os
import stat
import subprocess

import numpy as np
import pytest

import dwsgen as g
from mountutil import DWSFS, SLOW, mounted, read_file, wait_until

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.norm.weight": (32,)}
N_ANCHORS = 40
MAX_STEPS = 4


@pytest.fixture(scope="module")
def dwsfs():
    if not (os.path.isfile(DWSFS) and os.access(DWSFS, os.X_OK)):
        pytest.skip(f"dwsfs not built: no executable {DWSFS} (build it or set DWSFS)")
    return DWSFS


def model_file(path, seed):
    rng = np.random.default_rng(seed)
    t = {n: g.tensor("BF16", g.f32_to_bf16(rng.standard_normal(int(np.prod(s))).astype(np.float32)), s)
         for n, s in SHAPES.items()}
    path.write_bytes(g.safetensors_bytes(t))
    return path


def tensors(blob):
    header, _, start = g.parse_header(blob)
    return {n: blob[start + e["data_offsets"][0]:start + e["data_offsets"][1]] for n, e in header.items()}


def publish_anchor(dwsctl, model, bucket, step, zst):
    cmd = [dwsctl, "publish", "-", str(model), str(bucket), "--step", str(step), "--format", "anchor"]
    subprocess.run(cmd + (["--zstd"] if zst else []), check=True, capture_output=True, timeout=60)


def open_files(pid, bucket):
    """The daemon's fds on files of the bucket, and on unlinked files."""
    in_bucket, unlinked = [], []
    d = f"/proc/{pid}/fd"
    for fd in os.listdir(d):
        try:
            target = os.readlink(os.path.join(d, fd))
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(bucket) + "/"):
            in_bucket.append(target)
        elif target.endswith(" (deleted)"):
            unlinked.append(target)
    return in_bucket, unlinked


def check_bound(pid, bucket, bound):
    def settled():
        b, u = open_files(pid, bucket)
        print(f"open: {len(b)} bucket files, {len(u)} unlinked")
        return len(b) + len(u) <= bound
    try:
        wait_until(settled, 5 * SLOW, "the open step files to settle")
    except TimeoutError:
        b, u = open_files(pid, bucket)
        pytest.fail(f"{len(b)} bucket files and {len(u)} unlinked copies open, at most {bound} expected: {b + u}")


def test_open_files_bounded_by_views(dwsfs, dwsctl, tmp_path):
    """40 anchors, every third .zst, each step read through steps/N, then 3
    more published while mounted: the daemon's fds on bucket files and on
    unlinked decompressed copies stay within the step views it keeps
    (max_steps, root, ready, a compaction snapshot, the builder's last build)
    plus the materialized root file, not one per anchor."""
    bucket = tmp_path / "bucket"
    models = [model_file(tmp_path / f"m{i}.safetensors", i) for i in range(3)]
    for s in range(1, N_ANCHORS + 1):
        publish_anchor(dwsctl, models[s % 3], bucket, s, zst=s % 3 == 0)
    cache = tmp_path / "cache"
    cache.mkdir()
    # max_steps views, root, ready, a compaction snapshot, the builder's last
    # build, the materialized root file, and what the builder's cache held
    # last when a view went (dropped at the next build): 12, against 43 anchors
    bound = 2 * MAX_STEPS + 4
    with mounted(bucket, tmp_path / "mnt", f"max_steps={MAX_STEPS}", f"cache_dir={cache}", "poll=1",
                 "swap_idle=0.2") as m:
        assert m.status()["step"] == N_ANCHORS
        for s in range(1, N_ANCHORS + 1):
            assert read_file(m.path("steps", "%06d" % s, "model.safetensors"))[:8], s
        check_bound(m.proc.pid, bucket, bound)
        # anchors published while mounted, each built by the sync thread
        for s in range(N_ANCHORS + 1, N_ANCHORS + 4):
            publish_anchor(dwsctl, models[s % 3], bucket, s, zst=s % 3 == 0)
            m.wait_step(s, 10 * SLOW)
        check_bound(m.proc.pid, bucket, bound)
        # and what they serve is still right
        for s in (1, N_ANCHORS - 1, N_ANCHORS, N_ANCHORS + 3):
            assert tensors(read_file(m.path("steps", "%06d" % s, "model.safetensors"))) == \
                tensors(models[s % 3].read_bytes()), s


def test_cache_dir_made_for_zst(dwsfs, dwsctl, tmp_path):
    """A local bucket whose anchor is .zst, mounted with a cache_dir that does
    not exist yet: the decompressed copy's folder is made (0700) and the step
    is served."""
    bucket = tmp_path / "bucket"
    model = model_file(tmp_path / "m.safetensors", 7)
    publish_anchor(dwsctl, model, bucket, 1, zst=True)
    cache = tmp_path / "no" / "cache"
    with mounted(bucket, tmp_path / "mnt", f"cache_dir={cache}") as m:
        assert m.status()["step"] == 1
        assert tensors(read_file(m.path("model.safetensors"))) == tensors(model.read_bytes())
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
