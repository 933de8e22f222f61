#!/usr/bin/python3
"""Benchmark of catch-up patches (issue #18). Not a test.

    tests/bench/run_patch_bench.py          # Qwen3-0.6B-shaped model, 1% steps, 6 rounds
    SMOKE=1 tests/bench/run_patch_bench.py  # ~20M params, 3 rounds (CI)

A local-folder bucket from make_model.py (--base: the root is the base's two
shards) is mounted with poll=POLL, swap_idle=0 and an on_swap hook that
notes when it starts. Each round publishes one held 1% delta; a reader here
(a server's stand-in) polls .dwsfs/status every 2 ms and, once the root is
the new step, reads .dwsfs/patches/(N-1)-N. Figures, per round, median and
min-max:

  first byte   the reader's first byte of the patch - 'step N ready' in the
               log (target: <= 50 ms); and when the hook started
  read speed   patch bytes / the reader's time from first byte to last, next
               to reading a copy of the same bytes in /dev/shm (target: >= 1 GB/s)
  size         patch bytes / (changed elements x (8 + 2)) (target: <= 1.1)
  vs reload    bytes and time of the patch read, next to `cat` of every file of
               steps/N/ right after (what a full reload reads), cold
               (drop_caches before) and as found

Writes OUT (default bench-results/patch.md) and the raw figures beside it as
JSON. Environment: SMOKE, PARAMS, ROUNDS, BUILD (build/), KEEP=1, OUT.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3"
SMOKE = os.environ.get("SMOKE", "0") == "1"
PARAMS = float(os.environ.get("PARAMS", "2e7" if SMOKE else "600e6"))
ROUNDS = int(os.environ.get("ROUNDS", "3" if SMOKE else "6"))
BUILD = os.path.abspath(os.environ.get("BUILD", os.path.join(ROOT, "build")))
os.environ["DWSFS"] = os.path.join(BUILD, "dwsfs")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mountutil  # noqa: E402
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench-results", "tmp" if SMOKE else "", "patch.md"))
POLL = "0.2"
T0 = time.monotonic()

# The hook: when it started.
HOOK = r'''#!/bin/sh
echo "$DWSFS_STEP $(date +%s%N)" >> "$BENCH_TIMES"
'''

LOG_TS = re.compile(r"^dwsfs (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z \w+ (.*)$")


def log(msg):
    print(f"patch-bench {time.monotonic() - T0:6.1f}s: {msg}", file=sys.stderr, flush=True)


def kv(text):
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def log_ns(text, prefix):
    """Wall-clock ns of the first log line starting with prefix (ms precision)."""
    import calendar
    for ln in text.splitlines():
        m = LOG_TS.match(ln)
        if m and m.group(3).startswith(prefix):
            secs = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
            return secs * 10**9 + int(m.group(2)) * 10**6
    return None


def read_all(path, chunk=1 << 20):
    """(ns at the first byte, ns at the last, bytes)."""
    with open(path, "rb", buffering=0) as f:
        n = len(f.read(1))
        t1 = time.time_ns()
        buf = bytearray(chunk)
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
        return t1, time.time_ns(), n


def read_when_root(m, step, timeout=120):
    """Poll the status until the root is `step`, then read the patch."""
    deadline = time.monotonic() + timeout
    while json.loads(open(m.path(".dwsfs", "status")).read())["step"] < step:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the root did not reach step {step}:\n{m.log()[-3000:]}")
        time.sleep(0.002)
    return read_all(m.path(".dwsfs", "patches", f"{step - 1:06d}-{step:06d}.safetensors"))


def timed_cat(files):
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def header_meta(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def write_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(next(ln for ln in f if ln.startswith("write_bytes:")).split()[1])


def materialized(m, step, w0):
    """(bytes the daemon wrote since w0 once step is materialized, how, ms)."""
    wait(lambda: json.loads(open(m.path(".dwsfs", "status")).read()).get("materialized_step") == step, 300,
         f"step {step} materialized")
    got = re.search(rf"step {step}: materialized .*?, (written|brought forward in place) in (\d+) ms", m.log())
    return write_bytes(m.proc.pid) - w0, got.group(1) if got else None, int(got.group(2)) if got else None


def one_round(m, work, times, src, step):
    lines_before = len(open(times).read().splitlines())
    w0 = write_bytes(m.proc.pid)
    os.link(src, os.path.join(work, "bucket", "deltas", os.path.basename(src)))
    t1, t2, size = read_when_root(m, step)
    wait(lambda: len(open(times).read().splitlines()) > lines_before, 120, f"the hook's run for step {step}")
    st, t0 = (int(x) for x in open(times).read().splitlines()[-1].split())
    assert st == step, (st, step)
    mat_bytes, mat_how, mat_ms = materialized(m, step, w0)
    ready = log_ns(m.log(), f"step {step} ready")
    swapped = log_ns(m.log(), f"root now serves step {step} ")
    made = re.search(rf"patch {step - 1}-{step}: .* made in (\d+) ms", m.log())
    ahead = re.search(rf"step {step} ready: .*built in (\d+) ms, patch from the root made in", m.log())
    patch = m.path(".dwsfs", "patches", f"{step - 1:06d}-{step:06d}.safetensors")
    meta = header_meta(patch)
    changed = int(meta["changed_elements"])
    shm = tempfile.NamedTemporaryFile(dir="/dev/shm", delete=False)
    shutil.copyfileobj(open(patch, "rb"), shm)
    shm.close()
    local = statistics.median((lambda a, b, _n: (b - a) / 1e9)(*read_all(shm.name)) for _ in range(3))
    os.unlink(shm.name)
    files = sorted(os.path.join(m.path("steps", f"{step:06d}"), n)
                   for n in os.listdir(m.path("steps", f"{step:06d}")))
    full_bytes = sum(os.path.getsize(f) for f in files)
    full_found = timed_cat(files)
    drop_caches()
    full_cold = timed_cat(files)
    r = {"step": step, "first_byte_ms": (t1 - ready) / 1e6, "hook_start_ms": (t0 - ready) / 1e6,
         "read_s": (t2 - t1) / 1e9, "bytes": size, "local_read_s": local, "changed": changed,
         "size_ratio": size / (changed * 10), "dense_tensors": int(meta["dense_tensors"]),
         "full_bytes": full_bytes, "full_found_s": full_found, "full_cold_s": full_cold,
         "patch_total_s": (t2 - ready) / 1e9, "made_ms": int(made.group(1)) if made else None,
         "ahead": bool(ahead), "delta_bytes": os.path.getsize(src), "mat_write_bytes": mat_bytes,
         "mat_how": mat_how, "mat_ms": mat_ms, "swap_ms": (swapped - ready) / 1e6 if swapped else None, "build_ms": int(ahead.group(1)) if ahead else None}
    log(f"step {step}: patch made in {r['made_ms']} ms, swap {r['swap_ms']} ms after ready; first byte {r['first_byte_ms']:.1f} ms after ready (hook at {r['hook_start_ms']:.1f}), "
        f"{size:,} B in {r['read_s'] * 1e3:.1f} ms, size {r['size_ratio']:.3f}x; full reload {full_bytes:,} B "
        f"{full_found:.3f} s (cold {full_cold:.3f} s)")
    return r


def med(rs, k):
    xs = [r[k] for r in rs]
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def report(all_rs, model):
    first, rs = all_rs[0], [r for r in all_rs[1:] if r["ahead"]] or all_rs[1:]
    gbps = [r["bytes"] / r["read_s"] / 1e9 for r in rs]
    local = [r["bytes"] / r["local_read_s"] / 1e9 for r in rs]
    lines = [
        "# Catch-up patches: benchmark (tests/bench/run_patch_bench.py)", "",
        f"- model: `make_model.py --params {PARAMS:g} --base`: {int(model['params']):,} params, "
        f"1% of the elements changed per step; local-folder bucket, `-o poll={POLL},swap_idle=0` "
        "(patch_ahead=auto: the first patch is made when it is read, the next ones with their step)",
        f"- {len(rs)} rounds after the first; median (min-max); machine: {os.cpu_count()} CPUs", "",
        "| figure | measured | target |", "|---|---|---|",
        f"| first byte of the patch after 'step N ready' (ms) | {med(rs, 'first_byte_ms')} | <= 50 |",
        f"| the on_swap hook started after 'step N ready' (ms) | {med(rs, 'hook_start_ms')} | |",
        f"| patch read speed (GB/s) | {statistics.median(gbps):.2f} ({min(gbps):.2f}-{max(gbps):.2f}) | >= 1 |",
        f"| same bytes from /dev/shm (GB/s), same round | {statistics.median(local):.2f} | |",
        f"| size / (changed x (8 + 2)) | {med(rs, 'size_ratio')} | <= 1.1 |",
        f"| step built (ms), then its patch from the root made (ms) | {med(rs, 'build_ms')}, {med(rs, 'made_ms')} | |",
        f"| first round, patch made when read: made (ms), first byte after ready (ms) | "
        f"{first['made_ms']}, {first['first_byte_ms']:.0f} | |",
        f"| patch bytes | {med(rs, 'bytes')} | |",
        f"| full reload bytes (steps/N/) | {med(rs, 'full_bytes')} | |",
        f"| bytes: patch / full reload | {statistics.median(r['bytes'] / r['full_bytes'] for r in rs):.4f} | |",
        f"| time: patch, step ready to last byte (s) | {med(rs, 'patch_total_s')} | |",
        f"| time: full reload read, as found right after (s) | {med(rs, 'full_found_s')} | |",
        f"| time: full reload read, cold (s) | {med(rs, 'full_cold_s')} | |",
        f"| time: patch / full reload cold | {statistics.median(r['patch_total_s'] / r['full_cold_s'] for r in rs):.4f} | |",
        f"| materialized copy: bytes the daemon wrote per step / delta bytes | "
        f"{statistics.median(r['mat_write_bytes'] / r['delta_bytes'] for r in rs):.2f} "
        f"({', '.join(str(r['mat_how']) for r in rs)}) | <= 3 (#17) |",
        f"| materialized copy: ms per step | {med(rs, 'mat_ms')} | |",
        ""]
    return "\n".join(lines)


def main():
    work = tempfile.mkdtemp(prefix="dwsfs-patch-bench-")
    try:
        log(f"generating: make_model.py --params {PARAMS:g} --deltas {ROUNDS + 1} --hold {ROUNDS} --base")
        out = subprocess.run([PY, os.path.join(ROOT, "tests", "bench", "make_model.py"), os.path.join(work, "bucket"),
                              "--params", str(PARAMS), "--deltas", str(ROUNDS + 1), "--hold", str(ROUNDS), "--base"],
                             capture_output=True, text=True, check=True).stdout
        model = kv(out)
        last = int(model["last_step"])
        held = [os.path.join(work, "bucket.pending", "deltas", f"step_{s:06d}.safetensors")
                for s in range(last + 1, last + 1 + ROUNDS)]
        hook, times = os.path.join(work, "hook.sh"), os.path.join(work, "times")
        with open(hook, "w") as f:
            f.write(HOOK)
        os.chmod(hook, 0o755)
        open(times, "w").close()
        rs = []
        with mountutil.mounted(os.path.join(work, "bucket"), os.path.join(work, "mnt"), f"poll={POLL}", "swap_idle=0",
                               f"on_swap={hook}", env={"BENCH_TIMES": times}, mount_timeout=300) as m:
            for k, src in enumerate(held):
                rs.append(one_round(m, work, times, src, last + 1 + k))
        text = report(rs, model)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            f.write(text)
        with open(os.path.splitext(OUT)[0] + ".json", "w") as f:
            json.dump({"model": model, "rounds": rs}, f, indent=1)
        print(text)
        log(f"wrote {OUT}")
    finally:
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(work + ".pending", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
