"""Patch memory under a cap (-o patch_mem, docs/architecture.md#patch-memory):
a long chain mounted with a tiny cap serves the oracle's bytes for the root
and a step in the middle, its patch arrays spill to unlinked files (status
patch_bytes_disk) while those in memory stay under the cap, and the daemon's
anonymous memory stays well under a default mount's; a spill that fails
keeps the bytes right, in memory, with one warning line."""
import os
import subprocess
from pathlib import Path

import pytest

import dwsref
from mountutil import ASAN, mounted, read_file, wait_until, SLOW
from test_mount import dwsfs, first_diff  # noqa: F401 (a fixture)

CAP = 1 << 20
# arrays under 16 KiB stay in memory whatever the cap: a few per tensor
SMALL_SLACK = 2 << 20


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 10M-parameter BF16 model, 24 deltas at 3% (dense past a third),
    with the oracle's root and middle step."""
    tmp = tmp_path_factory.mktemp("chain")
    bucket = tmp / "bucket"
    subprocess.run(["/usr/bin/python3", str(Path(__file__).parent / "bench" / "make_model.py"), str(bucket),
                    "--params", "1e7", "--deltas", "24", "--changed", "0.03"],
                   check=True, capture_output=True, timeout=300)
    steps = sorted(int(p.name.split("_")[1].split(".")[0]) for p in (bucket / "deltas").iterdir())
    mid = steps[len(steps) // 2]
    want, want_mid = tmp / "want", tmp / "want_mid"
    dwsref.extract(str(bucket), str(want))
    dwsref.extract(str(bucket), str(want_mid), step=mid)
    return bucket, mid, (want / "model.safetensors").read_bytes(), (want_mid / "model.safetensors").read_bytes()


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    return out


def merged_status(m):
    wait_until(lambda: not m.status()["merging"], 60 * SLOW, "the merge to end")
    return m.status()


def test_spills_past_the_cap(dwsfs, chain, tmp_path):
    bucket, mid, want, want_mid = chain
    spill = tmp_path / "spill"
    spill.mkdir()
    with mounted(bucket, tmp_path / "mnt", "poll=60", "materialize_max=0") as m:
        base = merged_status(m)
        rss_default = proc_status(m.proc.pid)["RssAnon"]
        assert base["patch_bytes_disk"] == 0 and base["patch_bytes_memory"] > 0.8 * base["patch_bytes"], base
        assert base["patch_mem_cap"] >= 256 << 20, base
    with mounted(bucket, tmp_path / "mnt", "poll=60", "materialize_max=0", f"patch_mem={CAP}",
                 f"cache_dir={spill}") as m:
        st = merged_status(m)
        assert st["patch_mem_cap"] == CAP, st
        assert st["patch_bytes_disk"] > 0.8 * st["patch_bytes"], st
        assert st["patch_bytes_memory"] <= CAP + SMALL_SLACK, st
        assert st["patch_spill_failures"] == 0, st
        got = read_file(m.path("model.safetensors"))
        assert first_diff(got, want) is None, first_diff(got, want)
        got_mid = read_file(m.path("steps", "%06d" % mid, "model.safetensors"))
        assert first_diff(got_mid, want_mid) is None, first_diff(got_mid, want_mid)
        # the files are unlinked: nothing is left in the folder
        assert list(spill.iterdir()) == []
        if not ASAN:  # the sanitizer's own memory dwarfs the patches
            ps = proc_status(m.proc.pid)
            assert ps["RssAnon"] < rss_default - 0.5 * base["patch_bytes"], (ps, rss_default, base)
            # spilled pages read leave the process every 16 MiB read
            assert ps["VmRSS"] - ps["RssAnon"] < 64 << 20, ps
    m_log = m.log()
    assert "cannot spill" not in m_log, m_log


def test_spill_failure_stays_in_memory(dwsfs, chain, tmp_path):
    """A spill folder that does not exist: every spill fails, the arrays
    stay in memory, the bytes are right, one warning line says so."""
    bucket, mid, want, want_mid = chain
    with mounted(bucket, tmp_path / "mnt", "poll=60", "materialize_max=0", f"patch_mem={CAP}",
                 env={"TMPDIR": str(tmp_path / "missing")}) as m:
        st = merged_status(m)
        assert st["patch_bytes_disk"] == 0 and st["patch_spill_failures"] > 0, st
        assert st["patch_bytes_memory"] > 0.8 * st["patch_bytes"], st
        got = read_file(m.path("model.safetensors"))
        assert first_diff(got, want) is None, first_diff(got, want)
    lines = [ln for ln in m.log().splitlines() if "cannot spill" in ln]
    assert len(lines) == 1 and " warn " in lines[0] and "missing" in lines[0], m.log()
