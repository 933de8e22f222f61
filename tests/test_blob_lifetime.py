"""Where a mount puts the decompressed copies of .zst step files (cache_dir,
made when missing)."""
import os
import stat
import subprocess

import numpy as np
import pytest

import dwsgen as g
from mountutil import DWSFS, mounted, read_file

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.norm.weight": (32,)}


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
