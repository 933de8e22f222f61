"""dwsctl publish -> extract round trips, and dwsctl verify catching what the
producer's metadata is there to catch: a corrupted payload, a missing step,
and drift of the reconstructed state."""
import json
import os
import shutil
import struct
import subprocess

import pytest

import dwsref

FORMATS = ["gap_delta", "raw", "v1"]


def run(*cmd, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stderr}")
    return p


def tensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file, layout ignored."""
    with open(path, "rb") as f:
        blob = f.read()
    header, _, start = dwsref.parse(blob, path)
    return {n: (e["dtype"], e["shape"], blob[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
            for n, e in header.items()}


def metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def publish_chain(dwsctl, expected, steps, bucket, fmt, zstd=False, anchor_every=None):
    prev = None
    for i, s in enumerate(steps):
        ckpt = expected / str(s)
        extra = ["--zstd"] if zstd and i % 2 else []
        if prev is None or (anchor_every and i % anchor_every == 0):
            run(dwsctl, "publish", "-", ckpt, bucket, "--step", s, "--format", "anchor", *extra)
        else:
            run(dwsctl, "publish", prev, ckpt, bucket, "--step", s, "--format", fmt, *extra)
        prev = ckpt


@pytest.mark.parametrize("fmt", FORMATS)
def test_publish_roundtrip_no_base(dwsctl, scenarios, tmp_path, fmt):
    """Published from the BF16 oracle checkpoints, every step extracts to the
    same tensor values, and verify accepts every step."""
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    steps = info["steps"]
    publish_chain(dwsctl, root / "expected", steps, bucket, fmt, zstd=(fmt == "gap_delta"), anchor_every=5)
    ls = run(dwsctl, "ls", bucket).stdout
    assert ls.count("\n") == len(steps) + 1, ls
    for s in steps:
        out = tmp_path / f"out{s}"
        run(dwsctl, "extract", bucket, out, "--step", s)
        got = tensors(out / "model.safetensors")
        want = tensors(root / "expected" / str(s) / "model.safetensors")
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == want[name], f"step {s}: tensor {name} differs"
        v = run(dwsctl, "verify", bucket, "--step", s)
        assert "state checksum matches" in v.stdout, v.stdout


def test_publish_delta_metadata(dwsctl, scenarios, tmp_path):
    """TRL's metadata plus ours: counts agree with the file, parent and run id
    chain up, gap_delta uses U16 gaps where they fit."""
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    s0, s1, s2 = info["steps"][:3]
    publish_chain(dwsctl, root / "expected", [s0, s1, s2], bucket, "gap_delta")
    a = metadata(bucket / "anchors" / f"step_{s0:06d}.safetensors")
    d1 = metadata(bucket / "deltas" / f"step_{s1:06d}.safetensors")
    d2 = metadata(bucket / "deltas" / f"step_{s2:06d}.safetensors")
    assert a["sparse"] == "False" and d1["sparse"] == "True" and d1["encoding"] == "gap_delta"
    assert d1["format"] == "sparse_weight_patch" and d1["model_version"] == str(s1)
    assert a["dwsfs.run_id"] == d1["dwsfs.run_id"] == d2["dwsfs.run_id"]
    assert d1["dwsfs.parent_step"] == str(s0) and d2["dwsfs.parent_step"] == str(s1)
    t = tensors(bucket / "deltas" / f"step_{s1:06d}.safetensors")
    vals = [n for n in t if n.endswith(".val")]
    assert len(vals) == int(d1["num_changed_params"])
    assert sum(t[n][1][0] for n in vals) == int(d1["total_changed_elements"]) > 0
    assert {t[n][0] for n in t if n.endswith(".idx")} <= {"U16", "U32"}


def test_publish_with_base_layout(dwsctl, scenarios, tmp_path):
    """A published chain over a BF16 sharded base extracts to the oracle's
    exact bytes (base layout, headers, non-weight files)."""
    root, info = scenarios["v1"]
    bucket = tmp_path / "bucket"
    shutil.copytree(info["bucket"] + "/base", bucket / "base")
    steps = info["steps"][:6]
    publish_chain(dwsctl, root / "expected", steps, bucket, "gap_delta")
    for s in steps:
        out = tmp_path / f"out{s}"
        run(dwsctl, "extract", bucket, out, "--step", s)
        problem = dwsref.diff_folders(out, root / "expected" / str(s))
        assert problem is None, f"step {s}: {problem}"
        assert "matches" in run(dwsctl, "verify", bucket, "--step", s).stdout


def test_verify_catches_corruption_and_missing_step(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    steps = info["steps"][:5]
    publish_chain(dwsctl, root / "expected", steps, bucket, "gap_delta")
    last = steps[-1]

    # a flipped bit in the last delta's values: the payload checksum catches it
    d = bucket / "deltas" / f"step_{last:06d}.safetensors"
    blob = bytearray(d.read_bytes())
    blob[-1] ^= 0x01
    d.write_bytes(bytes(blob))
    p = run(dwsctl, "verify", bucket, "--step", last, check=False)
    assert p.returncode != 0 and "checksum mismatch" in p.stderr and d.name in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    blob[-1] ^= 0x01
    d.write_bytes(bytes(blob))
    run(dwsctl, "verify", bucket, "--step", last)

    # a missing middle step: the next file's parent pointer catches it
    gone = bucket / "deltas" / f"step_{steps[2]:06d}.safetensors"
    os.unlink(gone)
    p = run(dwsctl, "verify", bucket, "--step", last, check=False)
    assert p.returncode != 0 and "missing" in p.stderr, p.stderr


def test_verify_catches_state_drift(dwsctl, scenarios, tmp_path):
    """A delta whose payload is intact but whose reconstruction disagrees with
    the producer's state checksum (a v3 trainer that missed an element) is
    reported as drift, not served as verified."""
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    s0, s1 = info["steps"][:2]
    publish_chain(dwsctl, root / "expected", [s0, s1], bucket, "gap_delta")
    run(dwsctl, "verify", bucket, "--step", s1)
    f = bucket / "deltas" / f"step_{s1:06d}.safetensors"
    have = metadata(f)["dwsfs.state_xxh3"]
    wrong = "%016x" % (int(have, 16) ^ 1)
    f.write_bytes(f.read_bytes().replace(have.encode(), wrong.encode()))
    p = run(dwsctl, "verify", bucket, "--step", s1, check=False)
    assert p.returncode != 0 and "state checksum" in p.stderr, p.stderr
