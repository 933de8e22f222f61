"""Running the dwsfs daemon under test, following libfuse's test pattern:
start it in the foreground with its stderr in a file, wait for the mount with
a deadline (failing early, with the daemon's stderr, if it exits), and on the
way out always unmount, always reap the process (kill -9 past a deadline), then
fail if it exited badly or logged an error the test did not declare.

    with mounted(bucket, mnt, "poll=1", "swap_idle=0.2") as m:
        read_status(m.mnt)["step"]
"""
import contextlib
import errno
import json
import mmap
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DWSFS = os.environ.get("DWSFS", str(REPO / "build" / "dwsfs"))
DWSCTL = os.environ.get("DWSCTL", str(REPO / "build" / "dwsctl"))


def _is_asan(path):
    try:
        with open(path, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


ASAN = _is_asan(DWSFS)
# Deadlines only matter when something is wrong; scale them for slow builds
# (ASan/UBSan is ~3x slower) without making a passing run any slower.
SLOW = float(os.environ.get("DWSFS_TEST_SLOW", "3" if ASAN else "1"))
MOUNT_TIMEOUT = 10.0 * SLOW
EXIT_TIMEOUT = 10.0 * SLOW

# Log lines that are a failure unless the test declared them with allowed_errors.
BAD_LINE = re.compile(r"AddressSanitizer|LeakSanitizer|runtime error|ERROR| failed: | refused: ")


class MountError(AssertionError):
    pass


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(path):
    """The lines of /proc/self/mountinfo whose mount point is `path` (stacked
    mounts give several)."""
    path = os.path.abspath(str(path))
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if _unescape(ln.split()[4]) == path]


def ismount(path):
    """Whether anything is mounted on path, a dead daemon's mount (ENOTCONN,
    which os.path.ismount calls no mount) included."""
    return bool(mounts_at(path))


def is_stale(path):
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def wait_until(pred, timeout, what, interval=0.02):
    """Poll pred() until it returns something truthy (returned) or raise after
    `timeout` seconds saying `what` never happened. Exceptions of pred count
    as false until the deadline, then are chained to the failure."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
            last_exc = None
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}") from last_exc
        time.sleep(interval)


def read_status(mnt):
    with open(os.path.join(mnt, ".dwsfs", "status"), "rb") as f:
        return json.loads(f.read())


def mmap_read(path):
    """The whole file through a shared read-only mapping."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            return bytes(mm[:])


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def unmount(mnt, check=False):
    """Lazy unmount; returns fusermount3's CompletedProcess."""
    p = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise MountError(f"fusermount3 -u -z {mnt} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def daemon_env(env=None):
    e = dict(os.environ)
    # Sanitizer reports must end the daemon and show in its stderr.
    e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
    e.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    if env:
        e.update(env)
    return e


def daemon_cmd(bucket, mnt, opts):
    cmd = [DWSFS, "-f", str(bucket), str(mnt)]
    for o in opts:
        o = str(o)
        cmd += [o] if o.startswith("-") else ["-o", o]
    return cmd


def unexpected_lines(text, allowed_errors=()):
    pats = [re.compile(a) for a in allowed_errors]
    return [ln for ln in text.splitlines() if BAD_LINE.search(ln) and not any(p.search(ln) for p in pats)]


def _live(path, timeout=2.0):
    """statfs(path) answered (never cached by the kernel, unlike stat): the
    mount on path has a daemon behind it. Bounded: a hang counts as no."""
    box = []

    def probe():
        try:
            os.statvfs(path)
            box.append(True)
        except OSError:
            box.append(False)
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(box and box[0])


def _served_by_fuse(mnt):
    """The path resolves to a FUSE mount (its device is a fuse.* line of
    mountinfo), not to the bare folder under a mount that just went away."""
    try:
        st = os.stat(mnt)
    except OSError:
        return False
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return any(ln.split()[2] == dev and " - fuse" in ln for ln in mounts_at(mnt))


def _mounted_anew(mnt, before):
    """A mount appeared on mnt since `before` (its mountinfo lines). With a
    dead mount there before, the new one may reuse its id and device number,
    so there the test is that the top mount answers; and in every case the
    path must lead into a FUSE mount (between a stale mount's detach and the
    new mount it leads to the bare folder)."""
    if not mounts_at(mnt):
        return False
    # statfs first, the FUSE check after: statfs alone also succeeds on the
    # bare folder (the stale mount detached, ours not yet there), and stat
    # alone on the stale mount (cached attributes). In this order a statfs
    # that answered on the bare folder is followed by a stat that finds
    # either the bare folder (no) or the new mount (yes, and it stays).
    if before and not _live(mnt):
        return False
    return _served_by_fuse(mnt)


class Mount:
    def __init__(self, proc, mnt, logpath):
        self.proc, self.mnt, self.logpath = proc, str(mnt), logpath
        self.final_log = None

    def log(self):
        """The daemon's stderr so far (all of it once mounted() has ended)."""
        if self.final_log is not None:
            return self.final_log
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def status(self):
        return read_status(self.mnt)

    def path(self, *parts):
        return os.path.join(self.mnt, *[str(p) for p in parts])

    def wait_step(self, step, timeout, what=None):
        """Wait until the root serves `step`; returns the seconds it took."""
        t0 = time.monotonic()
        wait_until(lambda: read_status(self.mnt)["step"] == step, timeout,
                   what or f"the root to serve step {step} (log:\n{self.log()})")
        return time.monotonic() - t0

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


@contextlib.contextmanager
def mounted(bucket, mnt, *opts, env=None, allowed_errors=(), expect_returncode=0,
            mount_timeout=None, exit_timeout=None):
    """Mount `bucket` on `mnt` with `dwsfs -f BUCKET MNT -o OPT...` (an opt that
    starts with '-' is passed as is). Yields a Mount.

    On exit, whatever happened: `fusermount3 -u -z MNT`, wait for the daemon
    (kill -9 after a deadline), then fail if it exited with something else than
    `expect_returncode` or logged an unexpected error line (sanitizer report,
    'runtime error', 'ERROR', ' failed: ', ' refused: ') that matches none of
    the regexes in `allowed_errors`."""
    mnt = str(mnt)
    if not os.path.lexists(mnt) and not ismount(mnt):
        os.makedirs(mnt)
    mount_timeout = mount_timeout or MOUNT_TIMEOUT
    exit_timeout = exit_timeout or EXIT_TIMEOUT
    before = set(mounts_at(mnt))   # e.g. a dead daemon's mount, which dwsfs must clean
    fd, logpath = tempfile.mkstemp(prefix="dwsfs-", suffix=".log")
    log = os.fdopen(fd, "w")
    proc = subprocess.Popen(daemon_cmd(bucket, mnt, opts), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=daemon_env(env))
    log.close()
    m = Mount(proc, mnt, logpath)
    body_failed = False
    try:
        deadline = time.monotonic() + mount_timeout
        while not _mounted_anew(mnt, before):
            if proc.poll() is not None:
                raise MountError(f"dwsfs exited with {proc.returncode} before mounting {mnt}:\n{m.log()}")
            if time.monotonic() > deadline:
                raise MountError(f"{mnt} not mounted after {mount_timeout:.0f} s:\n{m.log()}")
            time.sleep(0.02)
        yield m
    except BaseException:
        body_failed = True
        raise
    finally:
        problems = []
        if proc.poll() is None or ismount(mnt):
            unmount(mnt)
        rc = m.wait_exit(exit_timeout)
        if rc is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            problems.append(f"dwsfs did not exit within {exit_timeout:.0f} s of the unmount; killed")
        elif rc != expect_returncode:
            problems.append(f"dwsfs exited with {rc}, expected {expect_returncode}")
        bad = unexpected_lines(m.log(), allowed_errors)
        if bad:
            problems.append("unexpected error lines in the daemon's log:\n  " + "\n  ".join(bad))
        text = m.final_log = m.log()
        os.unlink(logpath)
        if body_failed:
            print(f"--- daemon log ({' '.join(proc.args)}) ---\n{text}")
        if ismount(mnt):
            problems.append(f"{mnt} is still mounted after the daemon exited:\n" + "".join(mounts_at(mnt)))
        for _ in range(5):  # stacked mounts (a stale one under ours) included
            if not ismount(mnt):
                break
            unmount(mnt)
        if problems and not body_failed:
            raise MountError("; ".join(problems) + f"\n--- daemon log ---\n{text}")


S3RVER = os.environ.get("S3RVER", "/opt/dwsfs-test-npm/node_modules/.bin/s3rver")


@contextlib.contextmanager
def s3rver_running(tmp_path, port, log=None):
    """npm's s3rver on 127.0.0.1:port with a bucket `grpo`, its data under
    tmp_path; its output to the file `log` (None: dropped). Yields the
    endpoint; always stopped. Missing: the test fails under
    DWSFS_REQUIRE_S3=1 (CI), else skips."""
    import pytest  # only the tests that start it need pytest here
    if not os.access(S3RVER, os.X_OK):
        if os.environ.get("DWSFS_REQUIRE_S3") == "1":
            pytest.fail(f"s3rver not installed at {S3RVER}")
        pytest.skip(f"s3rver not installed at {S3RVER}")
    data = Path(tmp_path) / "s3data"
    data.mkdir()
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen([S3RVER, "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--configure-bucket", "grpo",
                          *([] if log else ["--silent"])], stdout=out, stderr=subprocess.STDOUT)
    ep = f"http://127.0.0.1:{port}"
    try:
        def up():
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", ep], capture_output=True,
                               text=True, timeout=5)
            return r.stdout.strip() not in ("", "000")
        wait_until(up, 30, "s3rver")
        yield ep
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
        if log:
            out.close()
