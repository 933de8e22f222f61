#!/usr/bin/python3
"""Benchmark of patch memory under a cap (issue #17 item 3). Not a test.

    tests/bench/run_patch_mem_bench.py          # 300M BF16 params, 30 deltas at 2%, 3 rounds: ~2 min
    SMOKE=1 tests/bench/run_patch_mem_bench.py  # 20M params, 12 deltas, 1 round (CI)

A local-folder bucket from make_model.py (a long chain: its tensors pass a
third of their elements patched and go dense) is mounted fresh per round,
with poll=60, materialize_max=0 (reads reach the daemon), alternately with
the default patch_mem and with patch_mem=SMALL (cache_dir: the spill folder,
on disk). Per mount, side by side:

  peak RSS     the daemon's VmHWM once its merges are done, and its RssAnon
               sampled every 20 ms from the start (its own memory; VmHWM also
               counts file pages it maps: the anchor, spilled patches read)
  build        last_build_ms: the chain built at start
  read         model.safetensors read whole (cat to /dev/null), fresh mount;
               with root, once more after `sync; drop_caches` (the spilled
               pages written back and dropped: read from disk)

Each figure is a ratio capped / default, median (min-max) over the rounds.
Writes OUT (default bench-results/patch_mem.md) and the raw figures beside
it as JSON. Environment: SMOKE, PARAMS, DELTAS, CHANGED, SMALL (bytes),
ROUNDS, BUILD (build/), KEEP=1, OUT.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3"
SMOKE = os.environ.get("SMOKE", "0") == "1"
PARAMS = float(os.environ.get("PARAMS", "2e7" if SMOKE else "300e6"))
DELTAS = int(os.environ.get("DELTAS", "12" if SMOKE else "30"))
CHANGED = float(os.environ.get("CHANGED", "0.04" if SMOKE else "0.02"))
SMALL = int(os.environ.get("SMALL", str((8 if SMOKE else 64) << 20)))
ROUNDS = int(os.environ.get("ROUNDS", "1" if SMOKE else "3"))
BUILD = os.path.abspath(os.environ.get("BUILD", os.path.join(ROOT, "build")))
os.environ["DWSFS"] = os.path.join(BUILD, "dwsfs")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mountutil  # noqa: E402
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench-results", "tmp" if SMOKE else "", "patch_mem.md"))
T0 = time.monotonic()
MiB = 1 << 20


def log(msg):
    print(f"patch-mem-bench {time.monotonic() - T0:6.1f}s: {msg}", file=sys.stderr, flush=True)


def proc_kb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                k, _, v = ln.partition(":")
                if v.strip().endswith("kB"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class Sampler:
    """The most RssAnon seen, every 20 ms, until stopped."""
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, proc_kb(self.pid).get("RssAnon", 0))
            time.sleep(0.02)

    def done(self):
        self.stop.set()
        self.t.join()
        return self.peak


def drop_caches():
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    return True


def read_speed(path):
    t = time.monotonic()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                break
            n += len(b)
    return n / (time.monotonic() - t), n


def one_mount(bucket, work, capped):
    opts = ["poll=60", "materialize_max=0"]
    spill = os.path.join(work, "spill")
    os.makedirs(spill, exist_ok=True)
    if capped:
        opts += [f"patch_mem={SMALL}", f"cache_dir={spill}"]
    mnt = os.path.join(work, "mnt")
    # the sampler must see the build, which comes before the mount answers:
    # it starts with the daemon's process (mounted() calls subprocess.Popen)
    box = {}
    orig = subprocess.Popen

    def popen(*a, **k):
        p = orig(*a, **k)
        box.setdefault("s", Sampler(p.pid))
        return p
    subprocess.Popen = popen
    try:
        with mountutil.mounted(bucket, mnt, *opts, mount_timeout=600) as m:
            subprocess.Popen = orig
            mountutil.wait_until(lambda: not m.status()["merging"], 600, "the merges to end")
            st = m.status()
            rss_anon_peak = box["s"].done()
            ps = proc_kb(m.proc.pid)
            speed, n = read_speed(m.path("model.safetensors"))
            after = proc_kb(m.proc.pid)
            cold = None
            if drop_caches():
                # a fresh view: a step's files are cached by the kernel per inode
                cold, _ = read_speed(m.path("steps", "%06d" % st["step"], "model.safetensors"))
            return {"vmhwm": ps["VmHWM"], "rss_anon_peak": rss_anon_peak, "rss_anon": ps["RssAnon"],
                    "rss_file_after_read": after.get("RssFile", 0), "build_ms": st["last_build_ms"],
                    "patch_bytes": st["patch_bytes"], "memory": st["patch_bytes_memory"],
                    "disk": st["patch_bytes_disk"], "cap": st["patch_mem_cap"], "read_Bps": speed,
                    "read_cold_Bps": cold, "model_bytes": n, "step": st["step"]}
    finally:
        subprocess.Popen = orig


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def fmt_ratio(r):
    m, lo, hi = r
    return "n/a" if m is None else f"{m:.2f}x ({lo:.2f}–{hi:.2f})"


def main():
    work = tempfile.mkdtemp(prefix="dwsfs-pmem-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        bucket = os.path.join(work, "bucket")
        log(f"making the bucket: {PARAMS:.0f} params, {DELTAS} deltas at {CHANGED:.0%}")
        subprocess.run([PY, os.path.join(ROOT, "tests", "bench", "make_model.py"), bucket, "--params", str(PARAMS),
                        "--deltas", str(DELTAS), "--changed", str(CHANGED)], check=True, capture_output=True)
        rounds = []
        for r in range(ROUNDS):
            pair = {}
            for capped in ((False, True) if r % 2 == 0 else (True, False)):
                pair["capped" if capped else "default"] = x = one_mount(bucket, work, capped)
                log(f"round {r + 1} {'capped' if capped else 'default'}: VmHWM {x['vmhwm'] / MiB:.0f} MiB, "
                    f"RssAnon peak {x['rss_anon_peak'] / MiB:.0f} MiB, patch {x['patch_bytes'] / MiB:.0f} MiB "
                    f"(memory {x['memory'] / MiB:.0f}, disk {x['disk'] / MiB:.0f}), build {x['build_ms']} ms, "
                    f"read {x['read_Bps'] / 1e6:.0f} MB/s")
            rounds.append(pair)
        write(rounds)
    finally:
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


def write(rounds):
    def ratio(key):
        return med([r["capped"][key] / r["default"][key] if r["capped"][key] and r["default"][key] else None
                    for r in rounds])

    def side(key, scale, unit):
        c = med([r["capped"][key] for r in rounds])[0]
        d = med([r["default"][key] for r in rounds])[0]
        f = (lambda v: "n/a" if v is None else f"{v / scale:,.0f} {unit}")
        return f(c), f(d)

    d0 = rounds[0]["default"]
    rows = [
        ("daemon peak RSS (VmHWM), merges done", "vmhwm", MiB, "MiB"),
        ("daemon anonymous memory, peak (RssAnon every 20 ms)", "rss_anon_peak", MiB, "MiB"),
        ("patch arrays in memory (status patch_bytes_memory)", "memory", MiB, "MiB"),
        ("chain built at start (last_build_ms)", "build_ms", 1, "ms"),
        ("read of the root, fresh mount, spilled pages in the page cache", "read_Bps", 1e6, "MB/s"),
        ("read of the root after sync + drop_caches (spilled pages from disk)", "read_cold_Bps", 1e6, "MB/s"),
    ]
    lines = ["# Patch memory under a cap", "",
             f"`tests/bench/run_patch_mem_bench.py`{' (SMOKE)' if SMOKE else ''}: {PARAMS / 1e6:.0f}M BF16 parameters "
             f"({d0['model_bytes'] / MiB:,.0f} MiB), {DELTAS} deltas at {CHANGED:.0%}, patch bytes "
             f"{d0['patch_bytes'] / MiB:,.0f} MiB; patch_mem={SMALL // MiB}M against the default "
             f"({d0['cap'] / MiB:,.0f} MiB), {len(rounds)} rounds, {os.cpu_count()} CPUs.", "",
             "| figure | patch_mem small | default | ratio small / default, median (min–max) |", "|---|---|---|---|"]
    for name, key, scale, unit in rows:
        c, d = side(key, scale, unit)
        lines.append(f"| {name} | {c} | {d} | {fmt_ratio(ratio(key))} |")
    c = rounds[0]["capped"]
    lines += ["", f"Spilled: {c['disk'] / MiB:,.0f} MiB on disk, {c['memory'] / MiB:,.0f} MiB in memory; "
              f"the daemon's file pages after the read: {c['rss_file_after_read'] / MiB:,.0f} MiB."]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(OUT)[0] + ".json", "w") as f:
        json.dump({"params": PARAMS, "deltas": DELTAS, "changed": CHANGED, "small": SMALL, "rounds": rounds}, f,
                  indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
