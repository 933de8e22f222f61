"""mount.dwsfs: `mount -t fuse.dwsfs`, an fstab line, and umount."""
import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO

HELPER = REPO / "mount-helpers" / "mount.dwsfs"
DWSFS = os.environ.get("DWSFS", str(REPO / "build" / "dwsfs"))
SBIN = "/sbin/mount.fuse.dwsfs"


@pytest.fixture
def helper_installed():
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper in /sbin needs root")
    if not os.access(DWSFS, os.X_OK):
        pytest.skip(f"dwsfs not built: {DWSFS}")
    if os.path.lexists(SBIN):
        pytest.skip(f"{SBIN} exists already; not replacing it")
    os.symlink(HELPER, SBIN)
    try:
        yield
    finally:
        os.unlink(SBIN)


def wait_mounted(mnt, want, timeout=10):
    deadline = time.monotonic() + timeout
    while os.path.ismount(mnt) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt}: mounted={not want} after {timeout} s")
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_helper(helper_installed, scenarios, tmp_path, how):
    root, info = scenarios["v1"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, DWSFS_BIN=DWSFS)
    opts = "ro,noauto,_netdev,poll=1,swap_idle=0.2"
    if how == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# test\n{info['bucket']} {mnt} fuse.dwsfs {opts} 0 0\n")
        cmd = ["mount", "-T", str(fstab), str(mnt)]
    else:
        cmd = ["mount", "-t", "fuse.dwsfs", info["bucket"], str(mnt), "-o", opts]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    try:
        wait_mounted(mnt, True)
        latest = info["latest"]
        for name in os.listdir(root / "expected" / str(latest)):
            want = (root / "expected" / str(latest) / name).read_bytes()
            assert (mnt / name).read_bytes() == want, name
        assert "fuse.dwsfs" in open("/proc/mounts").read()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30)
    wait_mounted(mnt, False)
