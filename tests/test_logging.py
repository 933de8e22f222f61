"""The daemon's log: one line per event with an ISO 8601 UTC timestamp and a
level, a level threshold, a log file reopened on SIGHUP (log rotation), and
nothing lost in the background where the machine has no syslog."""
import os
import re
import signal
import subprocess
import time

from mountutil import DWSFS, SLOW, mounted, read_status, unmount, wait_until
from test_mount import publish

LINE = re.compile(r"^dwsfs \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (error|warn|info|debug) \S")


def test_lines_carry_date_and_level(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    with mounted(bucket, tmp_path / "mnt", "poll=1") as m:
        pass
    lines = [ln for ln in m.log().splitlines() if ln.startswith("dwsfs ")]
    assert lines and all(LINE.match(ln) for ln in lines), lines
    assert any(" info mounted " in ln for ln in lines), lines


def test_level_and_log_file_reopened_on_sighup(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, logf = tmp_path / "bucket", tmp_path / "dwsfs.log"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    with mounted(bucket, tmp_path / "mnt", "poll=1", "swap_idle=0.1", f"log_file={logf}", "log_level=info") as m:
        wait_until(lambda: logf.exists() and " mounted " in logf.read_text(), 5 * SLOW, "the mount line in the file")
        os.rename(logf, tmp_path / "dwsfs.log.1")
        m.proc.send_signal(signal.SIGHUP)          # rotate: reopen, do not unmount
        publish(dwsctl, expected / str(s[0]), expected / str(s[1]), bucket, s[1])
        m.wait_step(s[1], 10 * SLOW)
        wait_until(lambda: logf.exists() and f"root now serves step {s[1]}" in logf.read_text(), 5 * SLOW,
                   "the swap line in the reopened file")
        assert read_status(m.mnt)["step"] == s[1]
    assert " mounted " in (tmp_path / "dwsfs.log.1").read_text()
    assert all(LINE.match(ln) for ln in logf.read_text().splitlines())
    # warn: the info lines are gone
    with mounted(bucket, tmp_path / "mnt2", "poll=1", "log_level=warn") as m:
        pass
    assert " mounted " not in m.log() and " info " not in m.log(), m.log()


def test_bad_log_options_refused_before_mounting(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    (tmp_path / "mnt").mkdir()
    for opt, want in (("log_level=loud", "log_level"), (f"log_file={tmp_path}/no/such/dir/x.log", "log_file")):
        p = subprocess.run([DWSFS, "-f", str(bucket), str(tmp_path / "mnt"), "-o", opt], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 1 and want in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


def test_background_with_log_file(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket, mnt, logf = tmp_path / "bucket", tmp_path / "mnt", tmp_path / "bg.log"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    mnt.mkdir()
    p = subprocess.run([DWSFS, str(bucket), str(mnt), "-o", f"log_file={logf}"], capture_output=True, text=True,
                       timeout=30 * SLOW)
    try:
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert read_status(mnt)["step"] == info["steps"][0]
        wait_until(lambda: " mounted " in logf.read_text(), 5 * SLOW, "the mount line")
    finally:
        unmount(mnt)
    wait_until(lambda: " unmounted " in logf.read_text(), 10 * SLOW, "the unmount line")


def test_background_without_syslog_logs_to_a_file(dwsctl, scenarios, tmp_path):
    """No /dev/log (a container) and no log_file: the daemon cannot keep its
    parent's stderr (mount(8) waits for it to close), so it logs to a
    default file and says which on the terminal before it detaches."""
    import pytest
    if os.path.exists("/dev/log"):
        pytest.skip("this machine has a syslog socket")
    root, info = scenarios["gaps"]
    bucket, mnt = tmp_path / "bucket", tmp_path / "mnt"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    mnt.mkdir()
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
    p = subprocess.run([DWSFS, str(bucket), str(mnt)], capture_output=True, text=True, env=env, timeout=30 * SLOW)
    logf = "/var/log/dwsfs.log" if os.geteuid() == 0 else str(tmp_path / "state" / "dwsfs.log")
    try:
        assert p.returncode == 0 and f"logging to {logf}" in p.stderr, p.stderr
        wait_until(lambda: f" mounted {bucket} on {mnt}" in open(logf).read(), 5 * SLOW, "the mount line")
    finally:
        unmount(mnt)
    wait_until(lambda: f" unmounted {mnt}" in open(logf).read(), 10 * SLOW, "the unmount line")
