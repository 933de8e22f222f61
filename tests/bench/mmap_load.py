#!/usr/bin/python3
"""Load safetensors files the way safetensors does, for tests/bench/run (not a test).

    mmap_load.py FILE... [--passes N] [--raw] [--no-folios]

For each pass: every file is mmap'ed read-only, its header parsed (u64 length +
JSON), and every tensor touched through the mapping: numpy.frombuffer over the
tensor's bytes and one byte read per 4 KiB page (a strided sum), which faults
in every page of every tensor as a copy out of the mapping would, without the
copy's CPU. --raw: each file is one tensor of its whole size (no header: memfs's
file, the FUSE ceiling). Prints one JSON line per pass: {"pass", "seconds", "bytes",
"tensors", "checksum", "faults", "large_folio_share"}: faults = the pass's page
faults (minor + major, getrusage); large_folio_share = the share of the mapped
pages (every 64th sampled, after the touch) that sit in a large folio of the page
cache (compound, /proc/self/pagemap + /proc/kpageflags; null without root, or
with --no-folios, which skips that second, untimed touch of every page: the
scale benchmark's models are larger than the page cache). A
warm pass costs a fault per folio mapped, or per fault-around window (64 KiB) of
small pages: that count, not dwsfs, sets a warm mmap load's speed.
"""
import argparse
import json
import mmap
import os
import resource
import struct
import sys
import time

import numpy as np

PAGE = 4096


KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 1 << 15, 1 << 16


def mapping_addr(ino, size):
    """Start of this process's mapping of inode ino at offset 0, or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            part = line.split()
            lo, hi = (int(x, 16) for x in part[0].split("-"))
            if int(part[4]) == ino and int(part[2], 16) == 0 and hi - lo >= size:
                return lo
    return None


def folio_sample(ino, size, stride=64):
    """(pages sampled, of them in a large folio) for the mapping of ino, or None."""
    addr = mapping_addr(ino, size)
    if addr is None:
        return None
    try:
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            seen = large = 0
            for page in range(0, (size + PAGE - 1) // PAGE, stride):
                pm.seek(((addr // PAGE) + page) * 8)
                (e,) = struct.unpack("<Q", pm.read(8))
                pfn = e & ((1 << 55) - 1)
                if not (e >> 63) & 1 or not pfn:
                    continue
                kf.seek(pfn * 8)
                (fl,) = struct.unpack("<Q", kf.read(8))
                seen += 1
                large += bool(fl & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL))
            return seen, large
    except OSError:
        return None


def load(paths, raw=False, folios=None):
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
                if folios is not None:
                    folios.append(folio_sample(os.fstat(f.fileno()).st_ino, size))
    return nbytes, ntensors, checksum


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--no-folios", action="store_true")
    a = ap.parse_args(argv)
    for i in range(a.passes):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        nbytes, ntensors, checksum = load(a.files, a.raw)
        dt = time.perf_counter() - t0
        ru2 = resource.getrusage(resource.RUSAGE_SELF)
        faults = ru2.ru_minflt - ru.ru_minflt + ru2.ru_majflt - ru.ru_majflt
        # after the timed pass (the sampling is slow): which folios the touch mapped
        folios = []
        if not a.no_folios:
            load(a.files, a.raw, folios)
        share = None
        if folios and None not in folios:
            seen = sum(x[0] for x in folios)
            share = sum(x[1] for x in folios) / seen if seen else None
        print(json.dumps({"pass": i + 1, "seconds": dt, "bytes": nbytes, "tensors": ntensors, "checksum": checksum,
                          "faults": faults, "large_folio_share": share}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
