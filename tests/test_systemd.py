"""Type=notify (docs/mount.md#under-systemd): READY=1 on $NOTIFY_SOCKET, sent
by the daemon's own process once the mount answers with a step, STATUS= with
the step it serves, again after each swap; a path or an abstract socket."""
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from mountutil import SLOW, mounted, read_status, wait_until
from test_mount import publish

REPO = Path(__file__).resolve().parent.parent
LIVE = ("poll=1", "swap_idle=0.1")


class Listener:
    """A unix datagram socket standing in for systemd's: every message, its
    sender's pid (SCM_CREDENTIALS), and whether the mount answered (a
    readable status) when READY=1 came."""

    def __init__(self, addr, mnt):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(addr)
        self.sock.settimeout(0.1)
        self.mnt, self.msgs, self.ready_answered, self.stop = mnt, [], None, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        size = struct.calcsize("3i")
        while not self.stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
            except socket.timeout:
                continue
            pid = None
            for level, kind, d in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", d[:size])[0]
            fields = dict(ln.split("=", 1) for ln in data.decode().split("\n") if "=" in ln)
            if fields.get("READY") == "1" and self.ready_answered is None:
                try:
                    self.ready_answered = read_status(self.mnt)["step"]
                except OSError as e:
                    self.ready_answered = e
            self.msgs.append((pid, fields))

    def statuses(self):
        return [f["STATUS"] for _, f in self.msgs if "STATUS" in f]

    def close(self):
        self.stop = True
        self.t.join(5)
        self.sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_after_the_mount_answers_and_status_per_swap(dwsctl, scenarios, tmp_path, kind):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, mnt = tmp_path / "bucket", tmp_path / "mnt"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    if kind == "path":
        addr = env_addr = str(tmp_path / "notify.sock")
    else:
        name = f"dwsfs-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        addr, env_addr = "\0" + name, "@" + name
    lst = Listener(addr, mnt)
    try:
        with mounted(bucket, mnt, *LIVE, env={"NOTIFY_SOCKET": env_addr}) as m:
            wait_until(lambda: lst.ready_answered is not None, 10 * SLOW, f"READY=1 (log:\n{m.log()})")
            assert lst.ready_answered == s[0], f"READY=1 came before the mount answered: {lst.ready_answered}"
            assert all(pid == m.proc.pid for pid, _ in lst.msgs), (m.proc.pid, lst.msgs)
            ready = [f for _, f in lst.msgs if f.get("READY") == "1"]
            assert len(ready) == 1 and ready[0].get("STATUS") == f"serving step {s[0]}", lst.msgs
            for prev, cur in zip(s, s[1:3]):
                publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
                m.wait_step(cur, 10 * SLOW)
                wait_until(lambda: lst.statuses()[-1] == f"serving step {cur}", 5 * SLOW,
                           f"STATUS=serving step {cur}: {lst.msgs}")
        assert len([f for _, f in lst.msgs if f.get("READY") == "1"]) == 1
        assert any(f.get("STOPPING") == "1" for _, f in lst.msgs), lst.msgs
    finally:
        lst.close()


def test_hook_does_not_inherit_notify_socket(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, mnt, out = tmp_path / "bucket", tmp_path / "mnt", tmp_path / "hook-env"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    lst = Listener(str(tmp_path / "notify.sock"), mnt)
    try:
        with mounted(bucket, mnt, *LIVE, f"on_swap=env > {out}", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}) as m:
            publish(dwsctl, expected / str(s[0]), expected / str(s[1]), bucket, s[1])
            m.wait_step(s[1], 10 * SLOW)
            wait_until(lambda: out.exists() and read_status(m.mnt)["on_swap_runs"] >= 1, 10 * SLOW, "the hook's run")
        assert "NOTIFY_SOCKET" not in out.read_text()
    finally:
        lst.close()


def test_unit_is_type_notify():
    unit = (REPO / "mount-helpers" / "dwsfs@.service").read_text()
    lines = {ln.strip() for ln in unit.splitlines()}
    assert "Type=notify" in lines and "NotifyAccess=main" in lines, unit
    assert "EnvironmentFile=-/etc/dwsfs/%i.conf" in lines, unit
    start = next(ln for ln in lines if ln.startswith("ExecStart="))
    assert " -f " in start, start  # the main process is the one that notifies
