"""dwsfs's command line: every option checked before anything is opened, one
line naming the option and what it takes, exit 1 within a second; one size
syntax and durations with units; the mountpoint checked up front."""
import os
import subprocess
import time

import pytest

from mountutil import DWSFS, SLOW, mounted, read_status, unmount
from test_mount import publish

# an hf:// bucket nobody serves: any bucket work would hang or fail on it
NOWHERE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}


def run_dwsfs(bucket, mnt, *opts, env=None):
    cmd = [DWSFS, "-f", str(bucket), str(mnt)]
    for o in opts:
        cmd += o if isinstance(o, list) else ["-o", o]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=dict(os.environ, **(env or {})))
    return p, time.monotonic() - t0


@pytest.mark.parametrize("opt,names", [
    ("pol=2", ["'pol'", "poll"]),
    ("poll=-1", ["poll=", "duration"]),
    ("poll=2x", ["poll=", "duration"]),
    ("poll=0", ["poll=", "100ms"]),
    ("swap_max_delay=forever", ["swap_max_delay", "never"]),
    ("block_size=5000", ["block_size", "4K"]),
    ("cache_size=16GB", ["cache_size", "KiB"]),
    ("max_steps=0", ["max_steps", "1 to 1024"]),
    ("verify=all", ["verify", "none, payload or state"]),
    ("log_level=loud", ["log_level", "debug"]),
    ("map_prefix=nothing", ["map_prefix", "FROM=TO"]),
    ("ca_file=/no/such/file", ["ca_file", "/no/such/file"]),
    ("on_swap_keep_secrets=yes", ["on_swap_keep_secrets", "no value"]),
    (["--poll", "2"], ["--poll", "-o poll="]),
])
def test_bad_option_is_one_line_before_the_bucket(tmp_path, opt, names):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p, took = run_dwsfs("hf://buckets/acme/run", mnt, opt, env=NOWHERE)
    lines = p.stderr.splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert all(n in lines[0] for n in names), lines[0]
    assert took < 1.0 * SLOW, took
    assert not os.path.ismount(mnt)


def test_unknown_fuse_option_refused_before_the_bucket(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p, took = run_dwsfs("hf://buckets/acme/run", mnt, "bogus_option", env=NOWHERE)
    assert p.returncode == 1 and "bogus_option" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert took < 1.0 * SLOW


def test_units_accepted(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    opts = ("poll=1500ms", "swap_idle=0.2s", "swap_max_delay=never", "on_swap_timeout=1m", "block_size=8M",
            "cache_size=16GiB", "materialize_max=1T", "read_timeout=1m", "stall_timeout=10s", "info_poll=1h")
    with mounted(bucket, tmp_path / "mnt", *opts) as m:
        assert read_status(m.mnt)["step"] == info["steps"][0]


def test_mountpoint_checked_up_front(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    p, took = run_dwsfs(bucket, full)
    assert p.returncode == 1 and "not empty" in p.stderr and "nonempty" in p.stderr, p.stderr
    with mounted(bucket, full, "nonempty") as m:
        assert read_status(m.mnt)["step"] == info["steps"][0]
        # a second dwsfs on a live mount is refused, not stacked
        p, took = run_dwsfs(bucket, full, "nonempty")
        assert p.returncode == 1 and "mounted there already" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
        assert open("/proc/self/mountinfo").read().count(f" {full} ") == 1
    assert (full / "keep.txt").read_text() == "mine\n"
    p, _ = run_dwsfs(bucket, tmp_path / "missing")
    assert p.returncode == 1 and "missing" in p.stderr


def test_not_root_refused_before_the_bucket(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    import shutil
    import tempfile
    mnt = tempfile.mkdtemp(prefix="dwsfs-nobody-", dir="/tmp")  # a path another user can reach
    try:
        os.chown(mnt, 65534, 65534)
        exe = os.path.join(mnt, "dwsfs")
        shutil.copy(DWSFS, exe)  # the build tree may be out of the other user's reach
        os.chmod(exe, 0o755)
        os.mkdir(os.path.join(mnt, "m"))
        os.chown(os.path.join(mnt, "m"), 65534, 65534)
        cmd = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe, "-f",
               "hf://buckets/acme/run", os.path.join(mnt, "m")]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=dict(NOWHERE, PATH="/nonexistent"))
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
        assert "fusermount3" in p.stderr or "/dev/fuse" in p.stderr, p.stderr
    finally:
        shutil.rmtree(mnt)
