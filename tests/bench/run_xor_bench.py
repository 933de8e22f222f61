#!/usr/bin/python3
"""SkyRL checkpoint-delta folders on a mount (#19): a Qwen3-0.6B-shaped BF16 model
as the base, VERSIONS dense XOR versions at 1% (each element changed with
probability 0.01, new random values), xxh3-128 checksums, as SkyRL writes them.

    tests/bench/run_xor_bench.py [OUT]          # full: 596M params, 500 versions
    SMOKE=1 tests/bench/run_xor_bench.py        # 20M params, 20 versions, 3 rounds

Figures (one run, ratios side by side):
  build   a new version's build (status last_build_ms: decode + apply +
          checksums), ROUNDS versions published one at a time on a mount
          already serving VERSIONS; target <= 100 ms
  memory  patch bytes a version adds / (its changed elements x 6 bytes)
  read    read throughput of the root (VERSIONS versions since the base) vs
          steps/000001 (one), fresh mount, through the daemon
          (materialize_max=0), after merging settles; target >= 0.9x
  mount   first mount of the VERSIONS-version folder (start to mounted) vs
          the payloads' bytes read at the disk's pace + 2 s (local folder)
Writes OUT/results.json and prints a table. Overrides: PARAMS=, VERSIONS=,
ROUNDS=, KEEP=1 (keep OUT). Never run it on a machine others are testing on.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import xxhash
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import make_model as mm  # noqa: E402
from mountutil import mounted, read_status, wait_until  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
PARAMS = float(os.environ.get("PARAMS", 20e6 if SMOKE else 600e6))
VERSIONS = int(os.environ.get("VERSIONS", 20 if SMOKE else 500))
ROUNDS = int(os.environ.get("ROUNDS", 3 if SMOKE else 5))
CHANGED = 0.01
SPLIT = 1 << 30


class Producer:
    """The model's state and SkyRL's writer."""

    def __init__(self, out, seed=0):
        self.rng = np.random.default_rng(seed)
        self.params = mm.qwen3_params(PARAMS)
        self.bucket = os.path.join(out, "bucket")
        self.base = os.path.join(out, "base")
        os.makedirs(self.bucket, exist_ok=True)
        os.makedirs(self.base, exist_ok=True)
        files, shards = mm.base_shards(self.base, self.params)
        self.state = {n: mm.random_bf16(self.rng, mm.numel(s)) for n, s in self.params}
        for rel, text in files.items():
            with open(os.path.join(self.base, rel), "w") as f:
                f.write(text)
        for path, meta, sl in shards:
            head, _ = mm._header(sl, meta)
            with open(path, "wb") as f:
                f.write(head)
                for n, _ in sl:
                    f.write(self.state[n].tobytes())
        self.zc = zstandard.ZstdCompressor(level=1)
        self.bytes = 0

    def version(self, v, stage=None):
        """delta-%08d/ with payload files then manifest.json; into stage
        first when given (renamed into the bucket by publish())."""
        root = stage or self.bucket
        folder = os.path.join(root, "delta-%08d" % v)
        os.makedirs(folder, exist_ok=True)
        records, files, cur, size, changed = [], [], {}, 0, 0

        def flush():
            nonlocal cur, size
            if not cur:
                return
            name = "delta-rank00000-file%06d.safetensors" % len(files)
            entries, pos = {}, 0
            for k, b in cur.items():
                entries[k] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [pos, pos + len(b)]}
                pos += len(b)
            hb = mm.g.pad_header(json.dumps(entries, separators=(",", ":")))
            with open(os.path.join(folder, name), "wb") as f:
                f.write(len(hb).to_bytes(8, "little") + hb)
                for b in cur.values():
                    f.write(b)
            files.append(name)
            for r in records:
                r.setdefault("payload_file", name)
            cur, size = {}, 0

        for n, shape in self.params:
            a = self.state[n]
            pos = mm.random_positions(self.rng, a.size, CHANGED)
            x = np.zeros(a.size, dtype=np.uint16)
            new = mm.random_bf16(self.rng, len(pos))
            x[pos] = a[pos] ^ new
            a[pos] = new
            changed += int(np.count_nonzero(x))
            frame = self.zc.compress(x.tobytes())
            if size + len(frame) > SPLIT:
                flush()
            cur[n] = frame
            size += len(frame)
            self.bytes += len(frame)
            records.append({"name": n, "dtype": "bfloat16", "shape": list(shape), "uncompressed_num_bytes": a.size * 2,
                            "compressed_num_bytes": len(frame), "payload_key": n,
                            "checksum": xxhash.xxh3_128(a.tobytes()).hexdigest(), "checksum_algorithm": "xxh3-128"})
        flush()
        man = {"version": v, "base_version": v - 1, "tensors": records, "payload_files": files,
               "total_uncompressed_num_bytes": sum(r["uncompressed_num_bytes"] for r in records),
               "total_compressed_num_bytes": sum(r["compressed_num_bytes"] for r in records)}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(man, f)
        return changed

    def publish(self, v, tmp):
        stage = os.path.join(tmp, "stage")
        changed = self.version(v, stage)
        os.rename(os.path.join(stage, "delta-%08d" % v), os.path.join(self.bucket, "delta-%08d" % v))
        return changed


def read_tree(path):
    """Bytes read and seconds taken reading every file under path."""
    n, t0 = 0, time.monotonic()
    for dp, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(dp, f), "rb") as fh:
                while True:
                    b = fh.read(8 << 20)
                    if not b:
                        break
                    n += len(b)
    return n, time.monotonic() - t0


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dwsfs-xorbench-")
    res = {"params": PARAMS, "versions": VERSIONS, "rounds": ROUNDS, "smoke": SMOKE}
    p = Producer(out)
    t0 = time.monotonic()
    for v in range(1, VERSIONS + 1):
        p.version(v)
    res["generate_s"] = round(time.monotonic() - t0, 1)
    res["payload_bytes"] = p.bytes
    model_bytes = sum(2 * mm.numel(s) for _, s in p.params)
    # the disk's pace: read the payloads once (page cache dropped when root)
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
    n, secs = read_tree(p.bucket)
    res["disk_MBps"] = round(n / secs / 1e6)
    opts = (f"base={p.base}", "poll=100ms", "swap_idle=0", "materialize_max=0")
    mnt = os.path.join(out, "mnt")
    t0 = time.monotonic()
    with mounted(p.bucket, mnt, *opts, mount_timeout=3600) as m:
        res["mount_s"] = round(time.monotonic() - t0, 2)
        res["mount_bound_s"] = round(n / (n / secs) + 2, 2)
        # read: root (VERSIONS since the base) vs steps/000001, merges settled
        wait_until(lambda: not read_status(m.mnt).get("merging"), 1800, "merging to settle")
        one_n, one_s = read_tree(m.path("steps", "000001"))
        root_n = 0
        root_s = 0.0
        for rel in os.listdir(m.mnt):
            if rel in ("steps", ".dwsfs"):
                continue
            k, s = read_tree(m.path(rel)) if os.path.isdir(m.path(rel)) else (0, 0)
            if not os.path.isdir(m.path(rel)):
                t = time.monotonic()
                with open(m.path(rel), "rb") as fh:
                    while True:
                        b = fh.read(8 << 20)
                        if not b:
                            break
                        k += len(b)
                s = time.monotonic() - t
            root_n += k
            root_s += s
        res["read_root_MBps"] = round(root_n / root_s / 1e6)
        res["read_one_MBps"] = round(one_n / one_s / 1e6)
        res["read_ratio"] = round((root_n / root_s) / (one_n / one_s), 3)
        # build: new versions on the serving mount
        builds, mem = [], []
        for r in range(ROUNDS):
            v = VERSIONS + 1 + r
            before = read_status(m.mnt)["patch_bytes"]
            changed = p.publish(v, out)
            m.wait_step(v, 600)
            st = read_status(m.mnt)
            builds.append(st["last_build_ms"])
            mem.append((st["patch_bytes"] - before) / (changed * 6))
        res["build_ms"] = builds
        res["build_ms_median"] = float(np.median(builds))
        res["memory_per_changed"] = [round(x, 3) for x in mem]
    res["model_bytes"] = model_bytes
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"model {model_bytes / 1e9:.2f} GB, {VERSIONS} versions at 1%, payloads {p.bytes / 1e6:.0f} MB")
    print(f"build of a new version: median {res['build_ms_median']:.0f} ms {builds} (target <= 100 ms)")
    print(f"patch memory a version adds / (changed elements x 6 B): {res['memory_per_changed']}")
    print(f"read: root ({VERSIONS} versions) {res['read_root_MBps']} MB/s vs steps/000001 {res['read_one_MBps']} MB/s:"
          f" {res['read_ratio']}x (target >= 0.9x)")
    print(f"first mount: {res['mount_s']} s vs payloads at the disk's pace + 2 s: {res['mount_bound_s']} s")
    if os.environ.get("KEEP") != "1" and len(sys.argv) < 2:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
