"""dwsctl extract refuses each malformed file with one clear error line; a
mount refuses a step made of one (one line in its log) and keeps serving the
last good one; zstd bombs fail fast under memory and file-size limits."""
import json
import os
import shutil
import subprocess
import time

import pytest

import dwsref
from gen_malformed import ANCHOR, ANCHOR_BLOB, CASES
from mountutil import DWSFS, SLOW, _is_asan, mounted, read_file, wait_until

# the cases of a bucket that must not make dwsfs spend memory or disk on what
# the file cannot legitimately hold (trailing bytes, zstd bombs)
BOUNDED = [c for c in CASES if "trailing" in c or c.startswith("zstd_")]
BOMBS = ["zstd_bomb_delta", "zstd_bomb_delta_sized", "zstd_delta_too_large", "zstd_bomb_anchor"]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed(extract, malformed, tmp_path, case):
    with open(malformed / case / "expect.json") as f:
        expect = json.load(f)
    out = tmp_path / "out"
    proc = extract(malformed / case / "bucket", out, expect["step"])
    problem = dwsref.failure_problem(proc)
    assert problem is None, problem
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    assert expect["file"] in lines[0], f"error line does not name {expect['file']}: {lines[0]}"
    assert expect["reason"] in lines[0].lower(), f"error line lacks {expect['reason']!r}: {lines[0]}"
    assert not out.exists(), "a failed extract must not leave OUTDIR behind"


@pytest.mark.parametrize("case", BOUNDED)
def test_malformed_mount_keeps_root(malformed, tmp_path, case):
    """The bad file arrives while mounted (as step 2; a bad anchor as
    anchors/step_000002): the step is refused with one log line naming the
    file and the reason, and the root keeps serving step 1."""
    if not (os.path.isfile(DWSFS) and os.access(DWSFS, os.X_OK)):
        pytest.skip(f"dwsfs not built: no executable {DWSFS}")
    with open(malformed / case / "expect.json") as f:
        expect = json.load(f)
    bucket = tmp_path / "bucket"
    (bucket / "anchors").mkdir(parents=True)
    (bucket / ANCHOR).write_bytes(ANCHOR_BLOB)
    rel = expect["file"].replace("step_000001", "step_000002")
    with mounted(bucket, tmp_path / "mnt", "poll=1", "swap_idle=0.2",
                 allowed_errors=[r"step 2 refused: "]) as m:
        assert m.status()["step"] == 1
        dst = bucket / rel
        dst.parent.mkdir(exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp"
        shutil.copyfile(malformed / case / "bucket" / expect["file"], tmp)
        os.rename(tmp, dst)
        t0 = time.monotonic()
        wait_until(lambda: "step 2 refused" in m.log(), 10 * SLOW, f"step 2 to be refused (log:\n{m.log()})")
        took = time.monotonic() - t0
        lines = [ln for ln in m.log().splitlines() if "step 2 refused" in ln]
        assert len(lines) == 1 and rel in lines[0] and expect["reason"] in lines[0].lower(), lines
        st = m.status()
        assert st["step"] == 1 and st["last_error"], st
        assert read_file(m.path("model.safetensors")) == ANCHOR_BLOB
    assert took < 5 * SLOW, f"refusing {case} took {took:.1f} s"


def _limited(cmd, limit_memory):
    """cmd under a 64 MiB file-size limit (the decompressed copies in $TMPDIR
    included) and, unless sanitized (ASan reserves terabytes of address
    space), a 1.5 GB address-space limit."""
    pre = ["prlimit", "--fsize=67108864"] + (["--as=1500000000"] if limit_memory else [])
    return pre + [str(c) for c in cmd]


@pytest.mark.parametrize("cmd", ["verify", "extract"])
@pytest.mark.parametrize("case", BOMBS)
def test_bomb_fails_fast_under_limits(dwsctl, malformed, tmp_path, case, cmd):
    """dwsctl verify/extract of a bucket holding a zstd bomb: one error line
    naming the file, no signal, within seconds, under the limits."""
    with open(malformed / case / "expect.json") as f:
        expect = json.load(f)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    args = [dwsctl, cmd, malformed / case / "bucket"] + ([tmp_path / "out"] if cmd == "extract" else [])
    env = dict(os.environ, TMPDIR=str(tmpdir))
    t0 = time.monotonic()
    proc = subprocess.run(_limited(args + ["--step", str(expect["step"])], not _is_asan(dwsctl)),
                          capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - t0
    problem = dwsref.failure_problem(proc)
    assert problem is None, problem
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    assert expect["file"] in lines[0] and expect["reason"] in lines[0].lower(), lines[0]
    assert took < 5 * SLOW, f"{cmd} took {took:.1f} s"
    assert not os.listdir(tmpdir)
