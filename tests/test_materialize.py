"""Materialized copies (docs/passthrough.md): two at most, the next step
brought forward in place by its catch-up patch where no open file and no
mapping holds the copy (the daemon writes about the changed pages, not the
model), written whole otherwise; a mapping kept past its file's close keeps
its bytes; a disk too small says so in the status and the daemon serves.

Needs root and a kernel with FUSE passthrough, as tests/test_passthrough.py."""
import mmap
import os
import subprocess

import numpy as np

import dwsgen as g
from mountutil import SLOW, mounted, read_file, wait_until
from test_mount import LIVE, STEP_DEADLINE, publish, root_no_base
from test_mount import dwsfs  # noqa: F401 (a fixture)
from test_passthrough import dwsfs_pt, wait_materialized  # noqa: F401 (a fixture)

N = 16 << 20         # elements per tensor: 32 MiB of BF16 each, 64 MiB in all


def checkpoint(folder, a, b):
    os.makedirs(folder, exist_ok=True)
    blob = g.safetensors_bytes({"model.a.weight": g.tensor("BF16", a), "model.b.weight": g.tensor("BF16", b)})
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(blob)


def steps(tmp, n, per_step=10, seed=0, spread=False):
    """n checkpoint folders tmp/ck/1..n; each after the first changes
    `per_step` elements of tensor a, in its first 64 KiB (a few pages), or
    anywhere in it (spread)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0x3c00, 0x3f00, N, dtype=np.uint16)
    b = rng.integers(0x3c00, 0x3f00, N, dtype=np.uint16)
    out = []
    for k in range(n):
        if k:
            idx = rng.choice(N if spread else 1 << 15, per_step, replace=False)
            a = a.copy()
            a[idx] ^= 1
        folder = tmp / "ck" / str(k + 1)
        checkpoint(folder, a, b)
        out.append(folder)
    return out


def want(bucket, tmp, step):
    """The root's file at step: the anchor's layout, the step's tensors."""
    return root_no_base(bucket, tmp / "ck", step)


def write_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(next(ln for ln in f if ln.startswith("write_bytes:")).split()[1])


def test_next_copy_brought_forward_in_place(dwsfs_pt, dwsctl, tmp_path):
    cks = steps(tmp_path, 5)
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, cks[0], bucket, 1, "anchor")
    with mounted(bucket, tmp_path / "mnt", *LIVE) as m:
        wait_materialized(m, 1)
        assert read_file(m.path("model.safetensors")) == want(bucket, tmp_path, 1)
        writes = []
        for k in range(1, 5):
            before = write_bytes(m.proc.pid)
            publish(dwsctl, cks[k - 1], cks[k], bucket, k + 1)
            m.wait_step(k + 1, STEP_DEADLINE)
            st = wait_materialized(m, k + 1)
            writes.append(write_bytes(m.proc.pid) - before)
            reads = st["daemon_reads"]
            assert read_file(m.path("model.safetensors")) == want(bucket, tmp_path, k + 1), f"step {k + 1}"
            assert m.status()["daemon_reads"] == reads, "read through the daemon"
        st = m.status()
        # nothing holds a copy between steps: each new step is the first
        # copy brought forward in place
        assert st["materialized_whole"] == 1 and st["materialized_in_place"] == 4, st
        assert "brought forward in place" in m.log()
        # its patch came from the deltas since the copy's step alone: that
        # old step was never built again (it held a second patch set in the
        # step cache: 1.4 GiB more RSS at 50 deltas)
        assert st["cache_misses"] == 0, st
        model = len(want(bucket, tmp_path, 1))
        # the folios holding the 10 elements (up to 2 MiB each where the page
        # cache took the copy in large folios), not the model
        assert max(writes[1:]) < model / 8, (writes, model)


def test_copy_brought_forward_from_the_disk(dwsfs_pt, dwsctl, tmp_path):
    """A step changing 1% of a tensor's elements, spread (every 2 MiB chunk
    of it read, changed and written whole) into a copy whose pages left the
    page cache (read back with O_DIRECT): the bytes are the step's."""
    cks = steps(tmp_path, 3, per_step=N // 100, seed=2, spread=True)
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, cks[0], bucket, 1, "anchor")
    with mounted(bucket, tmp_path / "mnt", *LIVE) as m:
        wait_materialized(m, 1)
        for k in (1, 2):
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
            publish(dwsctl, cks[k - 1], cks[k], bucket, k + 1)
            m.wait_step(k + 1, STEP_DEADLINE)
            wait_materialized(m, k + 1)
            assert read_file(m.path("model.safetensors")) == want(bucket, tmp_path, k + 1), f"step {k + 1}"
        st = m.status()
        assert st["materialized_whole"] == 1 and st["materialized_in_place"] == 2, st


def test_mapped_copy_keeps_its_bytes(dwsfs_pt, dwsctl, tmp_path):
    """A loader that maps the file and closes it: its mapping keeps the step's
    bytes while later steps are materialized; the copy it maps is replaced,
    not changed in place."""
    cks = steps(tmp_path, 5, per_step=2000, seed=1)
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, cks[0], bucket, 1, "anchor")
    first = want(bucket, tmp_path, 1)
    # the mapping is an open root file: the root swaps swap_max_delay after
    with mounted(bucket, tmp_path / "mnt", *LIVE, "swap_max_delay=0.5") as m:
        wait_materialized(m, 1)
        with open(m.path("model.safetensors"), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert m.status()["passthrough_opens"] >= 1
            for k in range(1, 5):
                publish(dwsctl, cks[k - 1], cks[k], bucket, k + 1)
                m.wait_step(k + 1, STEP_DEADLINE + 1)
                wait_materialized(m, k + 1)
                assert read_file(m.path("model.safetensors")) == want(bucket, tmp_path, k + 1), f"step {k + 1}"
                assert mm[:] == first, f"the mapping of step 1 changed at step {k + 1}"
        finally:
            mm.close()
        st = m.status()
        # the mapped copy stays step 1's; the other one takes each new step,
        # written whole once, then brought forward in place
        assert st["materialized_whole"] == 2 and st["materialized_in_place"] == 3, st


def test_disk_too_small_says_so(dwsfs_pt, dwsctl, tmp_path):
    """materialize_dir on a 64 MiB tmpfs: no copy fits beside the 1 GiB kept
    free; the status says why, the daemon serves the right bytes."""
    cks = steps(tmp_path, 2)
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, cks[0], bucket, 1, "anchor")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True, timeout=30)
    try:
        with mounted(bucket, tmp_path / "mnt", *LIVE, f"materialize_dir={small}",
                     allowed_errors=[r"not materialized: .*"]) as m:
            st = wait_until(lambda: (lambda s: s if s["materialize_note"] else None)(m.status()), 30 * SLOW,
                            "the reason in the status")
            assert "free" in st["materialize_note"] and st["materialized_step"] is None, st
            reads = st["daemon_reads"]
            assert read_file(m.path("model.safetensors")) == want(bucket, tmp_path, 1)
            assert m.status()["daemon_reads"] > reads
    finally:
        subprocess.run(["umount", "-l", str(small)], timeout=30)
