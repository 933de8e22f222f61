"""Remote buckets: hf:// against the loopback Hub (tests/hubserver.py) and
s3:// against s3rver, through dwsctl and through the mount. Byte-exact against
the oracle, lazy (bytes fetched), fault-tolerant (never a wrong byte, never a
hang), with the token kept away from the CDN and the cache under its cap."""
import collections
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import dwsgen
import dwsref
from conftest import REPO
from hubserver import Hub
from mountutil import s3rver_running

DWSFS = os.environ.get("DWSFS", str(REPO / "build" / "dwsfs"))
DWSCTL = os.environ.get("DWSCTL", str(REPO / "build" / "dwsctl"))
TOKEN = "hf_test_secret_token_0123456789"


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Mount:
    """dwsfs in the foreground; always unmounted; daemon errors fail the test."""

    def __init__(self, bucket, mnt, opts=(), env=None, allowed=()):
        self.mnt = Path(mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.mnt.parent / (self.mnt.name + ".log"), "w+")
        args = [DWSFS, "-f", str(bucket), str(mnt)]
        if opts:
            args += ["-o", ",".join(opts)]
        self.allowed = allowed
        self.proc = subprocess.Popen(args, stderr=self.logf, env=env)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"dwsfs exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"not mounted after 20 s: {self.log()}")
            time.sleep(0.02)

    def log(self):
        self.logf.flush()
        with open(self.logf.name) as f:
            return f.read()

    def status(self):
        with open(self.mnt / ".dwsfs" / "status") as f:
            return json.load(f)

    def close(self):
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
            raise AssertionError("dwsfs did not exit after unmount")
        log = self.log()
        self.logf.close()
        assert rc == 0, f"dwsfs exited {rc}: {log}"
        for bad in ("AddressSanitizer", "runtime error", "LeakSanitizer"):
            assert bad not in log, log
        return log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def read_mmap(path):
    """The whole file through a shared read-only mapping. Copied out by a
    ctypes call, which releases the GIL: a page fault the daemon serves
    with bytes from this process's Hub must not hold the Hub's threads
    (bytes(mmap) copies holding it: the Hub never answered, the daemon's
    fetch timed out, and the fault was a SIGBUS)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            buf = ctypes.create_string_buffer(size)
            ctypes.memmove(buf, addr, size)
            return buf.raw
        finally:
            _libc.munmap(addr, size)


def same_tree(actual_root, expected_root, reader=read_all):
    for dirpath, _, files in os.walk(expected_root):
        for name in files:
            e = Path(dirpath) / name
            rel = e.relative_to(expected_root)
            assert reader(Path(actual_root) / rel) == e.read_bytes(), f"{rel} differs"


def add_bucket(root, name, scenario_dir):
    dst = root / "buckets" / "test" / name
    shutil.copytree(Path(scenario_dir) / "bucket", dst, copy_function=shutil.copy2)
    return f"hf://buckets/test/{name}", dst


def hf_env(h, cache, token=None):
    env = dict(os.environ, HF_ENDPOINT=h.endpoint, DWSFS_CACHE_DIR=str(cache))
    env.pop("HF_TOKEN", None)
    env["HF_HOME"] = str(cache) + "-hfhome"  # no stray token file
    if token:
        env["HF_TOKEN"] = token
    return env


def ctl(*args, env, check=True, timeout=120):
    p = subprocess.run([DWSCTL, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"dwsctl {args}: {p.returncode}\n{p.stderr}")
    return p


@pytest.fixture(autouse=True)
def _need_binaries():
    if not (os.access(DWSFS, os.X_OK) and os.access(DWSCTL, os.X_OK)):
        pytest.skip("dwsfs/dwsctl not built")


# ---------------------------------------------------------------- byte-exact

def test_extract_hf_every_step_with_model_repo_base(hub, scenarios, tmp_path):
    """v3gap: its external base (F32/F16/I64 tensors) served as a Hub model
    repo, base=hf://NS/REPO@REV; every step byte-exact."""
    h, root = hub
    sdir, info = scenarios["v3gap"]
    uri, _ = add_bucket(root, "v3gap", sdir)
    shutil.copytree(sdir / "base", root / "models" / "acme" / "base-model" / "main", copy_function=shutil.copy2)
    env = hf_env(h, tmp_path / "cache")
    for step in info["steps"]:
        out = tmp_path / f"out{step}"
        ctl("extract", uri, out, "--step", step, "--base", "hf://acme/base-model@main", env=env)
        assert dwsref.diff_folders(out, sdir / "expected" / str(step)) is None, step
    assert h.stats()["cdn_auth_seen"] == 0


def test_mount_hf_read_and_mmap(hub, scenarios, tmp_path):
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=1"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]))
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]), read_mmap)
        for step in info["steps"][::3]:
            same_tree(m.mnt / "steps" / f"{step:06d}", sdir / "expected" / str(step), read_mmap)
        st = m.status()
        assert st["step"] == info["latest"] and st["bucket"] == uri
        assert st["api_calls"] > 0 and st["cdn_requests"] > 0 and st["last_error"] is None


# ---------------------------------------------------------------- laziness

def big_anchor_bucket(dst, tensors=8, mib=4):
    """One complete BF16 anchor of `tensors` tensors of `mib` MiB each."""
    rng = __import__("numpy").random.default_rng(7)
    names = [f"model.layers.{i}.mlp.weight" for i in range(tensors)]
    n = mib * 1024 * 1024 // 2
    data = {k: ("BF16", [n], rng.integers(0, 65535, n, dtype="uint16").tobytes()) for k in names}
    meta = {"format": "sparse_weight_patch", "version": "1", "sparse": "False", "model_version": "1",
            "total_elements": str(n * tensors)}
    (dst / "anchors").mkdir(parents=True)
    (dst / "anchors" / "step_000001.safetensors").write_bytes(dwsgen.safetensors_bytes(data, meta))
    return names, n * 2


def test_one_tensor_fetches_about_its_bytes(hub, tmp_path):
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    names, tbytes = big_anchor_bucket(dst)
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=60", "block_size=1048576"], env=env) as m:
        f = m.mnt / "model.safetensors"
        header, _, start = dwsref.parse(read_all(dst / "anchors" / "step_000001.safetensors"), "anchor")
        before = h.stats()["cdn_bytes"]
        e = header[names[3]]["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(start + e[0])
            got = fh.read(e[1] - e[0])
        want = read_all(dst / "anchors" / "step_000001.safetensors")[start + e[0]:start + e[1]]
        assert got == want
        fetched = h.stats()["cdn_bytes"] - before
        shard = os.path.getsize(f)
        # the tensor plus at most a block on each side; not the shard
        assert fetched <= tbytes + 2 * (1 << 20), (fetched, tbytes)
        assert fetched < shard / 3


def test_background_mount_serves_a_multi_block_file(hub, tmp_path):
    """`dwsfs BUCKET MNT` without -f, as mount(8) and fstab run it: the
    daemon forks before any thread starts, so its prefetch threads exist and
    a read spanning many blocks is served (it hung for the read deadline,
    then failed with EIO, when the fork came after the cache's threads).
    A start-up error still reaches the terminal as one line, exit 1."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    # 400 tensors of 64 KiB: a header of ~40 KiB, which the start-up reads in
    # two parts (its second read of block 0 queues block 1 for a prefetch)
    rng = __import__("numpy").random.default_rng(3)
    n = 32768
    data = {f"model.layers.{i}.self_attn.o_proj.weight": ("BF16", [n], rng.integers(0, 65535, n, dtype="uint16").tobytes())
            for i in range(400)}
    meta = {"format": "sparse_weight_patch", "version": "1", "sparse": "False", "model_version": "1",
            "total_elements": str(n * len(data))}
    (dst / "anchors").mkdir(parents=True)
    (dst / "anchors" / "step_000001.safetensors").write_bytes(dwsgen.safetensors_bytes(data, meta))
    env = hf_env(h, tmp_path / "cache")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bad = subprocess.run([DWSFS, "hf://buckets/test/missing", str(mnt)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 1 and not os.path.ismount(mnt), bad
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwsfs: ") and "missing" in lines[0], bad.stderr
    tiny = subprocess.run([DWSFS, "hf://buckets/test/big", str(mnt), "-o", "block_size=100"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert tiny.returncode == 1 and "block_size" in tiny.stderr and not os.path.ismount(mnt), tiny
    # the start-up's 4 CDN requests slow (two header reads, blocks 0 and 1 at
    # 0.5 s each): the prefetch of block 1 it queued is still running when a
    # late fork would come
    h.set_faults({"class": "cdn", "kind": "slow", "rate": 2 << 20, "count": 4})
    p = subprocess.run([DWSFS, "hf://buckets/test/big", str(mnt), "-o", "block_size=1048576,read_timeout=20"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    try:
        assert os.path.ismount(mnt)  # mounted when the command returns
        t0 = time.monotonic()
        got = subprocess.run(["cat", str(mnt / "model.safetensors")], capture_output=True, timeout=60).stdout
        assert got == (dst / "anchors" / "step_000001.safetensors").read_bytes()
        assert time.monotonic() - t0 < 15
    finally:
        pids = subprocess.run(["pgrep", "-f", f"hf://buckets/test/big {mnt}"], capture_output=True,
                              text=True).stdout.split()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        wait_until(lambda: not any(os.path.exists(f"/proc/{x}") for x in pids), 20, "the daemon to exit")
    assert pids


def model_bucket(dst, tmp_path, deltas, changed):
    """A 3M-parameter make_model.py bucket at dst (no base): the latest step's
    model.safetensors as the oracle extracts it."""
    subprocess.run(["/usr/bin/python3", str(REPO / "tests" / "bench" / "make_model.py"), str(dst), "--params", "3e6",
                    "--deltas", str(deltas), "--changed", str(changed)], check=True, capture_output=True, timeout=300)
    expected = tmp_path / "expected"
    dwsref.extract(str(dst), str(expected))
    return (expected / "model.safetensors").read_bytes()


def test_cached_sources_merged_into_whole_tensors(hub, tmp_path):
    """Tensors patched past a third over a remote source whose blocks are all
    in the block cache: the compaction thread merges the source in, and the
    mount serves them from memory (pointed to, no copy) with exact bytes.
    Without the blocks cached it merges nothing and fetches nothing."""
    h, root = hub
    want = model_bucket(root / "buckets" / "test" / "fold", tmp_path, deltas=4, changed=0.2)
    env = hf_env(h, tmp_path / "cache")
    opts = ["poll=60", "block_size=1048576"]

    def merged(m):
        wait_until(lambda: not m.status()["merging"], 60, "the compaction thread to go idle")
        return m.status()

    with Mount("hf://buckets/test/fold", tmp_path / "mnt", opts, env=env) as m:
        st = merged(m)
        assert st["whole_tensors"] == 0, st  # the anchor's blocks were not cached yet
        assert read_all(m.mnt / "model.safetensors") == want  # fills the cache
        # blocks the disk writers were too far behind to take (a loaded
        # machine) are served and not kept: the next mount fetches them
        unkept = m.status()["cache_unkept_blocks"]
    cdn = h.stats()["cdn"]
    with Mount("hf://buckets/test/fold", tmp_path / "mnt", opts, env=env) as m:
        st = merged(m)
        assert unkept or (st["whole_tensors"] > 0 and st["whole_tensor_bytes"] > len(want) // 2), (unkept, st)
        assert read_all(m.mnt / "model.safetensors") == want
        assert read_mmap(m.mnt / "model.safetensors") == want
        with open(m.mnt / "model.safetensors", "rb") as f:  # odd offsets and lengths
            for off in (1, 4097, len(want) // 3 + 7, len(want) - 12345):
                f.seek(off)
                assert f.read(70001) == want[off:off + 70001], off
    assert h.stats()["cdn"] - cdn <= unkept, unkept  # the second mount fetched nothing the first kept


def test_materialized_once_cached_never_fetching(hub, tmp_path):
    """The root of a remote bucket is materialized for passthrough only once
    the block cache holds every source byte (a read of the model puts them
    there): before, nothing is written and nothing fetched for it; after,
    opens pass through with exact bytes and the CDN sees no request but for
    blocks the cache did not keep (a loaded disk)."""
    if os.geteuid() != 0:
        pytest.skip("FUSE passthrough needs root")
    h, root = hub
    want = model_bucket(root / "buckets" / "test" / "mat", tmp_path, deltas=3, changed=0.02)
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/mat", tmp_path / "mnt", ["poll=60", "block_size=1048576"], env=env) as m:
        wait_until(lambda: not m.status()["merging"], 60, "the compaction thread to go idle")
        cdn = h.stats()["cdn"]
        time.sleep(1.5)  # the materializer looks again every second
        st = m.status()
        assert st["passthrough"] == "on" and st["materialized_step"] is None and st["materializing"], st
        assert h.stats()["cdn"] == cdn, "materialization fetched"
        with open(m.mnt / "model.safetensors", "rb") as f:  # fills the cache through the daemon
            assert f.read() == want
        cdn = h.stats()["cdn"]
        wait_until(lambda: m.status()["materialized_step"] == st["step"], 30, "the root to be materialized")
        before = m.status()
        assert read_all(m.mnt / "model.safetensors") == want
        assert read_mmap(m.mnt / "model.safetensors") == want
        after = m.status()
        assert after["passthrough_opens"] >= before["passthrough_opens"] + 2, (before, after)
        assert after["daemon_reads"] == before["daemon_reads"], (before, after)
        # blocks the disk writers were too far behind to take (a loaded
        # machine: 3 in a CI rehearsal) were served and not kept; 10 s on,
        # the copy fetched them, and only them
        unkept = after["cache_unkept_blocks"]
        assert h.stats()["cdn"] - cdn <= unkept, ("materialization fetched more than the cache did not keep", unkept)


def test_materialized_after_the_grace_when_blocks_never_come(hub, tmp_path):
    """A remote root a reader opened but did not read whole (or whose blocks
    the cache did not keep) waits for its blocks, saying so in the status,
    then, 10 s after it became the root, is materialized anyway: the copy
    fetches what the cache lacks. (An idle mount fetches nothing:
    test_polling_budget.)"""
    if os.geteuid() != 0:
        pytest.skip("FUSE passthrough needs root")
    h, root = hub
    want = model_bucket(root / "buckets" / "test" / "grace", tmp_path, deltas=2, changed=0.02)
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/grace", tmp_path / "mnt", ["poll=60", "block_size=1048576"], env=env) as m:
        wait_until(lambda: not m.status()["merging"], 60, "the compaction thread to go idle")
        st = wait_until(lambda: (lambda s: s if s["materialize_note"] else None)(m.status()), 10, "the note")
        assert "waiting" in st["materialize_note"] and st["materialized_step"] is None, st
        with open(m.mnt / "model.safetensors", "rb") as f:  # a reader: its first bytes only
            assert f.read(4096) == want[:4096]
        cdn = h.stats()["cdn"]
        st = wait_until(lambda: (lambda s: s if s["materialized_step"] == s["step"] else None)(m.status()), 40,
                        "the root to be materialized after the grace")
        assert st["materialize_note"] is None and h.stats()["cdn"] > cdn, st
        before = m.status()
        assert read_all(m.mnt / "model.safetensors") == want
        assert m.status()["daemon_reads"] == before["daemon_reads"]
        assert "fetching them to materialize" in m.log()


def test_new_step_fetches_about_the_delta(hub, scenarios, tmp_path):
    """Taking a new step costs <= 1.05x the delta file's bytes."""
    h, root = hub
    sdir, info = scenarios["gaps"]
    dst = root / "buckets" / "test" / "live"
    steps = info["steps"]
    env = hf_env(h, tmp_path / "cache")
    # the oracle's checkpoints published as consecutive steps 1, 2, 3, 4
    ctl("publish", "-", sdir / "expected" / str(steps[0]), dst, "--step", 1, "--format", "anchor", env=env)
    with Mount("hf://buckets/test/live", tmp_path / "mnt", ["poll=1", "swap_idle=0.1"], env=env) as m:
        prev = steps[0]
        for n, s in enumerate(steps[1:4], start=2):
            before = h.stats()["cdn_bytes"]
            p = ctl("publish", sdir / "expected" / str(prev), sdir / "expected" / str(s), dst, "--step", n, env=env)
            delta = os.path.getsize(p.stdout.split(":")[0])
            wait_until(lambda: m.status()["step"] == n, 15, f"step {n} at the root")
            fetched = h.stats()["cdn_bytes"] - before
            assert fetched <= 1.05 * delta, (n, fetched, delta)
            prev = s
        # and the served bytes are right
        got = dwsref.parse(read_all(m.mnt / "model.safetensors"), "m")
        out = tmp_path / "x"
        ctl("extract", "hf://buckets/test/live", out, env=env)
        assert read_all(m.mnt / "model.safetensors") == read_all(out / "model.safetensors")
        assert got is not None


# ---------------------------------------------------------------- faults

FAULTS = [
    {"kind": "status", "status": 503, "count": 3},
    {"kind": "status", "status": 500, "count": 2},
    {"kind": "429", "reset": 1, "retry_after": 1, "count": 2},
    {"kind": "stall", "seconds": 30, "after": 1000, "count": 1},
    {"kind": "truncate", "after": 1000, "count": 2},
    {"kind": "reset", "count": 2},
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f['kind']}-{f.get('status', '')}" for f in FAULTS])
@pytest.mark.parametrize("cls", ["cdn", "resolve"])
def test_faults_survived_with_correct_bytes(hub, scenarios, tmp_path, fault, cls):
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=60", "stall_timeout=1", "block_size=65536"], env=env) as m:
        h.set_faults(dict(fault, **{"class": cls}))
        t0 = time.monotonic()
        same_tree(m.mnt / "steps" / "000004", sdir / "expected" / "4")
        assert time.monotonic() - t0 < 30
        assert h.stats()["faults_fired"] >= 1


def test_unreachable_source_is_a_clean_eio_within_the_deadline(hub, scenarios, tmp_path):
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=60", "read_timeout=3", "stall_timeout=1", "block_size=65536"],
               env=env) as m:
        f = m.mnt / "model-00001-of-00002.safetensors"
        h.set_faults({"class": "cdn", "kind": "status", "status": 503, "count": 100000})
        h.set_faults({"class": "resolve", "kind": "status", "status": 503, "count": 100000})
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read_all(f)
        took = time.monotonic() - t0
        assert e.value.errno == 5 and took < 15, (e.value, took)
        h.clear_faults()
        assert read_all(f) == (sdir / "expected" / str(info["latest"]) / f.name).read_bytes()
        assert "failed" in m.log()


def test_stalled_cdn_never_hangs_other_readers(hub, scenarios, tmp_path):
    """A stall on one object: its read is retried after the stall timeout,
    and a read of another file is served meanwhile."""
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    exp = sdir / "expected" / str(info["latest"])
    with Mount(uri, tmp_path / "mnt", ["poll=60", "stall_timeout=2", "block_size=65536"], env=env) as m:
        h.set_faults({"class": "cdn", "kind": "stall", "seconds": 60, "count": 1,
                      "match": "model-00001-of-00002"})
        res = {}
        t = threading.Thread(target=lambda: res.update(a=read_all(m.mnt / "model-00001-of-00002.safetensors")))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert read_all(m.mnt / "model-00002-of-00002.safetensors") == (exp / "model-00002-of-00002.safetensors").read_bytes()
        assert time.monotonic() - t0 < 2
        t.join(30)
        assert not t.is_alive() and res["a"] == (exp / "model-00001-of-00002.safetensors").read_bytes()


def test_skipped_step_number_found_by_the_info_probe(hub, scenarios, tmp_path):
    """A step number with nothing changed uploads nothing: the HEAD of the next
    name misses, and the bucket-info probe finds the step after it."""
    h, root = hub
    sdir, info = scenarios["gaps"]
    dst = root / "buckets" / "test" / "live"
    steps = info["steps"]
    env = hf_env(h, tmp_path / "cache")
    ctl("publish", "-", sdir / "expected" / str(steps[0]), dst, "--step", 1, "--format", "anchor", env=env)
    with Mount("hf://buckets/test/live", tmp_path / "mnt", ["poll=1", "info_poll=2", "swap_idle=0.1"], env=env) as m:
        ctl("publish", sdir / "expected" / str(steps[0]), sdir / "expected" / str(steps[1]), dst, "--step", 3, env=env)
        wait_until(lambda: m.status()["step"] == 3, 20, "step 3 after the skipped step 2")


def test_poller_backs_off_and_recovers(hub, scenarios, tmp_path):
    h, root = hub
    sdir, info = scenarios["gaps"]
    dst = root / "buckets" / "test" / "live"
    steps = info["steps"]
    env = hf_env(h, tmp_path / "cache")
    ctl("publish", "-", sdir / "expected" / str(steps[0]), dst, "--step", steps[0], "--format", "anchor", env=env)
    with Mount("hf://buckets/test/live", tmp_path / "mnt", ["poll=1", "swap_idle=0.1", "read_timeout=2"],
               env=env) as m:
        h.set_faults({"class": "resolve", "kind": "status", "status": 502, "count": 100000})
        ctl("publish", sdir / "expected" / str(steps[0]), sdir / "expected" / str(steps[1]), dst, "--step", steps[1],
            env=env)
        wait_until(lambda: m.status()["last_error"], 20, "the poll error in status")
        assert m.status()["step"] == steps[0]
        h.clear_faults()
        wait_until(lambda: m.status()["step"] == steps[1], 30, "recovery")


# ---------------------------------------------------------------- auth

def test_token_sent_to_hub_never_to_cdn_nor_log(tmp_path, scenarios):
    sdir, info = scenarios["v1"]
    root = tmp_path / "hubroot"
    (root / "buckets" / "test").mkdir(parents=True)
    add_bucket(root, "v1", sdir)
    with Hub(str(root), token=TOKEN).start() as h:
        # no token: a clean one-line failure before anything is mounted
        env = hf_env(h, tmp_path / "cache")
        (tmp_path / "m0").mkdir()
        p = subprocess.run([DWSFS, "-f", "hf://buckets/test/v1", str(tmp_path / "m0")], env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0 and "401" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        # the token from a file named by HF_TOKEN_PATH
        tok = tmp_path / "tok"
        tok.write_text(TOKEN + "\n")
        env = dict(env, HF_TOKEN_PATH=str(tok))
        with Mount("hf://buckets/test/v1", tmp_path / "mnt", ["poll=1"], env=env) as m:
            same_tree(m.mnt, sdir / "expected" / str(info["latest"]))
        log = (tmp_path / "mnt.log").read_text()
        assert "mounted hf://buckets/test/v1" in log
        s = h.stats()
        assert s["cdn"] > 0 and s["cdn_auth_seen"] == 0
        # a failing request's message names the object, never the token
        env2 = hf_env(h, tmp_path / "cache2", token="hf_wrong_token_xyz")
        p = ctl("ls", "hf://buckets/test/v1", env=env2, check=False)
        assert p.returncode != 0 and "401" in p.stderr and "hf_wrong_token_xyz" not in p.stderr
        assert TOKEN not in log


# ---------------------------------------------------------------- cache

def test_cache_cap_holds_and_blocks_are_checked(hub, tmp_path):
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    names, tbytes = big_anchor_bucket(dst, tensors=8, mib=2)
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    opts = ["poll=60", "block_size=1048576", "cache_size=4M", f"cache_dir={cache}"]

    def cache_bytes():
        return sum(p.stat().st_size for p in (cache / "blocks").rglob("*.blk"))

    with Mount("hf://buckets/test/big", tmp_path / "mnt", opts, env=env) as m:
        f = m.mnt / "model.safetensors"
        assert read_all(f) == want  # 16 MiB through a 4 MiB cache
        assert cache_bytes() <= 4 * 1024 * 1024 + 4096
        assert read_all(f) == want
        assert cache_bytes() <= 4 * 1024 * 1024 + 4096
    # corrupt every cached block on disk, one in two in its data (its XXH3
    # no longer matches), the others in the trailer's magic: the next mount
    # detects it and refetches
    blocks = sorted((cache / "blocks").rglob("*.blk"))
    assert len(blocks) >= 2
    for i, b in enumerate(blocks):
        raw = bytearray(b.read_bytes())
        assert len(raw) % 4096 == 0, (b, len(raw))  # data, trailer, zeros to 4 KiB
        at = 0 if i % 2 == 0 else raw.rindex(b"DWSBLK3")
        raw[at] ^= 0xFF
        b.write_bytes(bytes(raw))
    (cache / "tmp" / "leftover.partial").write_bytes(b"half a block")
    # a roomier cap this time, so the bad blocks are read rather than evicted
    opts = ["poll=60", "block_size=1048576", "cache_size=64M", f"cache_dir={cache}"]
    with Mount("hf://buckets/test/big", tmp_path / "mnt", opts, env=env) as m:
        with open(m.mnt / "model.safetensors", "rb") as fh:  # the tail first: the blocks still cached
            fh.seek(len(want) - (1 << 20))
            assert fh.read() == want[-(1 << 20):]
        assert read_all(m.mnt / "model.safetensors") == want
        assert "bad on disk" in m.log()
    assert not (cache / "tmp" / "leftover.partial").exists()


def test_readers_of_a_block_in_flight_wait_for_its_one_fetch(hub, tmp_path):
    """Two readers in one block while its fetch is under way (a slow CDN):
    one request reaches the CDN, the second reader waits for it, counted in
    the status (cache_waits, cache_wait_ms), and both get the right bytes."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=8, mib=2)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    env = hf_env(h, tmp_path / "cache")
    bs = 1 << 20
    blk = 5  # in the data, past the header the mount read
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=60", f"block_size={bs}",
                                                           f"cache_dir={tmp_path / 'cache'}"], env=env) as m:
        st0 = m.status()
        assert st0["cache_waits"] == 0 and st0["cache_wait_ms"] == 0, st0
        h.reset_stats()
        # 1 MiB at 2 MiB/s: the block is in flight for about half a second
        h.set_faults({"class": "cdn", "kind": "slow", "rate": 2 * 1024 * 1024, "count": 1})
        got = {}

        def read_at(off):  # O_DIRECT: each read reaches the daemon, not the page cache
            fd = os.open(m.mnt / "model.safetensors", os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)  # page aligned
                assert os.preadv(fd, [buf], off) == 4096
                got[off] = bytes(buf)
            finally:
                os.close(fd)

        offs = (blk * bs, blk * bs + bs // 2)
        first = threading.Thread(target=read_at, args=(offs[0],))
        first.start()
        time.sleep(0.15)
        read_at(offs[1])
        first.join(30)
        assert not first.is_alive()
        for off in offs:
            assert got[off] == want[off:off + 4096], off
        st = m.status()
        block_gets = [r for r in h.stats()["ranges"] if r[1] <= blk * bs < r[2] + 1]
        assert len(block_gets) == 1, h.stats()["ranges"]
        assert st["cache_waits"] >= 1 and st["cache_wait_ms"] >= 100, st


def test_memory_only_cache(hub, tmp_path):
    """cache_size=0: no disk cache. Exact bytes, nothing written under
    cache_dir, and blocks evicted from memory are fetched again."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=8, mib=2)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    opts = ["poll=60", "block_size=1048576", "cache_size=0", f"cache_dir={cache}"]
    with Mount("hf://buckets/test/big", tmp_path / "mnt", opts, env=env) as m:
        f = m.mnt / "model.safetensors"
        assert read_all(f) == want
        first = m.status()["bytes_fetched"]
        # each block fetched once: readahead never runs further ahead than
        # memory holds (it once pushed out its own blocks, fetching 1.6x)
        assert len(want) <= first <= len(want) * 1.05, first
        assert m.status()["cache_unkept_bytes"] == 0  # nothing is meant for the disk
        assert read_mmap(f) == want
    assert not list(cache.rglob("*.blk")), "a block was written to disk"
    # a remount starts from nothing: every block fetched again
    cdn = h.stats()["cdn_bytes"]
    with Mount("hf://buckets/test/big", tmp_path / "mnt", opts, env=env) as m:
        assert read_all(m.mnt / "model.safetensors") == want
    assert h.stats()["cdn_bytes"] - cdn >= len(want) - (1 << 20)


def test_scan_fetches_each_block_once(hub, tmp_path):
    """A loader's scan of a base model's shards (tensors of about a block,
    deltas read beside them) fetches each block once, with the block cache
    in memory only: the readahead never runs further ahead than memory holds,
    and blocks read ahead for nobody age out (it once fetched 1.5x)."""
    h, root = hub
    dst = root / "buckets" / "test" / "model"
    subprocess.run([sys.executable, str(REPO / "tests" / "bench" / "make_model.py"), str(dst), "--params", "12e6",
                    "--deltas", "2", "--base"], check=True, stdout=subprocess.DEVNULL)
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    shards = sorted(p.name for p in (dst / "base").glob("*.safetensors"))
    size = sum((dst / "base" / n).stat().st_size for n in shards)
    ext = tmp_path / "ext"
    ctl("extract", "hf://buckets/test/model", ext, env=env)
    for opts in (["cache_size=0"], []):
        with Mount("hf://buckets/test/model", tmp_path / "mnt", ["poll=60", "block_size=262144",
                                                                 f"cache_dir={cache}"] + opts, env=env) as m:
            before = m.status()["bytes_fetched"]
            h.reset_stats()
            for n in shards:
                assert read_all(m.mnt / n) == read_all(ext / n), n
            fetched = m.status()["bytes_fetched"]
            seen = collections.Counter((r[0], r[1]) for r in h.stats()["ranges"])
            again = sorted(k for k, v in seen.items() if v > 1)  # fetched twice: named in a failure
            # the shards' bytes and a few blocks straddling their ends (it
            # was 5-7 blocks more in memory: a block the reader was in the
            # middle of went for blocks read ahead of it)
            assert fetched - before <= size + 4 * 262144, (opts, before, fetched, size, again)
        shutil.rmtree(cache, ignore_errors=True)


def test_cache_reused_across_remounts_and_keyed_by_content(hub, scenarios, tmp_path):
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, dst = add_bucket(root, "v1", sdir)
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    exp = sdir / "expected" / str(info["latest"])
    with Mount(uri, tmp_path / "mnt", ["poll=60", f"cache_dir={cache}"], env=env) as m:
        same_tree(m.mnt, exp)
        st = m.status()
        assert st["cache_unkept_bytes"] == 0 and st["cache_bytes"] > 0, st  # a few blocks: all kept
    h.reset_stats()
    with Mount(uri, tmp_path / "mnt", ["poll=60", f"cache_dir={cache}"], env=env) as m:
        same_tree(m.mnt, exp)
    assert h.stats()["cdn_bytes"] < 100 * 1024, h.stats()["cdn_bytes"]
    # rewrite the last delta with other content of the same name: never stale
    last = max(dst.glob("deltas/*"))
    shutil.copy2(sdir / "bucket" / "deltas" / "step_000011.safetensors", last)
    # step 11's delta as step 12: a delta relative to 11 applied to 11 again
    out = tmp_path / "after"
    ctl("extract", uri, out, "--step", info["latest"], env=env)
    assert read_all(out / "model-00001-of-00002.safetensors") == (sdir / "expected" / "11" /
                                                                   "model-00001-of-00002.safetensors").read_bytes()


# ---------------------------------------------------------------- s3

@pytest.fixture
def s3(tmp_path):
    with s3rver_running(tmp_path, 20000 + os.getpid() % 20000) as ep:
        yield ep


def s3_put_tree(ep, src, prefix):
    for dirpath, _, files in os.walk(src):
        for name in files:
            f = Path(dirpath) / name
            key = f"{prefix}/{f.relative_to(src)}"
            subprocess.run(["curl", "-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3", "-u", "S3RVER:S3RVER",
                            "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", str(f), f"{ep}/grpo/{key}"],
                           check=True, timeout=60)


def s3_env(ep, cache):
    return dict(os.environ, AWS_ENDPOINT_URL=ep, AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
                AWS_REGION="us-east-1", DWSFS_CACHE_DIR=str(cache))


def test_s3_extract_and_mount(s3, scenarios, tmp_path):
    sdir, info = scenarios["v1"]
    s3_put_tree(s3, sdir / "bucket", "run1")
    env = s3_env(s3, tmp_path / "cache")
    for step in info["steps"][::4] + [info["latest"]]:
        out = tmp_path / f"out{step}"
        ctl("extract", "s3://grpo/run1", out, "--step", step, env=env)
        assert dwsref.diff_folders(out, sdir / "expected" / str(step)) is None, step
    with Mount("s3://grpo/run1", tmp_path / "mnt", ["poll=1"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]), read_mmap)
        assert m.status()["s3_requests"] > 0
    # s3rver checks the access key (not the signature): a wrong one is a 403
    bad = dict(env, AWS_ACCESS_KEY_ID="NOBODY", AWS_SECRET_ACCESS_KEY="not-the-secret-xyz",
               DWSFS_CACHE_DIR=str(tmp_path / "cache-bad"))
    p = ctl("ls", "s3://grpo/run1", env=bad, check=False)
    assert p.returncode != 0 and "403" in p.stderr and "not-the-secret-xyz" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- quotas

def test_polling_budget(hub, scenarios, tmp_path):
    """An idle mount polls with one resolver HEAD a poll and one API call an
    info_poll, nothing else: the calls-per-minute figures of docs/remote.md. Measured
    here with short intervals (1 s, 4 s) and scaled by the test."""
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    with Mount(uri, tmp_path / "mnt", ["poll=1", "info_poll=4"], env=env) as m:
        time.sleep(1.5)  # start-up done
        h.reset_stats()
        t0 = time.monotonic()
        time.sleep(12)
        s = h.stats()
        took = time.monotonic() - t0
        assert m.status()["step"] == info["latest"]
    polls, infos = took / 1.0, took / 4.0
    assert s["resolve"] <= polls + 1, s   # one HEAD of the next delta name a poll
    assert s["head"] == s["resolve"], s   # and nothing else goes to the resolver
    assert s["api"] <= infos + 1, s       # one bucket-info probe an info_poll
    assert s["cdn"] == 0, s               # an idle mount downloads nothing


def test_tls_verified_and_ca_file(tmp_path, scenarios):
    """Over https the certificate is always checked: a Hub whose CA is unknown is
    refused at start-up with one line; with ca_file naming its CA it serves."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=dwsfs-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2"],
                   check=True, capture_output=True, timeout=60)
    root = tmp_path / "hubroot"
    (root / "buckets" / "test").mkdir(parents=True)
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    exp = sdir / "expected" / str(info["latest"])
    with Hub(str(root), tls=(str(cert), str(key))).start() as h:
        assert h.endpoint.startswith("https://") and h.cdn.startswith("https://")
        env = hf_env(h, tmp_path / "cache")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        t0 = time.monotonic()
        p = subprocess.run([DWSFS, "-f", uri, str(mnt), "-o", "poll=60"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        assert "certificate" in p.stderr.lower(), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert time.monotonic() - t0 < 60
        assert not os.path.ismount(mnt)
        with Mount(uri, mnt, ["poll=60", f"ca_file={cert}"], env=env) as m:
            same_tree(m.mnt, exp)
            assert m.status()["cdn_requests"] > 0
