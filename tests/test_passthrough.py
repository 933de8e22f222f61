"""FUSE passthrough of materialized steps: once the root step is written whole
into an unnamed file (status materialized_step), opens of its files are handed
to the kernel, which reads that file itself: the oracle's bytes with read()
and mmap(), no read request reaches the daemon (status daemon_reads), an
inode already open through the daemon stays so until its last close, an open
file keeps its step across swaps, and materialize_max bounds it all.

Needs root and a kernel with FUSE passthrough (6.9+); where the mount says
passthrough is off for another reason the tests fail, so a kernel or libfuse
change shows. Every wait has a deadline."""
import mmap
import os

import pytest

from mountutil import EXIT_TIMEOUT, SLOW, ismount, mmap_read, mounted, read_file, unmount, wait_until
from test_mount import dwsfs  # noqa: F401 (a fixture)
from test_mount import LIVE, STEP_DEADLINE, check_folder, first_diff, mount_opts, publish, root_no_base

MAT_DEADLINE = 30 * SLOW


@pytest.fixture(scope="module")
def dwsfs_pt(dwsfs):
    if os.geteuid() != 0:
        pytest.skip("FUSE passthrough needs root (backing files)")
    return dwsfs


def read_direct(path):
    """The file read with O_DIRECT into page-aligned buffers."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf, out = mmap.mmap(-1, 1 << 20), []
    try:
        while True:
            n = os.readv(fd, [buf])
            out.append(buf[:n])
            if n < len(buf):
                return b"".join(out)
    finally:
        os.close(fd)
        buf.close()


def wait_materialized(m, step):
    return wait_until(lambda: (lambda st: st if st["materialized_step"] == step and not st["materializing"] else None)(
        m.status()), MAT_DEADLINE, f"step {step} to be materialized")


def test_root_reads_pass_through(dwsfs_pt, scenarios, tmp_path):
    """A sharded base model's root: after materialization every file reads the
    oracle's bytes through the kernel, with read() and mmap(), and the daemon
    serves no read; steps/N of the same step too; an older step through the
    daemon, still exact."""
    root, info = scenarios["v3gap"]
    expected, latest = root / "expected", info["latest"]
    with mounted(info["bucket"], tmp_path / "mnt", *mount_opts(info)) as m:
        st = wait_materialized(m, latest)
        assert st["passthrough"] == "on", st
        files = sorted(os.listdir(expected / str(latest)))
        assert st["materialized_bytes"] == sum(os.path.getsize(expected / str(latest) / f) for f in files), st
        before = m.status()
        check_folder(m.mnt, expected / str(latest), top_exclude={"steps", ".dwsfs"})
        check_folder(m.path("steps", "%06d" % latest), expected / str(latest))
        after = m.status()
        assert after["daemon_reads"] == before["daemon_reads"], (before, after)
        # read() and mmap() of each file, in both views
        assert after["passthrough_opens"] - before["passthrough_opens"] >= 4 * len(files), (before, after)
        # O_DIRECT beside a file passed through passes through too, with the
        # backing file's rules (aligned buffers)
        shard = next(f for f in files if f.endswith(".safetensors"))
        want = read_file(expected / str(latest) / shard)
        with open(m.path(shard), "rb") as held:
            assert first_diff(read_direct(m.path(shard)), want) is None and held.read() == want
        older = info["steps"][0]
        check_folder(m.path("steps", "%06d" % older), expected / str(older))
        assert m.status()["daemon_reads"] > after["daemon_reads"], "steps/N of another step is served by the daemon"


def test_inode_open_before_materialization_stays_daemon_served(dwsfs_pt, scenarios, tmp_path):
    """A root file opened before the step is materialized keeps its inode on
    the daemon while it is open (the kernel refuses an inode open both ways:
    EIO); other files pass through; once it is closed the next open of it
    passes through too. Bytes exact throughout."""
    root, info = scenarios["v3gap"]
    expected, latest = root / "expected", info["latest"]
    shard = sorted(f for f in os.listdir(expected / str(latest)) if f.endswith(".safetensors"))[0]
    other = "config.json"
    want, want_other = read_file(expected / str(latest) / shard), read_file(expected / str(latest) / other)
    env = {"DWSFS_TEST_MERGE_DELAY_MS": str(int(2000 * SLOW))}  # holds materialization back too
    with mounted(info["bucket"], tmp_path / "mnt", *mount_opts(info), env=env) as m:
        fd = os.open(m.path(shard), os.O_RDONLY)
        try:
            assert m.status()["materialized_step"] is None
            head = os.read(fd, 4096)
            wait_materialized(m, latest)
            st = m.status()
            again = read_file(m.path(shard))  # same inode, opened while fd is open
            assert first_diff(again, want) is None, first_diff(again, want)
            assert mmap_read(m.path(shard)) == want
            assert m.status()["passthrough_opens"] == st["passthrough_opens"], "an inode open through the daemon"
            assert read_file(m.path(other)) == want_other
            assert m.status()["passthrough_opens"] == st["passthrough_opens"] + 1
            rest = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            assert first_diff(head + rest, want) is None
        finally:
            os.close(fd)
        wait_until(lambda: m.status()["root_open_handles"] == 0, 5 * SLOW, "the release")
        st = m.status()
        assert read_file(m.path(shard)) == want
        end = m.status()
        assert end["passthrough_opens"] == st["passthrough_opens"] + 1, (st, end)
        assert end["daemon_reads"] == st["daemon_reads"], (st, end)


def test_open_file_keeps_its_step_across_swaps(dwsfs_pt, dwsctl, scenarios, tmp_path):
    """A file passed through keeps the bytes of its step while the root moves
    on and the next step is materialized in turn; new opens read the new step
    through the kernel."""
    root, info = scenarios["gaps"]
    expected, steps = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(steps[0]), bucket, steps[0], "anchor")
    # the held file keeps the root in use: it swaps swap_max_delay after
    with mounted(bucket, tmp_path / "mnt", *LIVE, "swap_max_delay=0.5") as m:
        wait_materialized(m, steps[0])
        first = root_no_base(bucket, expected, steps[0])
        held = open(m.path("model.safetensors"), "rb")
        try:
            opens = m.status()["passthrough_opens"]
            assert opens >= 1
            head = held.read(100)
            prev = steps[0]
            for s in steps[1:4]:
                publish(dwsctl, expected / str(prev), expected / str(s), bucket, s)
                m.wait_step(s, STEP_DEADLINE + 1)
                wait_materialized(m, s)
                reads = m.status()["daemon_reads"]
                got = read_file(m.path("model.safetensors"))
                assert got == root_no_base(bucket, expected, s), f"step {s}: {first_diff(got, root_no_base(bucket, expected, s))}"
                assert m.status()["daemon_reads"] == reads, f"step {s} read through the daemon"
                prev = s
            rest = held.read()
            assert first_diff(head + rest, first) is None, first_diff(head + rest, first)
        finally:
            held.close()
        assert m.status()["passthrough_opens"] >= opens + 3


def test_materialize_max(dwsfs_pt, scenarios, tmp_path):
    """materialize_max=0: passthrough off, nothing written; a step larger
    than materialize_max: not written (one log line), read through the
    daemon. Bytes exact either way."""
    root, info = scenarios["v3gap"]
    expected, latest = root / "expected", info["latest"]
    with mounted(info["bucket"], tmp_path / "off", *mount_opts(info), "materialize_max=0") as m:
        st = m.status()
        assert st["passthrough"] == "off: materialize_max=0" and not st["materializing"], st
        check_folder(m.mnt, expected / str(latest), top_exclude={"steps", ".dwsfs"}, mmap_too=False)
        st = m.status()
        assert st["materialized_step"] is None and st["passthrough_opens"] == 0 and st["daemon_reads"] > 0, st
    with mounted(info["bucket"], tmp_path / "small", *mount_opts(info), "materialize_max=4K") as m:
        wait_until(lambda: "over materialize_max" in m.log(), MAT_DEADLINE, "the over-the-cap log line")
        check_folder(m.mnt, expected / str(latest), top_exclude={"steps", ".dwsfs"}, mmap_too=False)
        st = m.status()
        assert st["passthrough"] == "on" and st["materialized_step"] is None and not st["materializing"], st
        assert st["passthrough_opens"] == 0, st


def test_lazy_unmount_with_file_passed_through(dwsfs_pt, scenarios, tmp_path):
    """fusermount3 -u -z with a passed-through file open (read() and mmap()):
    the mount goes away at once, the file still reads its step's bytes (the
    kernel holds the materialized file), and the daemon exits 0 once it is
    closed."""
    root, info = scenarios["v1"]
    latest = info["latest"]
    name = "model-00001-of-00002.safetensors"
    want = read_file(root / "expected" / str(latest) / name)
    with mounted(info["bucket"], tmp_path / "mnt") as m:
        wait_materialized(m, latest)
        f = open(m.path(name), "rb")
        try:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            assert m.status()["passthrough_opens"] >= 1
            unmount(m.mnt, check=True)
            assert not ismount(m.mnt)
            assert f.read() == want and mm[:] == want
            mm.close()
        finally:
            f.close()
        rc = m.wait_exit(EXIT_TIMEOUT)
        assert rc == 0, f"dwsfs exit status {rc} after the unmount:\n{m.log()}"
