"""dwsctl publish -> extract round trips, and dwsctl verify catching what the
producer's metadata is there to catch: a corrupted payload, a missing step,
and drift of the reconstructed state."""
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import dwsref
from test_http import s3, s3_env  # noqa: F401

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


# ---------------------------------------------------------------- refusals

def rewrite_header(src, dst, change):
    """dst: src with its header passed through change(header dict)."""
    blob = Path(src).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def first_2d(header):
    return next(k for k, v in sorted(header.items()) if k != "__metadata__" and len(v["shape"]) == 2)


@pytest.mark.parametrize("what", ["shape", "dtype", "name"])
def test_publish_refuses_a_changed_tensor(dwsctl, scenarios, tmp_path, what):
    """A delta cannot say a tensor was reshaped, retyped or renamed: the
    reshaped one became a delta of 0 elements (served in the old shape)."""
    root, info = scenarios["gaps"]
    s0, s1 = info["steps"][:2]
    bucket = tmp_path / "bucket"
    prev = root / "expected" / str(s0) / "model.safetensors"
    run(dwsctl, "publish", "-", prev, bucket, "--step", s0, "--format", "anchor")

    def change(h):
        name = first_2d(h)
        if what == "shape":
            h[name]["shape"] = list(reversed(h[name]["shape"])) if h[name]["shape"][0] != h[name]["shape"][1] \
                else [h[name]["shape"][0] * h[name]["shape"][1]]
        elif what == "dtype":
            h[name]["dtype"] = "F16" if h[name]["dtype"] == "BF16" else "BF16"
        else:
            h[name + ".renamed"] = h.pop(name)

    nxt = tmp_path / "next" / "model.safetensors"
    rewrite_header(root / "expected" / str(s1) / "model.safetensors", nxt, change)
    p = run(dwsctl, "publish", prev, nxt, bucket, "--step", s1, check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert {"shape": "shape", "dtype": "dtype", "name": "missing"}[what] in p.stderr, p.stderr
    assert "--format anchor" in p.stderr, p.stderr
    assert not (bucket / "deltas" / f"step_{s1:06d}.safetensors").exists()


def test_publish_refuses_an_existing_step_unless_forced(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    s0, s1, s2 = info["steps"][:3]
    exp = root / "expected"
    bucket = tmp_path / "bucket"
    publish_chain(dwsctl, exp, [s0, s1], bucket, "gap_delta")
    f = bucket / "deltas" / f"step_{s1:06d}.safetensors"
    before = f.read_bytes()
    # step s1 again, from other checkpoints: refused, the file untouched
    p = run(dwsctl, "publish", exp / str(s0), exp / str(s2), bucket, "--step", s1, check=False)
    assert p.returncode == 1 and "already" in p.stderr and "--force" in p.stderr, p.stderr
    assert f.read_bytes() == before
    # as an anchor (another file of the same step): refused too
    p = run(dwsctl, "publish", "-", exp / str(s2), bucket, "--step", s1, "--format", "anchor", check=False)
    assert p.returncode == 1 and "already" in p.stderr, p.stderr
    # forced: replaced, and the step's other file gone (the catalog would pick an anchor)
    run(dwsctl, "publish", "-", exp / str(s2), bucket, "--step", s1, "--format", "anchor", "--force")
    assert not f.exists() and (bucket / "anchors" / f"step_{s1:06d}.safetensors").exists()
    out = tmp_path / "out"
    run(dwsctl, "extract", bucket, out, "--step", s1)
    assert tensors(out / "model.safetensors") == tensors(exp / str(s2) / "model.safetensors")


@pytest.mark.parametrize("as_folder", [False, True])
def test_publish_garbage_is_not_a_safetensors_file(dwsctl, tmp_path, as_folder):
    junk = tmp_path / "ckpt" / "model.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(os.urandom(4096))
    p = run(dwsctl, "publish", "-", junk.parent if as_folder else junk, tmp_path / "bucket", "--step", 1,
            "--format", "anchor", check=False)
    assert p.returncode == 1 and "not a safetensors file" in p.stderr and "cap" not in p.stderr, p.stderr
    assert str(junk) in p.stderr or "model.safetensors" in p.stderr, p.stderr


# ---------------------------------------------------------------- remote targets

def test_publish_to_hf_is_refused_saying_why(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    s0 = info["steps"][0]
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")
    p = subprocess.run([dwsctl, "publish", "-", str(root / "expected" / str(s0)), "hf://buckets/acme/run",
                        "--step", str(s0), "--format", "anchor"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Xet" in p.stderr and "hf buckets sync" in p.stderr, p.stderr


def test_publish_to_s3(dwsctl, scenarios, tmp_path, s3):
    """Steps published straight into s3:// (one PutObject each) extract and
    verify from there; an existing step is refused there too, and --force
    replaces it."""
    root, info = scenarios["gaps"]
    steps = info["steps"][:4]
    exp = root / "expected"
    env = s3_env(s3, tmp_path / "cache")
    uri = "s3://grpo/pub/run"

    def ctl(*args, check=True):
        p = subprocess.run([dwsctl, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
        if check and p.returncode:
            raise AssertionError(f"dwsctl {args}: {p.returncode}\n{p.stderr}")
        return p

    ctl("publish", "-", exp / str(steps[0]), uri, "--step", steps[0], "--format", "anchor")
    for a, b in zip(steps, steps[1:]):
        p = ctl("publish", exp / str(a), exp / str(b), uri, "--step", b, "--zstd")
        assert p.stdout.startswith(f"{uri}/deltas/step_{b:06d}.safetensors.zst:"), p.stdout
    for s in steps:
        out = tmp_path / f"out{s}"
        ctl("extract", uri, out, "--step", s)
        assert tensors(out / "model.safetensors") == tensors(exp / str(s) / "model.safetensors"), s
    assert "state checksum matches" in ctl("verify", uri).stdout
    p = ctl("publish", exp / str(steps[1]), exp / str(steps[2]), uri, "--step", steps[2], check=False)
    assert p.returncode == 1 and "already" in p.stderr, p.stderr
    ctl("publish", exp / str(steps[1]), exp / str(steps[2]), uri, "--step", steps[2], "--force")
    ls = ctl("ls", uri).stdout
    assert ls.count("\n") == len(steps) + 1 and "+zst" in ls, ls
    assert "state checksum matches" in ctl("verify", uri, "--step", steps[2]).stdout


# ---------------------------------------------------------------- progress

def on_a_terminal(cmd):
    """Run cmd with stderr on a pseudo-terminal: (exit status, what it wrote there)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=300), out.decode(errors="replace")


def test_progress_with_rate_and_eta_on_a_terminal_only(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    s0, s1 = info["steps"][:2]
    exp = root / "expected"
    bucket = tmp_path / "bucket"
    cmds = {
        "publish": [dwsctl, "publish", "-", exp / str(s0), bucket, "--step", s0, "--format", "anchor"],
        "publish delta": [dwsctl, "publish", exp / str(s0), exp / str(s1), bucket, "--step", s1],
        "extract": [dwsctl, "extract", bucket, tmp_path / "out"],
        "verify": [dwsctl, "verify", bucket],
    }
    for name, cmd in cmds.items():
        rc, text = on_a_terminal(cmd)
        assert rc == 0, (name, text)
        assert "/s" in text and "ETA" in text, (name, text)
    # not a terminal: no progress
    shutil.rmtree(tmp_path / "out")
    p = run(dwsctl, "extract", bucket, tmp_path / "out")
    assert "ETA" not in p.stderr and "\r" not in p.stderr, p.stderr
    p = run(dwsctl, "verify", bucket)
    assert p.stderr == "", p.stderr
