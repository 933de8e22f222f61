#!/usr/bin/python3
"""Reference for apply_bench: what a trainer-side reader (TRL) does with numpy.

    numpy_apply.py BUCKET [--reps 3] [--check FILE]

Loads the complete anchor at step 1 as dense uint16 (BF16 bits) arrays and
every gap_delta file under BUCKET/deltas/ (gaps decoded to int64 indices with
numpy cumsum): not timed. Then times `flat[idx] = values` for every param of
every delta, in step order, --reps times; prints key=value lines with the
median (and min, max) rate in changed elements per second. One untimed pass
runs first, as in apply_bench.

--check FILE: after that first pass (the dense state is then the last step),
compare every tensor with FILE (e.g. the model.safetensors `dwsctl extract`
wrote for the last step) and exit 1 on any difference (untimed sanity check).
"""
import argparse
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dwsgen as g  # noqa: E402


def steps_in(folder):
    out = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"step_(\d{6,})\.safetensors", name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def load_anchor(path):
    """{name: writable flat uint16 array} views into one buffer read from path."""
    blob = np.fromfile(path, dtype=np.uint8)
    header, meta, start = g.parse_header(blob[:8 + int(blob[:8].view("<u8")[0])].tobytes())
    assert meta.get("sparse") == "False", f"{path}: not a dense file"
    dense = {}
    for name, e in header.items():
        assert e["dtype"] == "BF16", f"{path}: {name} is {e['dtype']}"
        b, end = e["data_offsets"]
        dense[name] = blob[start + b:start + end].view("<u2")
    return dense


def load_delta(path):
    """[(name, int64 idx, uint16 values)] of a gap_delta (or raw) file."""
    blob = open(path, "rb").read()
    header, meta, start = g.parse_header(blob)
    enc = meta.get("encoding")
    assert meta.get("sparse") == "True" and enc in ("gap_delta", "raw"), f"{path}: not a gap_delta/raw delta"
    out = []
    for name in header:
        if not name.endswith(".val"):
            continue
        p = name[:-4]
        vals = g.tensor_array(blob, header[name], start).copy()
        raw = g.tensor_array(blob, header[p + ".idx"], start)
        idx = g.indices_from_gaps(raw) if enc == "gap_delta" else raw.astype(np.int64)
        out.append((p, idx, vals))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bucket")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check", metavar="FILE", help="compare the state after the first pass with this file")
    a = ap.parse_args(argv)
    anchors = steps_in(os.path.join(a.bucket, "anchors"))
    assert anchors and anchors[0][0] == 1, "want a complete anchor at step 1"
    dense = load_anchor(anchors[0][1])
    deltas = [load_delta(p) for s, p in steps_in(os.path.join(a.bucket, "deltas")) if s > 1]
    assert deltas, "no deltas"
    elems = sum(len(i) for d in deltas for _, i, _ in d)

    for d in deltas:  # untimed warm-up pass, as apply_bench does
        for name, idx, vals in d:
            dense[name][idx] = vals
    if a.check:
        want = load_anchor(a.check)
        bad = sorted(n for n in dense if n not in want or not np.array_equal(dense[n], want[n]))
        if bad or set(want) != set(dense):
            print(f"numpy_check=FAIL {len(bad)} tensors differ, e.g. {bad[:3]}", flush=True)
            return 1
        print(f"numpy_check=ok {len(dense)} tensors equal {a.check}", flush=True)
        del want
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        for d in deltas:
            for name, idx, vals in d:
                dense[name][idx] = vals
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"numpy_version={np.__version__}")
    print(f"numpy_deltas={len(deltas)}")
    print(f"numpy_chain_elems={elems}")
    print(f"numpy_reps={a.reps}")
    print(f"numpy_apply_seconds={med:.6f}")
    print(f"numpy_apply_seconds_min={min(times):.6f}")
    print(f"numpy_apply_seconds_max={max(times):.6f}")
    print(f"numpy_apply_elems_per_s={elems / med:.0f}")


if __name__ == "__main__":
    sys.exit(main())
