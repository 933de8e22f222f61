#!/usr/bin/python3
"""A restarted node's first read (issue #17 item 4). Not a test.

    tests/bench/run_remount_bench.py          # ~0.6B-shaped model, 3 rounds
    SMOKE=1 tests/bench/run_remount_bench.py  # ~20M params, 1 round (CI)

An hf:// bucket on the loopback Hub (make_model.py --base, 3 deltas). Side by
side, each round, every one after `drop_caches`:

  network    a fresh mount with an empty block cache reads the root (cat)
  cache cat  `cat` of the block cache's files (what reading them costs)
  remount    a fresh mount over the filled cache reads the root at once
             (as a restarted node meets it: drop caches, mount, read)

Targets: remount >= 0.8x of cache cat, and never slower than network.
Writes OUT (bench-results/remount.md) and its .json. Environment: SMOKE,
PARAMS, ROUNDS, BUILD, KEEP=1, OUT, REMOUNT_OPTS (more -o options
for the remount, comma-separated).
"""
import json
import os
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
ROUNDS = int(os.environ.get("ROUNDS", "1" if SMOKE else "3"))
BUILD = os.path.abspath(os.environ.get("BUILD", os.path.join(ROOT, "build")))
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench-results", "tmp" if SMOKE else "", "remount.md"))
REMOUNT_OPTS = [o for o in os.environ.get("REMOUNT_OPTS", "").split(",") if o]  # more -o options for the remount
os.environ["DWSFS"] = os.path.join(BUILD, "dwsfs")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mountutil  # noqa: E402

T0 = time.monotonic()
NS, NAME = "bench", "model"


def log(msg):
    print(f"remount-bench {time.monotonic() - T0:6.1f}s: {msg}", file=sys.stderr, flush=True)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def timed_cat(files):
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def start_hub(root, work):
    ready = os.path.join(work, "hub.ready")
    logf = open(os.path.join(work, "hub.log"), "w")
    p = subprocess.Popen([PY, os.path.join(ROOT, "tests", "hubserver.py"), "--root", root, "--ready-file", ready,
                          "--exit-with-parent", "--max-seconds", "3600"], stdout=logf, stderr=subprocess.STDOUT)
    for _ in range(200):
        if os.path.exists(ready) and os.path.getsize(ready):
            return p, json.load(open(ready))["endpoint"]
        if p.poll() is not None:
            raise RuntimeError("hubserver exited: " + open(os.path.join(work, "hub.log")).read())
        time.sleep(0.05)
    raise RuntimeError("hubserver did not start within 10 s")


def root_files(m):
    return sorted(m.path(n) for n in os.listdir(m.mnt) if n.endswith(".safetensors"))


def cache_files(cache):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs)


def main():
    work = tempfile.mkdtemp(prefix="dwsfs-remount-bench-")
    hub = None
    try:
        bucket = os.path.join(work, "hub", "buckets", NS, NAME)
        os.makedirs(os.path.dirname(bucket))
        log(f"generating: make_model.py --params {PARAMS:g} --deltas 3 --base")
        subprocess.run([PY, os.path.join(ROOT, "tests", "bench", "make_model.py"), bucket, "--params", str(PARAMS),
                        "--deltas", "3", "--base"], capture_output=True, check=True)
        hub, ep = start_hub(os.path.join(work, "hub"), work)
        env, uri, mnt = {"HF_ENDPOINT": ep}, f"hf://buckets/{NS}/{NAME}", os.path.join(work, "mnt")
        rounds = []
        for r in range(ROUNDS):
            res = {}
            cache = os.path.join(work, f"cache{r}")
            drop_caches()
            with mountutil.mounted(uri, mnt, f"cache_dir={cache}", env=env, mount_timeout=600) as m:
                files = root_files(m)
                res["bytes"] = sum(os.path.getsize(f) for f in files)
                res["network"] = timed_cat(files)
            drop_caches()
            res["cache_bytes"] = sum(os.path.getsize(f) for f in cache_files(cache))
            res["cache_cat"] = timed_cat(cache_files(cache))
            drop_caches()
            t0 = time.perf_counter()
            with mountutil.mounted(uri, mnt, f"cache_dir={cache}", *REMOUNT_OPTS, env=env, mount_timeout=600) as m:
                res["remount_mount"] = time.perf_counter() - t0
                res["remount"] = timed_cat(root_files(m))
                res["remount_fetched"] = m.status()["bytes_fetched"]
            if os.environ.get("KEEP") != "1":
                shutil.rmtree(cache)
            rounds.append(res)
            log(f"round {r}: network {res['network']:.2f} s, cache cat {res['cache_cat']:.2f} s, remount "
                f"{res['remount']:.2f} s (+ {res['remount_mount']:.2f} s to mount), fetched {res['remount_fetched']:,} B")
        med = lambda k: statistics.median(x[k] for x in rounds)  # noqa: E731
        # speeds, bytes per second: the cache holds more than the root reads
        # (the anchor's blocks besides the base's)
        ratio = statistics.median((x["bytes"] / x["remount"]) / (x["cache_bytes"] / x["cache_cat"]) for x in rounds)
        vs_net = statistics.median(x["network"] / x["remount"] for x in rounds)
        text = "\n".join([
            "# A restarted node's first read (tests/bench/run_remount_bench.py)", "",
            f"- `make_model.py --params {PARAMS:g} --base`, hf:// on the loopback Hub, {ROUNDS} rounds, "
            "each read after drop_caches; median", "",
            "| figure | value | target |", "|---|---|---|",
            f"| root bytes read | {int(med('bytes')):,} | |",
            f"| network: fresh mount, empty cache (s) | {med('network'):.2f} | |",
            f"| cat of the block cache's files, cold ({int(med('cache_bytes')):,} B) (s) | {med('cache_cat'):.2f} | |",
            f"| remount over the cache, read at once (s) | {med('remount'):.2f} | |",
            f"| remount speed / cache cat speed | {ratio:.2f}x | >= 0.8x |",
            f"| remount speed / network speed | {vs_net:.2f}x | >= 1x |",
            f"| bytes fetched by the remount | {int(med('remount_fetched')):,} | 0 |", ""])
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            f.write(text)
        with open(os.path.splitext(OUT)[0] + ".json", "w") as f:
            json.dump(rounds, f, indent=1)
        print(text)
    finally:
        if hub and hub.poll() is None:
            hub.terminate()
            hub.wait(10)
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
