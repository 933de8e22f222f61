"""SkyRL and miles folders (shared/spec/xor-delta-formats.md) through dwsctl:
every version of every variant against tests/xorgen.py's oracle, catch-up
patches, and the refusals: bad versions, incomplete ones, hostile input."""
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zstandard

import dwsgen as g
import dwsref
import xorgen
from test_patches import check as check_patch


@pytest.fixture(scope="session")
def xscen(tmp_path_factory):
    """{scenario: (folder, info)} for every xorgen scenario."""
    root = tmp_path_factory.mktemp("xor")
    out = {}
    for name in xorgen.SCENARIOS:
        out[name] = (root / name, xorgen.generate(str(root / name), name))
    return out


def copy(xscen, name, dst):
    sdir, info = xscen[name]
    shutil.copytree(sdir / "bucket", dst / "bucket", copy_function=shutil.copy2)
    return dst / "bucket", sdir


def run(dwsctl, *args):
    return subprocess.run([dwsctl, *map(str, args)], capture_output=True, text=True, timeout=300)


def extract(dwsctl, bucket, sdir, out, step=None, *extra):
    args = ["extract", bucket, out, "--base", sdir / "base", *extra]
    if step is not None:
        args += ["--step", step]
    return run(dwsctl, *args)


def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    return lines[0]


# ---------------------------------------------------------------- every version

CASES = [(n, v) for n in ("skyrl", "skyrl_sha256", "miles") for v in range(1, xorgen.SCENARIOS[n].versions + 1)]


@pytest.mark.parametrize("name,version", [pytest.param(n, v, id=f"{n}-{v}") for n, v in CASES])
def test_extract_every_version(dwsctl, xscen, tmp_path, name, version):
    """sha256 and legacy records, empty versions, split payload files,
    overwrite, adler32, a full version mid-run: byte for byte."""
    sdir, info = xscen[name]
    p = extract(dwsctl, info["bucket"], sdir, tmp_path / "out", version)
    assert p.returncode == 0, p.stderr
    assert dwsref.diff_folders(tmp_path / "out", sdir / "expected" / str(version)) is None


@pytest.mark.parametrize("name", ["skyrl", "miles"])
def test_detected_and_forced_format(dwsctl, xscen, tmp_path, name):
    sdir, info = xscen[name]
    p = run(dwsctl, "ls", info["bucket"])
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln and ln[0].isdigit()]
    assert [int(r[0]) for r in rows] == info["versions"]
    assert p.stdout.startswith(f"# {name} versions")
    p = extract(dwsctl, info["bucket"], sdir, tmp_path / "out", None, "--format", name)
    assert p.returncode == 0, p.stderr
    assert dwsref.diff_folders(tmp_path / "out", sdir / "expected" / str(info["latest"])) is None
    other = "miles" if name == "skyrl" else "skyrl"
    p = run(dwsctl, "extract", info["bucket"], tmp_path / "o2", "--base", sdir / "base", "--format", other)
    assert "no complete" in one_error_line(p)
    assert "--format is trl, skyrl or miles" in run(dwsctl, "ls", info["bucket"], "--format", "xyz").stderr


def test_verify_reports_tensor_checksums(dwsctl, xscen):
    sdir, info = xscen["skyrl"]
    p = run(dwsctl, "verify", info["bucket"], "--base", sdir / "base")
    assert p.returncode == 0 and "every tensor's checksum matches" in p.stdout, p.stdout + p.stderr


def test_blake3_refused_unless_verify_is_off(dwsctl, xscen, tmp_path):
    sdir, info = xscen["miles_blake3"]
    line = one_error_line(extract(dwsctl, info["bucket"], sdir, tmp_path / "out"))
    assert "blake3" in line and "verify=none" in line and "version 1" in line, line
    assert not (tmp_path / "out").exists()
    p = extract(dwsctl, info["bucket"], sdir, tmp_path / "out", None, "--verify", "none")
    assert p.returncode == 0, p.stderr
    assert dwsref.diff_folders(tmp_path / "out", sdir / "expected" / "2") is None


@pytest.mark.parametrize("name,pairs", [("skyrl", [(1, 2), (2, 6), (3, 4)]), ("miles", [(1, 3), (3, 5), (5, 7)])])
def test_catch_up_patches(dwsctl, xscen, tmp_path, name, pairs):
    """No chain of sparse TRL deltas here: the patch compares tensors, and
    applied to the oracle's version FROM it gives version TO."""
    sdir, info = xscen[name]
    for frm, to in pairs:
        out = tmp_path / f"p{frm}-{to}.safetensors"
        p = run(dwsctl, "patch", info["bucket"], out, "--from", frm, "--to", to, "--base", sdir / "base")
        assert p.returncode == 0, p.stderr
        check_patch(out, sdir / "expected", frm, to)


# ---------------------------------------------------------------- bad and incomplete versions

def manifest(bucket, v):
    return Path(bucket) / ("delta-%08d" % v) / "manifest.json"


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    st = path.stat()
    path.write_text(json.dumps(d))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def test_bad_checksum_stops_the_chain_until_corrected(dwsctl, xscen, tmp_path):
    """Version 4's checksum is wrong: 1-3 still extract, 4 and every later
    one fail naming version 4, the tensor and the reason; fixed, all do."""
    bucket, sdir = copy(xscen, "skyrl", tmp_path)
    path = manifest(bucket, 4)
    good = path.read_text()
    name = [None]

    def bad(d):
        r = d["tensors"][0]
        name[0] = r["name"]
        r["checksum"] = "0" * 32
    edit_json(path, bad)
    for v in (1, 2, 3):
        assert extract(dwsctl, bucket, sdir, tmp_path / f"o{v}", v).returncode == 0
    for v in (4, 6):
        line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / f"o{v}", v))
        assert "version 4" in line and name[0] in line and "checksum mismatch" in line, line
        assert not (tmp_path / f"o{v}").exists()
    path.write_text(good)
    p = extract(dwsctl, bucket, sdir, tmp_path / "fixed", 6)
    assert p.returncode == 0, p.stderr
    assert dwsref.diff_folders(tmp_path / "fixed", sdir / "expected" / "6") is None


def test_version_counts_once_complete(dwsctl, xscen, tmp_path):
    """No manifest, a payload missing or short: not a version yet, and
    neither is any after it."""
    bucket, sdir = copy(xscen, "skyrl", tmp_path)
    versions = lambda: [int(ln.split()[0]) for ln in run(dwsctl, "ls", bucket).stdout.splitlines()
                        if ln[:1].isdigit()]
    pay = sorted((bucket / "delta-00000005").glob("*.safetensors"))[0]
    blob = pay.read_bytes()
    pay.write_bytes(blob[:len(blob) - 3])        # still being written
    assert versions() == [1, 2, 3, 4]
    pay.unlink()                                 # not there yet
    assert versions() == [1, 2, 3, 4]
    pay.write_bytes(blob)
    assert versions() == [1, 2, 3, 4, 5, 6]
    manifest(bucket, 2).unlink()                 # cut off: nothing after it
    assert versions() == [1]


def test_miles_full_version_restarts_the_chain(dwsctl, xscen, tmp_path):
    """A bad delta breaks the versions after it up to the full one; from
    the full version on they are served again."""
    bucket, sdir = copy(xscen, "miles", tmp_path)
    idx = bucket / "weight_v000002" / "model.safetensors.index.json"
    edit_json(idx, lambda d: d["metadata"].__setitem__("base_version", "000000"))
    for v in (2, 3):
        line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / f"o{v}", v))
        assert "version 2" in line and "base_version" in line, line
    for v in (4, 7):
        p = extract(dwsctl, bucket, sdir, tmp_path / f"o{v}", v)
        assert p.returncode == 0, p.stderr
        assert dwsref.diff_folders(tmp_path / f"o{v}", sdir / "expected" / str(v)) is None


# ---------------------------------------------------------------- hostile input

def frame(data):
    return zstandard.ZstdCompressor(level=1).compress(data)


def rewrite_payload(bucket, v, fn):
    """fn(entries: {name: bytes}) -> entries, in every payload file of version v."""
    for pay in (bucket / ("delta-%08d" % v)).glob("*.safetensors"):
        blob = pay.read_bytes()
        h, _, start = g.parse_header(blob)
        ents = {k: blob[start + e["data_offsets"][0]:start + e["data_offsets"][1]] for k, e in h.items()}
        ents = fn(ents)
        pay.write_bytes(g.safetensors_bytes({k: ("U8", [len(b)], b) for k, b in ents.items()}))
    m = manifest(bucket, v)
    d = json.loads(m.read_text())
    sizes = {}
    for pay in (bucket / ("delta-%08d" % v)).glob("*.safetensors"):
        h, _, _ = g.parse_header(pay.read_bytes())
        sizes.update({k: e["shape"][0] for k, e in h.items()})
    for r in d["tensors"]:
        r["compressed_num_bytes"] = sizes[r["name"]]
    d["total_compressed_num_bytes"] = sum(r["compressed_num_bytes"] for r in d["tensors"])
    m.write_text(json.dumps(d))


def _longer(ents):
    k = next(iter(ents))
    raw = zstandard.ZstdDecompressor().decompress(ents[k])
    ents[k] = frame(raw + b"\0" * 4096)
    return ents


def _shorter(ents):
    k = next(iter(ents))
    raw = zstandard.ZstdDecompressor().decompress(ents[k])
    ents[k] = frame(raw[:-2])
    return ents


def _garbage(ents):
    k = next(iter(ents))
    ents[k] = b"\x28\xb5\x2f\xfd" + b"\xff" * 40
    return ents


def _trailing(ents):
    k = next(iter(ents))
    ents[k] = ents[k] + frame(b"x")
    return ents


def _no_size(ents):
    """A frame without its content size, longer than the tensor: bounded all the same."""
    k = next(iter(ents))
    raw = zstandard.ZstdDecompressor().decompress(ents[k])
    ents[k] = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw * 64)
    return ents


PAYLOAD_CASES = {"longer": (_longer, "holds"), "shorter": (_shorter, "holds"), "garbage": (_garbage, "zstd"),
                 "trailing": (_trailing, "after the payload"), "no_size": (_no_size, "decompresses past")}


@pytest.mark.parametrize("case", list(PAYLOAD_CASES))
def test_hostile_payloads(dwsctl, xscen, tmp_path, case):
    bucket, sdir = copy(xscen, "skyrl", tmp_path)
    fn, want = PAYLOAD_CASES[case]
    rewrite_payload(bucket, 2, fn)
    line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / "o", 2))
    assert "version 2" in line and want in line, line
    assert extract(dwsctl, bucket, sdir, tmp_path / "o1", 1).returncode == 0


def _rec(key, value):
    return lambda d: d["tensors"][0].__setitem__(key, value)


MANIFEST_CASES = {
    "unknown_name": (_rec("name", "model.nope.weight"), "payload_key"),
    "dtype": (_rec("dtype", "float16"), "is F16, the base model's is BF16"),
    "shape": (lambda d: d["tensors"][0].__setitem__("shape", d["tensors"][0]["shape"][::-1] + [1]), "another shape"),
    "length": (_rec("uncompressed_num_bytes", 7), "uncompressed_num_bytes"),
    "version": (lambda d: d.__setitem__("version", 9), "version 9"),
    "base_version": (lambda d: d.__setitem__("base_version", 0), "base_version"),
    "duplicate": (lambda d: d["tensors"].append(dict(d["tensors"][0])), "listed twice"),
    "hex": (_rec("checksum", "XYZ"), "lowercase hex"),
    "algorithm": (_rec("checksum_algorithm", "md5"), "unknown checksum algorithm"),
    "payload_file": (_rec("payload_file", "../etc/passwd"), "not in payload_files"),
    "path": (lambda d: d["payload_files"].__setitem__(0, "../x.safetensors"), "not a plain file name"),
    "totals": (lambda d: d.__setitem__("total_uncompressed_num_bytes", 1), "totals"),
    "not_json": (None, "not JSON"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_hostile_manifests(dwsctl, xscen, tmp_path, case):
    """One clear line naming the version and the reason; the versions before it stay."""
    bucket, sdir = copy(xscen, "skyrl", tmp_path)
    fn, want = MANIFEST_CASES[case]
    if fn is None:
        manifest(bucket, 2).write_text('{"version": 2, ')
    else:
        edit_json(manifest(bucket, 2), fn)
    line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / "o", 2))
    assert "version 2" in line and want in line, line
    assert extract(dwsctl, bucket, sdir, tmp_path / "o1", 1).returncode == 0


def test_name_not_in_base(dwsctl, xscen, tmp_path):
    bucket, sdir = copy(xscen, "skyrl", tmp_path)
    first = json.loads(manifest(bucket, 2).read_text())["tensors"][0]["name"]
    edit_json(manifest(bucket, 2), lambda d: [d["tensors"][0].__setitem__(k, "model.nope.weight")
                                             for k in ("name", "payload_key")])
    rewrite_payload(bucket, 2, lambda e: {("model.nope.weight" if k == first else k): b for k, b in e.items()})
    line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / "o", 2))
    assert "version 2" in line and "'model.nope.weight' is not in the base model" in line, line


def _overwrite_entries(bucket, fn):
    """Rewrite one overwrite payload of miles version 3 with fn(raw) -> raw."""
    shard = sorted((bucket / "weight_v000003").glob("*.safetensors"))[0]
    blob = shard.read_bytes()
    h, meta, start = g.parse_header(blob)
    k = next(iter(h))
    e = h[k]
    raw = fn(zstandard.ZstdDecompressor().decompress(blob[start + e["data_offsets"][0]:start + e["data_offsets"][1]]))
    ents = {n: ("U8", [x["shape"][0]], blob[start + x["data_offsets"][0]:start + x["data_offsets"][1]]) for n, x in h.items()}
    f = frame(raw)
    ents[k] = ("U8", [len(f)], f)
    shard.write_bytes(g.safetensors_bytes(ents, meta or None))


@pytest.mark.parametrize("case,fn,want", [
    ("offset", lambda raw: raw[:4] + struct.pack("<I", 1 << 30) + raw[8:], "past its"),
    ("count", lambda raw: struct.pack("<I", 0xFFFFFFF0) + raw[4:], "more than its"),
    ("short", lambda raw: raw[:-1], "before the tensor"),
])
def test_hostile_overwrite(dwsctl, xscen, tmp_path, case, fn, want):
    bucket, sdir = copy(xscen, "miles", tmp_path)
    _overwrite_entries(bucket, fn)
    line = one_error_line(extract(dwsctl, bucket, sdir, tmp_path / "o", 3))
    assert "version 3" in line and want in line, line
