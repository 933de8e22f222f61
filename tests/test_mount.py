"""The FUSE mount end to end: dwsfs serves the oracle's bytes at the root and
in steps/N, follows a live bucket, refuses broken steps, keeps open handles on
their step, gives a loader a consistent model under swaps, survives concurrent
readers, shuts down cleanly and reports start-up errors in one line.

Every wait has a deadline and every loop a bound in count and time; the daemon
runs under mountutil.mounted(), which always unmounts and reaps it and fails
the test on a bad exit status or an undeclared error line in its log."""
import errno
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import dwsgen as g
import dwsref
from mountutil import (ASAN, DWSFS, EXIT_TIMEOUT, MOUNT_TIMEOUT, SLOW, daemon_cmd, daemon_env, is_stale, ismount,
                       mmap_read, mounted, mounts_at, read_file, read_status, unmount, wait_until)

POLL = 1                                   # -o poll= of the live tests (seconds)
STEP_DEADLINE = (POLL + 5) * SLOW          # a published step must be served within this
LIVE = ("poll=%d" % POLL, "swap_idle=0.2")
STATUS_FIELDS = {"step", "anchor", "chain_length", "bucket", "last_poll", "latest_step", "lag_steps",
                 "pending_step", "steps", "swaps", "root_open_handles", "bytes_fetched", "cache_hits",
                 "cache_misses", "last_error"}
META_ENTRIES = {"steps", ".dwsfs"}


@pytest.fixture(scope="session")
def dwsfs():
    if not (os.path.isfile(DWSFS) and os.access(DWSFS, os.X_OK)):
        pytest.skip(f"dwsfs not built: no executable {DWSFS} (build it or set DWSFS)")
    return DWSFS


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path):
    yield
    # mounted() unmounts; this catches a test that mounted by hand and failed
    left = [p for p in tmp_path.iterdir() if ismount(p)]
    for p in left:
        while ismount(p) and unmount(p).returncode == 0:
            pass
    assert not left, f"left mounted: {left}"


# ---------------------------------------------------------------- helpers

def run(*cmd, check=True, timeout=120):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stderr}")
    return p


def mount_opts(info):
    """-o options equivalent to the scenario's extract args."""
    a, out = info["extract_args"], []
    for i in range(0, len(a), 2):
        if a[i] == "--base":
            out.append("base=" + a[i + 1])
        elif a[i] == "--map-prefix":
            out.append("map_prefix=" + a[i + 1])
        else:
            raise AssertionError(f"unknown extract arg {a[i]}")
    return out


def listing(d, top_exclude=()):
    """Relative paths of the files under d (directories at the top named in
    top_exclude left out). A directory that cannot be listed fails the walk
    (os.walk would skip it and give an empty listing)."""
    def fail(e):
        raise e
    out = []
    for root, dirs, files in os.walk(d, onerror=fail):
        if root == str(d):
            dirs[:] = [x for x in dirs if x not in top_exclude]
        out += [os.path.relpath(os.path.join(root, f), d) for f in files]
    return sorted(out)


def tensors(blob, what="file"):
    """{name: (dtype, shape, bytes)}, layout ignored."""
    header, _, start = dwsref.parse(blob, what)
    return {n: (e["dtype"], e["shape"], blob[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
            for n, e in header.items()}


def first_diff(got, want):
    if got == want:
        return None
    n = min(len(got), len(want))
    i = next((k for k in range(n) if got[k] != want[k]), n)
    return f"first difference at byte {i}, sizes {len(got)} vs {len(want)}"


def check_folder(mnt_dir, expected_dir, top_exclude=(), mmap_too=True):
    """Every file under mnt_dir equals expected_dir's, with read() and mmap()."""
    got, want = listing(mnt_dir, top_exclude), listing(expected_dir)
    assert got == want, f"{mnt_dir}: files {got}, expected {want}"
    for rel in want:
        ref = read_file(os.path.join(expected_dir, rel))
        path = os.path.join(mnt_dir, rel)
        problem = first_diff(read_file(path), ref)
        assert problem is None, f"{path} (read): {problem}"
        if mmap_too:
            problem = first_diff(mmap_read(path), ref)
            assert problem is None, f"{path} (mmap): {problem}"


def publish(dwsctl, prev, nxt, bucket, step, fmt="gap_delta", extra=()):
    if fmt == "anchor":
        prev = "-"
    run(dwsctl, "publish", prev, nxt, bucket, "--step", step, "--format", fmt, *extra)


def step_file(bucket, step):
    for folder in ("anchors", "deltas"):
        for suffix in ("", ".zst"):
            p = Path(bucket) / folder / f"step_{step:06d}.safetensors{suffix}"
            if p.exists():
                return p
    raise FileNotFoundError(f"no file for step {step} in {bucket}")


def metadata(path):
    blob = Path(path).read_bytes()
    return json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")]).get("__metadata__", {})


def install(path, blob):
    """Put a file into a bucket the way a producer does: temp name, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.test"
    tmp.write_bytes(blob)
    os.rename(tmp, path)


def publish_staged(dwsctl, prev, nxt, bucket, step, fmt, mutate, tmp):
    """Publish into a copy of the bucket, pass the new file's bytes through
    mutate() and install the result into the real bucket atomically."""
    stage = Path(tmp) / f"stage{step}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(bucket, stage, ignore=shutil.ignore_patterns("base"))
    publish(dwsctl, prev, nxt, stage, step, fmt)
    f = step_file(stage, step)
    install(Path(bucket) / f.parent.name / f.name, mutate(f.read_bytes()))
    shutil.rmtree(stage)


def root_no_base(bucket, expected, step):
    """What model.safetensors at step `step` must be for a bucket without a base
    that was published with dwsctl: the latest complete anchor's file, layout
    and metadata as is, with every tensor's data from the oracle."""
    anchors = sorted((int(p.name[5:11]), p) for p in (Path(bucket) / "anchors").glob("step_*.safetensors"))
    _, anchor = max((s, p) for s, p in anchors if s <= step)
    want = tensors(read_file(expected / str(step) / "model.safetensors"))
    return g.replace_tensor_data(anchor.read_bytes(), {n: t[2] for n, t in want.items()})


def xattr(path, name):
    return os.getxattr(path, name).decode()


def in_thread(fn, timeout, what):
    """Run fn() in a daemon thread; its result, its exception re-raised, or a
    failure if it does not finish within `timeout` (a hang fails the test)."""
    box = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not return within {timeout:.1f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------- 1. static buckets

@pytest.mark.parametrize("name", ["v1", "v3gap", "zstd", "prefix"])
def test_mount_serves_oracle(dwsfs, scenarios, tmp_path, name):
    """Root = latest step, steps/N = step N, byte for byte with read() and
    mmap(); steps/ lists exactly the steps; status and xattrs agree."""
    root, info = scenarios[name]
    expected, latest = root / "expected", info["latest"]
    with mounted(info["bucket"], tmp_path / "mnt", *mount_opts(info)) as m:
        st = m.status()
        assert STATUS_FIELDS <= st.keys(), f"missing status fields {STATUS_FIELDS - st.keys()}"
        assert st["step"] == st["latest_step"] == latest, st
        assert st["lag_steps"] == 0 and st["pending_step"] is None and st["last_error"] is None, st
        assert st["steps"] == len(info["steps"]) and st["bucket"] == info["bucket"], st
        assert isinstance(st["last_poll"], str) and st["anchor"] <= latest and st["chain_length"] >= 0, st

        assert set(os.listdir(m.mnt)) == set(os.listdir(expected / str(latest))) | META_ENTRIES
        assert sorted(os.listdir(m.path(".dwsfs"))) == ["patches", "status"]
        assert sorted(os.listdir(m.path("steps"))) == ["%06d" % s for s in info["steps"]]

        check_folder(m.mnt, expected / str(latest), top_exclude=META_ENTRIES)
        for s in info["steps"]:
            check_folder(m.path("steps", "%06d" % s), expected / str(s))

        some = sorted(os.listdir(expected / str(latest)))[0]
        assert xattr(m.path(some), "user.dwsfs.step") == str(latest)
        assert int(xattr(m.path(some), "user.dwsfs.anchor")) == st["anchor"]
        assert {"user.dwsfs.step", "user.dwsfs.anchor"} <= set(os.listxattr(m.path(some)))
        for s in info["steps"]:
            f = m.path("steps", "%06d" % s, some)
            assert xattr(f, "user.dwsfs.step") == str(s)
            assert int(xattr(f, "user.dwsfs.anchor")) <= s
        with pytest.raises(OSError) as e:
            os.getxattr(m.path(some), "user.dwsfs.nope")
        assert e.value.errno == errno.ENODATA

        # read-only, no such names
        with pytest.raises(OSError) as e:
            open(m.path(some), "r+b")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        for bad in ("steps/%06d" % (latest + 1000), "steps/1", "nope.json"):
            assert not os.path.exists(m.path(bad)), bad


# ---------------------------------------------------------------- 2. live publishing

def test_live_publishing(dwsfs, dwsctl, scenarios, tmp_path):
    """Steps published one by one while mounted are each served within
    poll + 5 s, with the oracle's bytes, and show in steps/."""
    root, info = scenarios["gaps"]
    expected, steps = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(steps[0]), bucket, steps[0], "anchor")
    formats = ["gap_delta", "raw", "v1", "gap_delta"]
    latencies = {}
    with mounted(bucket, tmp_path / "mnt", *LIVE) as m:
        assert m.status()["step"] == steps[0]
        assert read_file(m.path("model.safetensors")) == root_no_base(bucket, expected, steps[0])
        for i, (prev, s) in enumerate(zip(steps, steps[1:])):
            fmt = formats[i % len(formats)]
            extra = ["--zstd"] if i % 3 == 2 else []
            if s == 10:  # an anchor in the middle, as a trainer writes every N steps
                fmt, extra = "anchor", []
            t0 = time.monotonic()
            publish(dwsctl, expected / str(prev), expected / str(s), bucket, s, fmt, extra)
            m.wait_step(s, STEP_DEADLINE)
            latencies[s] = time.monotonic() - t0
            got = read_file(m.path("model.safetensors"))
            assert tensors(got) == tensors(read_file(expected / str(s) / "model.safetensors")), f"step {s}"
            assert got == root_no_base(bucket, expected, s), f"step {s}: {first_diff(got, root_no_base(bucket, expected, s))}"
            assert "%06d" % s in os.listdir(m.path("steps"))
            assert xattr(m.path("model.safetensors"), "user.dwsfs.step") == str(s)
            want_sum = metadata(step_file(bucket, s)).get("dwsfs.state_xxh3") if not extra else None
            if want_sum:
                assert xattr(m.path("model.safetensors"), "user.dwsfs.state_xxh3") == want_sum
            st = m.status()
            assert st["latest_step"] == s and st["lag_steps"] == 0 and st["last_error"] is None, st
        assert sorted(os.listdir(m.path("steps"))) == ["%06d" % s for s in steps]
        assert m.status()["swaps"] == len(steps) - 1
        # every step, old ones included, still reads right in steps/N
        for s in steps:
            got = read_file(m.path("steps", "%06d" % s, "model.safetensors"))
            assert got == root_no_base(bucket, expected, s), f"steps/{s}"
        # and the mount agrees with dwsctl extract of the same bucket
        run(dwsctl, "extract", bucket, tmp_path / "out")
        assert read_file(m.path("model.safetensors")) == read_file(tmp_path / "out" / "model.safetensors")
    print("publish -> served latency (s):", {s: round(v, 2) for s, v in latencies.items()})
    assert max(latencies.values()) < STEP_DEADLINE


# ---------------------------------------------------------------- 3. broken steps

def test_broken_steps_are_refused(dwsfs, dwsctl, scenarios, tmp_path):
    """A delta with a corrupted payload, then a truncated one: each is refused
    (status last_error), the previous step stays served, and the next anchor
    (the chain past a broken step stays broken until one) is served again."""
    root, info = scenarios["gaps"]
    expected = root / "expected"
    s = info["steps"]  # 1, 2, 3, 5, 6, 9, 10, 13
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")

    def flip(blob):
        b = bytearray(blob)
        for k in (1, 2, 100):        # payload bytes near the end
            b[-k] ^= 0x5A
        return bytes(b)

    def cut(blob):
        return blob[:len(blob) * 2 // 3]

    def wait_refused(m, step, served):
        wait_until(lambda: f"step {step} refused" in m.log(), STEP_DEADLINE,
                   f"step {step} to be refused (log:\n{m.log()})")
        st = wait_until(lambda: (lambda j: j if j["last_error"] else None)(m.status()), 5 * SLOW,
                        "last_error in the status")
        assert st["step"] == served and st["pending_step"] is None, st
        assert read_file(m.path("model.safetensors")) == root_no_base(bucket, expected, served)
        assert xattr(m.path("model.safetensors"), "user.dwsfs.step") == str(served)
        # polls go on; the refused step is not retried into the root
        time.sleep(POLL * 1.5)
        assert m.status()["step"] == served
        return st

    allowed = [rf"step {s[2]} refused: .*checksum", rf"step {s[4]} refused: ",
               rf"steps/{s[2]:06d}: ", rf"steps/{s[4]:06d}: "]
    with mounted(bucket, tmp_path / "mnt", *LIVE, allowed_errors=allowed) as m:
        publish(dwsctl, expected / str(s[0]), expected / str(s[1]), bucket, s[1])
        m.wait_step(s[1], STEP_DEADLINE)

        publish_staged(dwsctl, expected / str(s[1]), expected / str(s[2]), bucket, s[2], "gap_delta", flip, tmp_path)
        st = wait_refused(m, s[2], s[1])
        assert "checksum" in st["last_error"], st
        # a refused step cannot be opened either
        with pytest.raises(OSError) as e:
            in_thread(lambda: os.listdir(m.path("steps", "%06d" % s[2])), 5 * SLOW, "listdir of a refused step")
        assert e.value.errno in (errno.EIO, errno.ENOENT)

        publish(dwsctl, None, expected / str(s[3]), bucket, s[3], "anchor")
        m.wait_step(s[3], STEP_DEADLINE)
        assert m.status()["last_error"] is None
        assert read_file(m.path("model.safetensors")) == root_no_base(bucket, expected, s[3])

        publish_staged(dwsctl, expected / str(s[3]), expected / str(s[4]), bucket, s[4], "gap_delta", cut, tmp_path)
        wait_refused(m, s[4], s[3])

        publish(dwsctl, None, expected / str(s[5]), bucket, s[5], "anchor")
        m.wait_step(s[5], STEP_DEADLINE)
        publish(dwsctl, expected / str(s[5]), expected / str(s[6]), bucket, s[6])
        m.wait_step(s[6], STEP_DEADLINE)
        assert read_file(m.path("model.safetensors")) == root_no_base(bucket, expected, s[6])
        assert m.status()["last_error"] is None


# ---------------------------------------------------------------- 4. open handles

def test_open_handle_keeps_its_step(dwsfs, dwsctl, scenarios, tmp_path):
    """A root file opened before a swap reads the old step to the end, through
    the page cache (dropped) and with O_DIRECT; a new open reads the new step."""
    root, info = scenarios["gaps"]
    expected = root / "expected"
    s0, s1, s2 = info["steps"][:3]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s0), bucket, s0, "anchor")
    old = root_no_base(bucket, expected, s0)
    with mounted(bucket, tmp_path / "mnt", *LIVE, "swap_max_delay=1") as m:
        path = m.path("model.safetensors")
        fd = os.open(path, os.O_RDONLY)
        fd_direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            head = os.read(fd, 1000)
            # O_DIRECT reads into page-aligned buffers (a root file passed
            # through to its materialized file follows the local filesystem's
            # O_DIRECT rules)
            abuf = mmap.mmap(-1, 65536)
            read_direct = lambda n: abuf[:os.readv(fd_direct, [memoryview(abuf)[:n]])]
            head_direct = read_direct(4096)
            assert m.status()["root_open_handles"] == 2
            publish(dwsctl, expected / str(s0), expected / str(s1), bucket, s1)
            m.wait_step(s1, STEP_DEADLINE + 1)
            assert "after swap_max_delay" in m.log()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            rest = b"".join(iter(lambda: os.read(fd, 65536), b""))
            rest_direct = b"".join(iter(lambda: read_direct(65536), b""))
            assert first_diff(head + rest, old) is None, first_diff(head + rest, old)
            assert first_diff(head_direct + rest_direct, old) is None
            assert os.pread(fd, len(old), 0) == old
            assert xattr(path, "user.dwsfs.step") == str(s1)
            new = root_no_base(bucket, expected, s1)
            assert new != old
            assert read_file(path) == new
            assert mmap_read(path) == new
            # the old handles still count as the root's (they are root files);
            # the release of the mmap'd file above arrives asynchronously
            wait_until(lambda: m.status()["root_open_handles"] == 2, 5 * SLOW, "root_open_handles back to 2")
        finally:
            os.close(fd)
            os.close(fd_direct)
        wait_until(lambda: m.status()["root_open_handles"] == 0, 5 * SLOW, "root_open_handles to drop to 0")
        # the old step is still reachable under steps/
        assert read_file(m.path("steps", "%06d" % s0, "model.safetensors")) == old
        publish(dwsctl, expected / str(s1), expected / str(s2), bucket, s2)
        m.wait_step(s2, STEP_DEADLINE)
        assert "after swap_max_delay" not in m.log().split(f"serves step {s2}")[-1]


# ---------------------------------------------------------------- 5. consistency under load

def test_loader_sees_one_step(dwsfs, dwsctl, scenarios, tmp_path):
    """A loader reading every shard in turn, over and over, while steps are
    published and swapped in: each pass sees all shards from one step."""
    root, info = scenarios["v1"]
    expected, steps = root / "expected", info["steps"][:11]      # anchor + 10 deltas
    bucket = tmp_path / "bucket"
    shutil.copytree(Path(info["bucket"]) / "base", bucket / "base")
    publish(dwsctl, None, expected / str(steps[0]), bucket, steps[0], "anchor")
    shards = sorted(p for p in os.listdir(expected / str(steps[0])) if p.endswith(".safetensors"))
    assert len(shards) == 2
    oracle = {sh: {s: read_file(expected / str(s) / sh) for s in steps} for sh in shards}

    stop = threading.Event()
    passes, problems = [], []
    deadline = time.monotonic() + 60 * SLOW
    rng = random.Random(5)

    def loader(mnt):
        try:
            while not stop.is_set() and len(passes) < 400 and time.monotonic() < deadline:
                seen = []
                for sh in shards:
                    with open(os.path.join(mnt, sh), "rb") as f:
                        blob = f.read()
                    cands = {s for s, b in oracle[sh].items() if b == blob}
                    if not cands:
                        problems.append(f"pass {len(passes)}: {sh} matches no step")
                    seen.append(cands)
                common = set.intersection(*seen)
                passes.append(min(common) if common else None)
                if not common:
                    problems.append(f"pass {len(passes) - 1}: shards from different steps: "
                                    + ", ".join(f"{sh} {sorted(c)}" for sh, c in zip(shards, seen)))
                # back to back (no swap may come between), or idle past swap_idle so a
                # swap lands between passes (well before the next one: waking right at
                # the swap is test_loader_waking_at_swap_time_sees_one_step)
                time.sleep(rng.choice([0, 0, rng.uniform(0.36, 0.45)]))
        except Exception as e:  # noqa: BLE001 - reported below
            problems.append(f"loader: {e!r}")

    with mounted(bucket, tmp_path / "mnt", "poll=1", "swap_idle=0.3") as m:
        t = threading.Thread(target=loader, args=(m.mnt,), daemon=True)
        t.start()
        try:
            for prev, s in zip(steps, steps[1:]):
                publish(dwsctl, expected / str(prev), expected / str(s), bucket, s)
                m.wait_step(s, STEP_DEADLINE + 2)
                if problems or time.monotonic() > deadline:
                    break
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(10 * SLOW)
        assert not t.is_alive(), "the loader hangs"
        assert not problems, "\n".join(problems[:10])
        check_folder(m.mnt, expected / str(steps[-1]), top_exclude=META_ENTRIES, mmap_too=False)
    served = sorted({p for p in passes if p is not None})
    print(f"loader: {len(passes)} passes over steps {served}")
    assert len(served) >= 4, f"the loader saw too few steps to mean anything: {served}"


def test_loader_waking_at_swap_time_sees_one_step(dwsfs, dwsctl, scenarios, tmp_path):
    """The loader of test_loader_sees_one_step, idling exactly swap_idle
    between passes so that it starts a pass right when the daemon swaps. The
    base folder holds 3000 extra small files named between the two shards:
    legal, and it makes the daemon's invalidation of the root entries (one
    notification per name) take long enough for the race to show at once."""
    root, info = scenarios["v1"]
    expected = root / "expected"
    s_a, s_b = info["steps"][:2]
    bucket = tmp_path / "bucket"
    shutil.copytree(Path(info["bucket"]) / "base", bucket / "base")
    shards = sorted(p for p in os.listdir(expected / str(s_a)) if p.endswith(".safetensors"))
    for i in range(3000):
        (bucket / "base" / f"{shards[0]}.part{i:05d}").write_bytes(b"x")
    publish(dwsctl, None, expected / str(s_a), bucket, 1, "anchor")
    oracle = {sh: {s: read_file(expected / str(s) / sh) for s in (s_a, s_b)} for sh in shards}
    idle = 0.3
    stop = threading.Event()
    problems, passes = [], [0]
    deadline = time.monotonic() + 30 * SLOW

    def loader(mnt):
        rng = random.Random(1)
        try:
            while not stop.is_set() and passes[0] < 300 and time.monotonic() < deadline:
                seen = []
                for sh in shards:
                    with open(os.path.join(mnt, sh), "rb") as f:
                        blob = f.read()
                    seen.append({s for s, b in oracle[sh].items() if b == blob})
                passes[0] += 1
                if not set.intersection(*seen):
                    problems.append(f"pass {passes[0]}: " + ", ".join(f"{sh} from {sorted(c)}" for sh, c in zip(shards, seen)))
                time.sleep(idle + rng.uniform(0, 0.004))
        except Exception as e:  # noqa: BLE001 - reported below
            problems.append(f"loader: {e!r}")

    with mounted(bucket, tmp_path / "mnt", "poll=1", f"swap_idle={idle}") as m:
        t = threading.Thread(target=loader, args=(m.mnt,), daemon=True)
        t.start()
        try:
            cur = s_a
            for step in range(2, 10):          # 8 swaps, alternating between two states
                nxt = s_b if cur == s_a else s_a
                publish(dwsctl, expected / str(cur), expected / str(nxt), bucket, step)
                cur = nxt
                m.wait_step(step, STEP_DEADLINE + 2)
                if problems or time.monotonic() > deadline:
                    break
        finally:
            stop.set()
            t.join(10 * SLOW)
        assert not t.is_alive(), "the loader hangs"
    assert not problems, "\n".join(problems[:5])


# ---------------------------------------------------------------- 6. concurrent readers

def test_concurrent_random_reads(dwsfs, scenarios, tmp_path):
    """8 threads reading random ranges of root and steps/N files (more steps
    than max_steps keeps, so views are evicted and rebuilt under load)."""
    root, info = scenarios["v1"]
    expected, latest = root / "expected", info["latest"]
    files = []
    for rel in listing(expected / str(latest)):
        files.append((rel, expected / str(latest) / rel))
    for s in info["steps"]:
        for rel in listing(expected / str(s)):
            files.append((os.path.join("steps", "%06d" % s, rel), expected / str(s) / rel))
    want = {rel: read_file(p) for rel, p in files}
    errors = []
    deadline = time.monotonic() + 30 * SLOW

    with mounted(info["bucket"], tmp_path / "mnt", "max_steps=3") as m:
        def reader(seed):
            rng = random.Random(seed)
            fds = {}
            try:
                for _ in range(150):
                    if time.monotonic() > deadline:
                        break
                    rel = rng.choice(list(want))
                    data = want[rel]
                    if rel not in fds or rng.random() < 0.3:
                        if rel in fds:
                            os.close(fds.pop(rel))
                        fds[rel] = os.open(m.path(rel), os.O_RDONLY)
                    off = rng.randrange(len(data) + 1)
                    n = rng.choice([1, 7, 4096, 65536, 200000])
                    got = os.pread(fds[rel], n, off)
                    if got != data[off:off + n]:
                        errors.append(f"{rel} [{off}, +{n}): {first_diff(got, data[off:off + n])}")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {seed}: {e!r}")
            finally:
                for fd in fds.values():
                    os.close(fd)

        threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
        assert not any(t.is_alive() for t in threads), "a reader hangs"
        assert not errors, "\n".join(errors[:10])
        # (the kernel sends RELEASE asynchronously after close)
        wait_until(lambda: m.status()["root_open_handles"] == 0, 5 * SLOW, "root_open_handles to drop to 0")


# ---------------------------------------------------------------- 7. shutdown

def test_lazy_unmount_with_open_file(dwsfs, scenarios, tmp_path):
    """fusermount3 -u -z with a file open: the mount goes away at once, the
    open file still reads right, and the daemon exits 0 once it is closed."""
    root, info = scenarios["v1"]
    latest = info["latest"]
    name = "model-00001-of-00002.safetensors"
    want = read_file(root / "expected" / str(latest) / name)
    # through the daemon (test_passthrough has the passed-through case)
    with mounted(info["bucket"], tmp_path / "mnt", "materialize_max=0") as m:
        f = open(m.path(name), "rb")
        fd_direct = os.open(m.path(name), os.O_RDONLY | os.O_DIRECT)
        try:
            head = f.read(100)
            unmount(m.mnt, check=True)
            assert not ismount(m.mnt)
            assert head + f.read() == want
            # the daemon still answers (O_DIRECT: not from the page cache)
            assert os.pread(fd_direct, 5000, 1000) == want[1000:6000]
            assert m.proc.poll() is None
        finally:
            f.close()
            os.close(fd_direct)
        rc = m.wait_exit(EXIT_TIMEOUT)
        assert rc == 0, f"dwsfs exit status {rc} after the unmount:\n{m.log()}"
        assert "unmounted" in m.log()


def test_lazy_unmount_idle(dwsfs, scenarios, tmp_path):
    root, info = scenarios["v1"]
    with mounted(info["bucket"], tmp_path / "mnt") as m:
        os.listdir(m.mnt)
        unmount(m.mnt, check=True)
        assert m.wait_exit(EXIT_TIMEOUT) == 0, m.log()
        assert not ismount(m.mnt)


def test_sigterm(dwsfs, scenarios, tmp_path):
    root, info = scenarios["v1"]
    with mounted(info["bucket"], tmp_path / "mnt") as m:
        os.listdir(m.mnt)
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait_exit(EXIT_TIMEOUT) == 0, m.log()
        assert not ismount(m.mnt) and not is_stale(m.mnt)
        assert os.listdir(m.mnt) == []


def test_kill9_then_remount(dwsfs, scenarios, tmp_path):
    """A daemon killed with -9 leaves a stale mount (ENOTCONN); a new dwsfs on
    the same directory cleans it and serves the right bytes."""
    root, info = scenarios["v1"]
    latest = info["latest"]
    mnt = tmp_path / "mnt"
    with mounted(info["bucket"], mnt, expect_returncode=-signal.SIGKILL) as m:
        os.listdir(m.mnt)
        m.proc.send_signal(signal.SIGKILL)
        assert m.wait_exit(EXIT_TIMEOUT) == -signal.SIGKILL
        # (the kernel answers stat from its attribute cache for up to 1 s)
        wait_until(lambda: is_stale(m.mnt), 3 * SLOW, "os.stat of the mountpoint to fail with ENOTCONN")
        with mounted(info["bucket"], mnt) as m2:
            assert "stale mount" in m2.log()
            check_folder(m2.mnt, root / "expected" / str(latest), top_exclude=META_ENTRIES)
            assert m2.status()["step"] == latest
        assert not ismount(mnt) and not is_stale(mnt)


def test_kill9_then_immediate_remount(dwsfs, scenarios, tmp_path):
    """The same, restarting at once (a supervisor restarting a crashed daemon):
    the stale mount must be cleaned, not buried under the new one."""
    root, info = scenarios["v1"]
    latest = info["latest"]
    mnt = tmp_path / "mnt"
    with mounted(info["bucket"], mnt, expect_returncode=-signal.SIGKILL) as m:
        os.listdir(m.mnt)
        m.proc.send_signal(signal.SIGKILL)
        assert m.wait_exit(EXIT_TIMEOUT) == -signal.SIGKILL
        with mounted(info["bucket"], mnt) as m2:
            check_folder(m2.mnt, root / "expected" / str(latest), top_exclude=META_ENTRIES, mmap_too=False)
            mounts = mounts_at(mnt)
            assert len(mounts) == 1, "mounted on top of the stale mount:\n" + "".join(mounts)
        assert not ismount(mnt) and not is_stale(mnt)


# ---------------------------------------------------------------- ASan-only: handle lifetimes

asan_only = pytest.mark.skipif(not ASAN, reason="only an ASan build of dwsfs shows this")


@asan_only
def test_asan_reply_buffer_outlives_release(dwsfs, scenarios, tmp_path):
    """Directory listings and status reads must not reply from a buffer that
    the release of the same handle can free: the kernel completes the request
    inside writev(), the caller's close() makes another thread run the
    release, and ASan's writev interceptor reads the iovec after that."""
    root, info = scenarios["v1"]
    with mounted(info["bucket"], tmp_path / "mnt") as m:
        deadline = time.monotonic() + 20
        errors = []

        def work():     # 8 at once: a replying thread gets preempted after writev()
            try:
                for _ in range(200):
                    if time.monotonic() > deadline or m.proc.poll() is not None:
                        break
                    os.listdir(m.mnt)
                    read_status(m.mnt)
            except OSError as e:
                errors.append(e)
        threads = [threading.Thread(target=work, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert m.proc.poll() is None and not errors, f"{errors[:1]}\n{m.log()}"


@asan_only
def test_asan_no_leak_with_file_open_at_unmount(dwsfs, scenarios, tmp_path):
    """Handles whose release never comes (a file open across a lazy unmount)
    are freed when the session ends: LeakSanitizer stays quiet."""
    root, info = scenarios["v1"]
    with mounted(info["bucket"], tmp_path / "mnt") as m:
        with open(m.path("config.json"), "rb") as f:   # closed last: its release is lost
            f.read(10)
            unmount(m.mnt, check=True)
        assert m.wait_exit(EXIT_TIMEOUT) == 0, m.log()


# ---------------------------------------------------------------- 8. start-up errors

def start_failure(bucket, mnt, *opts):
    os.makedirs(mnt, exist_ok=True)
    try:
        p = subprocess.run(daemon_cmd(bucket, mnt, opts), capture_output=True, text=True,
                           timeout=MOUNT_TIMEOUT, env=daemon_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        unmount(mnt)
        pytest.fail(f"dwsfs {bucket} {opts} did not fail: it is still running after {MOUNT_TIMEOUT:.0f} s")
    was_mounted = ismount(mnt)
    if was_mounted:
        unmount(mnt)
    assert not was_mounted, f"{mnt} is mounted after a failed start"
    assert p.returncode > 0, f"exit status {p.returncode}, expected a failure:\n{p.stderr}"
    assert not any(x in p.stderr for x in ("AddressSanitizer", "LeakSanitizer", "runtime error")), p.stderr
    return p


@pytest.mark.parametrize("case", ["nonexistent", "empty_dir", "empty_bucket", "bad_base", "empty_base",
                                  "bad_materialize_dir", "bad_materialize_max"])
def test_startup_errors(dwsfs, scenarios, tmp_path, case):
    """One clear line on stderr, a non-zero exit, nothing mounted."""
    root, info = scenarios["v3gap"]
    bucket, opts, needle = info["bucket"], [], None
    if case == "nonexistent":
        bucket, needle = str(tmp_path / "nope"), str(tmp_path / "nope")
    elif case == "empty_dir":
        bucket = tmp_path / "empty"
        bucket.mkdir()
        needle = "no steps"
    elif case == "empty_bucket":
        bucket = tmp_path / "empty"
        (bucket / "anchors").mkdir(parents=True)
        (bucket / "deltas").mkdir()
        needle = "no steps"
    elif case == "bad_base":
        opts, needle = ["base=/nonexistent"], "/nonexistent"
    elif case == "empty_base":
        (tmp_path / "base").mkdir()
        opts, needle = [f"base={tmp_path / 'base'}"], str(tmp_path / "base")
    elif case == "bad_materialize_dir":
        opts, needle = [f"materialize_dir={tmp_path / 'nodir'}"], str(tmp_path / "nodir")
    elif case == "bad_materialize_max":
        opts, needle = ["materialize_max=lots"], "materialize_max"
    p = start_failure(bucket, tmp_path / "mnt", *opts)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwsfs: "), p.stderr
    assert needle in lines[0], p.stderr
    assert p.stdout == ""


def test_startup_error_no_step_builds_is_one_line(dwsfs, scenarios, tmp_path):
    """A base whose names do not match the trainer's (map_prefix missing):
    no step can be served, said in one line."""
    root, info = scenarios["prefix"]
    p = start_failure(info["bucket"], tmp_path / "mnt")
    lines = p.stderr.strip().splitlines()
    assert lines and "map-prefix" in lines[-1] and lines[-1].startswith("dwsfs: "), p.stderr
    assert len(lines) == 1, p.stderr


# ---------------------------------------------------------------- 9. on_swap

def test_on_swap_hook(dwsfs, dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected = root / "expected"
    s0, s1, s2 = info["steps"][:3]
    bucket, out = tmp_path / "bucket", tmp_path / "swaps.txt"
    publish(dwsctl, None, expected / str(s0), bucket, s0, "anchor")
    mnt = tmp_path / "mnt"
    with mounted(bucket, mnt, *LIVE, f"on_swap=echo $DWSFS_STEP $DWSFS_MOUNT >> {out}") as m:
        time.sleep(0.3)
        assert not out.exists(), "on_swap ran without a swap"
        want = []
        for prev, s in ((s0, s1), (s1, s2)):
            publish(dwsctl, expected / str(prev), expected / str(s), bucket, s)
            m.wait_step(s, STEP_DEADLINE)
            want.append(f"{s} {os.path.realpath(mnt)}")
            wait_until(lambda: out.exists() and out.read_text().splitlines() == want, 5 * SLOW,
                       f"on_swap to write {want} (got {out.read_text() if out.exists() else None!r})")


# ---------------------------------------------------------------- 10. dwsctl status / wait

def test_dwsctl_status_and_wait(dwsfs, dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected = root / "expected"
    s0, s1, s2 = info["steps"][:3]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s0), bucket, s0, "anchor")
    with mounted(bucket, tmp_path / "mnt", *LIVE) as m:
        p = run(dwsctl, "status", m.mnt, check=False)
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert STATUS_FIELDS <= st.keys() and st["step"] == s0, st

        # already served: returns at once
        t0 = time.monotonic()
        p = run(dwsctl, "wait", m.mnt, s0, "--timeout", "5", check=False)
        assert p.returncode == 0 and time.monotonic() - t0 < 2 * SLOW, p.stderr

        # a step published while waiting
        waiter = subprocess.Popen([dwsctl, "wait", m.mnt, str(s1), "--timeout", str(STEP_DEADLINE)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.2)
            publish(dwsctl, expected / str(s0), expected / str(s1), bucket, s1)
            out, err = waiter.communicate(timeout=STEP_DEADLINE + 5)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        assert waiter.returncode == 0, err
        assert m.status()["step"] >= s1

        # an earlier step than the one served: also fine
        publish(dwsctl, expected / str(s1), expected / str(s2), bucket, s2)
        m.wait_step(s2, STEP_DEADLINE)
        assert run(dwsctl, "wait", m.mnt, s1, "--timeout", "2", check=False).returncode == 0

        # a step that never comes: non-zero after the timeout, not before
        t0 = time.monotonic()
        p = run(dwsctl, "wait", m.mnt, 999, "--timeout", "1", check=False, timeout=30)
        took = time.monotonic() - t0
        assert p.returncode != 0 and p.returncode > 0, p
        assert 0.9 <= took < 1 + 5 * SLOW, took
        assert "999" in p.stderr

    # not a mount: status fails
    p = run(dwsctl, "status", tmp_path, check=False)
    assert p.returncode > 0 and p.stderr.strip(), p


# ---------------------------------------------------------------- 11. a step whose files are gone

@pytest.mark.parametrize("poll", [1, 3600])
def test_step_source_gone(dwsfs, scenarios, tmp_path, poll):
    """steps/N whose anchor and deltas were deleted after the mount fails with
    ENOENT or EIO within 5 s, whether or not a poll has seen the deletion."""
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    shutil.copytree(info["bucket"], bucket)
    # steps 1, 2, 3 come from anchor 1; the root (13) from anchor 10
    gone = 3
    allowed = [rf"steps/{gone:06d}: ", r"step \d+ refused: "]
    with mounted(bucket, tmp_path / "mnt", f"poll={poll}", allowed_errors=allowed) as m:
        assert m.status()["step"] == info["latest"]
        for s in (1, 2, 3):
            step_file(bucket, s).unlink()
        if poll == 1:
            wait_until(lambda: m.status()["steps"] < len(info["steps"]), 5 * SLOW, "a poll to see the deletion")

        def attempt():
            try:
                d = m.path("steps", "%06d" % gone)
                names = os.listdir(d)
                with open(os.path.join(d, names[0]), "rb") as f:
                    f.read()
            except OSError as e:
                return e
            return None
        e = in_thread(attempt, 5.0 * SLOW, f"reading steps/{gone:06d}")
        assert isinstance(e, OSError), "reading a step whose files are gone succeeded"
        assert e.errno in (errno.ENOENT, errno.EIO), e
        # the root is unaffected
        check_folder(m.mnt, root / "expected" / str(info["latest"]), top_exclude=META_ENTRIES, mmap_too=False)


# ---------------------------------------------------------------- 8. memory of a long chain

def test_long_chain_start_folds_and_frees(dwsfs, tmp_path):
    """A mount starting on a long chain builds it with the dense tensors
    folded as the files come (one run each, never every file's runs side by
    side), serves the oracle's bytes for the root and for a step in the
    middle, merges the source into whole tensors, and a file opened before
    that merge moves to the merged step: the runs it replaced are freed
    while the file stays open (status patch_bytes)."""
    bucket = tmp_path / "bucket"
    # 14 deltas at 5%: tensors pass a third of their elements around the
    # 7th, then fold pending deltas as they come
    subprocess.run(["/usr/bin/python3", str(Path(__file__).parent / "bench" / "make_model.py"), str(bucket),
                    "--params", "3e6", "--deltas", "14", "--changed", "0.05"],
                   check=True, capture_output=True, timeout=300)
    steps = sorted(int(p.name.split("_")[1].split(".")[0]) for p in (bucket / "deltas").iterdir())
    mid = steps[len(steps) // 2]
    want = tmp_path / "want"
    dwsref.extract(str(bucket), str(want))
    want = (want / "model.safetensors").read_bytes()
    want_mid = tmp_path / "want_mid"
    dwsref.extract(str(bucket), str(want_mid), step=mid)
    want_mid = (want_mid / "model.safetensors").read_bytes()
    env = {"DWSFS_TEST_MERGE_DELAY_MS": str(int(3000 * SLOW))}
    with mounted(bucket, tmp_path / "mnt", "poll=60", env=env) as m:
        fd = os.open(m.path("model.safetensors"), os.O_RDONLY)
        try:
            head = os.read(fd, 1 << 20)
            before = m.status()
            assert before["merging"] and before["whole_tensors"] == 0, before
            # built folded: about one dense run per tensor, not 14 files' runs
            assert before["patch_bytes"] < 1.3 * len(want), before
            wait_until(lambda: not m.status()["merging"], 60 * SLOW, "the merge to end")
            merged = m.status()
            assert merged["whole_tensors"] > 0, merged
            # the open file moved to the merged step: its dense runs are gone
            # (with them still held, patch_bytes would be about twice this)
            assert merged["patch_bytes"] < 1.2 * merged["whole_tensor_bytes"] + (1 << 20), merged
            rest = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            assert first_diff(head + rest, want) is None, first_diff(head + rest, want)
        finally:
            os.close(fd)
        wait_until(lambda: m.status()["root_open_handles"] == 0, 5 * SLOW, "the release")
        assert m.status()["patch_bytes"] == merged["patch_bytes"]
        assert read_file(m.path("model.safetensors")) == want
        assert mmap_read(m.path("model.safetensors")) == want
        got_mid = read_file(m.path("steps", "%06d" % mid, "model.safetensors"))
        assert first_diff(got_mid, want_mid) is None, first_diff(got_mid, want_mid)
