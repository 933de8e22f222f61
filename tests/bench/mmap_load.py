#!/usr/bin/python3
"""Load safetensors files the way safetensors does, for tests/bench/run (not a test).

    mmap_load.py FILE... [--passes N] [--raw]

For each pass: every file is mmap'ed read-only, its header parsed (u64 length +
JSON), and every tensor touched through the mapping: numpy.frombuffer over the
tensor's bytes and one byte read per 4 KiB page (a strided sum), which faults
in every page of every tensor as a copy out of the mapping would, without the
copy's CPU. --raw: each file is one tensor of its whole size (no header: memfs's
file, the FUSE ceiling). Prints one JSON line per pass: {"pass", "seconds", "bytes",
"tensors", "checksum"}.
"""
import argparse
import json
import mmap
import os
import struct
import sys
import time

import numpy as np

PAGE = 4096


def load(paths, raw=False):
    nbytes = ntensors = 0
    checksum = 0
    for p in paths:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                if raw:
                    header, start = {"all": {"data_offsets": [0, size]}}, 0
                else:
                    (n,) = struct.unpack_from("<Q", mm, 0)
                    header = json.loads(mm[8:8 + n])
                    start = 8 + n
                for name, e in header.items():
                    if name == "__metadata__":
                        continue
                    b, end = e["data_offsets"]
                    if end <= b:
                        continue
                    arr = np.frombuffer(mm, dtype=np.uint8, count=end - b, offset=start + b)
                    checksum += int(arr[::PAGE].sum(dtype=np.uint64)) + int(arr[-1])
                    nbytes += end - b
                    ntensors += 1
                    del arr
    return nbytes, ntensors, checksum


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--raw", action="store_true")
    a = ap.parse_args(argv)
    for i in range(a.passes):
        t0 = time.perf_counter()
        nbytes, ntensors, checksum = load(a.files, a.raw)
        dt = time.perf_counter() - t0
        print(json.dumps({"pass": i + 1, "seconds": dt, "bytes": nbytes, "tensors": ntensors, "checksum": checksum}),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
