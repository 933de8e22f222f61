"""Catch-up patches (docs/patches.md): `dwsctl patch` and the mount's
.dwsfs/patches/FROM-TO.safetensors. Checked by applying each patch, with
the independent applier below (written from the format, not from the C
code), to the oracle's files of step FROM: the result must be the oracle's
files of step TO, byte for byte; and a patch within a chain must be no
bigger than its changed elements need."""
import errno
import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mountutil import DWSCTL, SLOW, mounted, read_file, read_status, wait_until
from test_mount import publish

DTYPES = {"BF16": ("<u2", 2), "F16": ("<u2", 2), "F32": ("<u4", 4), "F64": ("<u8", 8), "I64": ("<i8", 8),
          "I32": ("<i4", 4), "U8": ("u1", 1), "I8": ("i1", 1), "I16": ("<i2", 2), "U16": ("<u2", 2),
          "BOOL": ("u1", 1), "U32": ("<u4", 4), "U64": ("<u8", 8)}


def header(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), 8 + n


def apply_patch(folder, patch_blob):
    """{file name: bytes} of a model folder with the patch applied."""
    ph, pstart = header(patch_blob)
    meta = ph.pop("__metadata__")
    files = {p.name: bytearray(p.read_bytes()) for p in Path(folder).iterdir() if p.is_file()}
    where = {}
    for fname, blob in files.items():
        if fname.endswith(".safetensors"):
            h, start = header(bytes(blob[:1 << 20]))
            for name, t in h.items():
                if name != "__metadata__":
                    where[name] = (fname, start, t)
    names = {k.rsplit(".", 1)[0] for k in ph}
    for name in names:
        fname, start, t = where[name]
        np_dt, size = DTYPES[t["dtype"]]
        b, e = t["data_offsets"]
        view = np.frombuffer(files[fname], dtype=np_dt, count=(e - b) // size, offset=start + b)
        vt = ph[name + ".values"]
        vb, ve = vt["data_offsets"]
        assert vt["dtype"] == t["dtype"], (name, vt, t)
        values = np.frombuffer(patch_blob, dtype=np_dt, count=(ve - vb) // size, offset=pstart + vb)
        out = view.copy()
        if name + ".indices" in ph:
            it = ph[name + ".indices"]
            assert it["dtype"] == "I64" and len(it["shape"]) == 1 and vt["shape"] == it["shape"], (it, vt)
            ib, ie = it["data_offsets"]
            idx = np.frombuffer(patch_blob, dtype="<i8", count=(ie - ib) // 8, offset=pstart + ib)
            assert len(idx) and (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < len(out), name
            out[idx] = values
        else:
            assert vt["shape"] == t["shape"], (name, vt["shape"], t["shape"])
            out[:] = values
        files[fname][start + b:start + e] = out.tobytes()
    return {k: bytes(v) for k, v in files.items()}, meta


def check(patch_path, expected, frm, to):
    blob = Path(patch_path).read_bytes()
    got, meta = apply_patch(expected / str(frm), blob)
    assert meta["format"] == "dwsfs_patch" and int(meta["from_step"]) == frm and int(meta["to_step"]) == to, meta
    want = {p.name: p.read_bytes() for p in (expected / str(to)).iterdir() if p.is_file()}
    assert set(got) == set(want)
    for name in want:
        g, w = got[name], want[name]
        if name.endswith(".safetensors") and g[:header(g)[1]] != w[:header(w)[1]]:
            # no base: the served file is the anchor's own, whose header (its
            # metadata, its tensors' order) changes with the anchor; a patch
            # is by tensor name: each tensor's bytes must match
            assert tensors(g) == tensors(w), f"{name}: patch {frm}->{to}: tensors differ from step {to}"
            continue
        assert g == w, f"{name}: patch {frm}->{to} applied differs from step {to}"
    return blob, meta


def tensors(blob):
    h, start = header(blob)
    return {k: (t["dtype"], t["shape"], blob[start + t["data_offsets"][0]:start + t["data_offsets"][1]])
            for k, t in h.items() if k != "__metadata__"}


def ctl_patch(bucket, out, frm, to, extra=()):
    return subprocess.run([DWSCTL, "patch", str(bucket), str(out), "--from", str(frm), "--to", str(to), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["v1", "v3gap", "gaps", "zstd", "prefix", "single"])
def test_dwsctl_patch_applies_to_the_oracle(dwsctl, scenarios, tmp_path, name):
    """Every consecutive pair of steps, and pairs across anchors."""
    root, info = scenarios[name]
    expected, steps = root / "expected", info["steps"]
    pairs = list(zip(steps, steps[1:])) + [(steps[0], steps[-1]), (steps[1], steps[-2])]
    for frm, to in pairs:
        out = tmp_path / f"p{frm}-{to}.safetensors"
        p = ctl_patch(info["bucket"], out, frm, to, info["extract_args"])
        assert p.returncode == 0, p.stderr
        check(out, expected, frm, to)


def test_patch_within_a_chain_is_its_changed_elements(dwsctl, scenarios, tmp_path):
    """gap_delta, one delta: at most 1.1 x changed elements x (8 + 2)."""
    root, info = scenarios["gaps"]
    expected = root / "expected"
    s = info["steps"]
    frm, to = s[1], s[2]                              # 2 -> 3, one delta
    out = tmp_path / "p.safetensors"
    assert ctl_patch(info["bucket"], out, frm, to).returncode == 0
    blob, meta = check(out, expected, frm, to)
    delta = Path(info["bucket"]) / "deltas" / f"step_{to:06d}.safetensors"
    dh, _ = header(delta.read_bytes())
    changed = int(dh["__metadata__"]["total_changed_elements"])
    assert int(meta["changed_elements"]) <= changed and int(meta["dense_tensors"]) == 0, meta
    assert len(blob) <= 1.1 * changed * 10 + 4096, (len(blob), changed)


def test_bad_patch_requests(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    s = info["steps"]
    for frm, to, code in ((s[2], s[1], 2), (s[1], s[1], 2), (s[1], 999, 1)):
        out = tmp_path / "bad.safetensors"
        p = ctl_patch(info["bucket"], out, frm, to)
        assert p.returncode == code and len(p.stderr.splitlines()) == 1, p.stderr
        assert not out.exists()


def test_mount_serves_patches(dwsctl, scenarios, tmp_path):
    """.dwsfs/patches/ lists the patches from the last root steps to the
    root; any FROM-TO of the bucket opens; bad names fail at once."""
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    with mounted(bucket, tmp_path / "mnt", "poll=1", "swap_idle=0.1") as m:
        for prev, cur in zip(s, s[1:4]):
            publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
            m.wait_step(cur, 10 * SLOW)
        listed = sorted(os.listdir(m.path(".dwsfs", "patches")))
        want = [f"{a:06d}-{s[3]:06d}.safetensors" for a in s[:3]]
        assert listed == want, listed
        for frm in s[:3]:
            p = m.path(".dwsfs", "patches", f"{frm:06d}-{s[3]:06d}.safetensors")
            check(p, expected, frm, s[3])
        check(m.path(".dwsfs", "patches", f"{s[0]:06d}-{s[2]:06d}.safetensors"), expected, s[0], s[2])
        for bad, err in ((f"{s[3]:06d}-{s[1]:06d}.safetensors", errno.EINVAL),
                         (f"{s[1]:06d}-{s[1]:06d}.safetensors", errno.EINVAL),
                         (f"{s[1]:06d}-999999.safetensors", errno.ENOENT),
                         ("1-2.safetensors", errno.ENOENT), ("000001-000002.bin", errno.ENOENT)):
            with pytest.raises(OSError) as e:
                open(m.path(".dwsfs", "patches", bad), "rb").read()
            assert e.value.errno == err, (bad, e.value)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_patch_made_ahead(dwsctl, scenarios, tmp_path, mode):
    """patch_ahead: the patch from the root made before the new step is
    ready (on; auto once a patch was read; never with off), and the same
    bytes as one made when read."""
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    opts = ("poll=1", "swap_idle=0.1") + (() if mode == "auto" else (f"patch_ahead={mode}",))
    with mounted(bucket, tmp_path / "mnt", *opts) as m:
        made = []
        for prev, cur in zip(s, s[1:4]):
            publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
            m.wait_step(cur, 10 * SLOW)
            made.append(bool(re.search(rf" step {cur} ready: .*, patch from the root made in \d+ ms$", m.log(),
                                       flags=re.M)))
            check(m.path(".dwsfs", "patches", f"{prev:06d}-{cur:06d}.safetensors"), expected, prev, cur)
        want = {"on": [True] * 3, "off": [False] * 3, "auto": [False, True, True]}[mode]
        assert made == want, (made, m.log())
