"""Seeds for fuzz_skyrl and fuzz_miles (tests/fuzz/fuzz_xor.h): a manifest or
index, the separator, one payload file; valid versions against the harness's
tiny base and the malformed cases of test_formats.py's kinds."""
import json
import struct

import numpy as np

import dwsgen as g
import xorgen

SEP = b"\n--payload--\n"
BASE = bytes(((k * 7 + 3) & 0xFF) for k in range(576))
TENSORS = {"w": ("BF16", [32, 8], 0, 512), "n": ("F32", [8], 512, 544), "i": ("I64", [4], 544, 576)}
TORCH = {"BF16": "bfloat16", "F32": "float32", "I64": "int64"}


def changed(name, rng, frac=0.1):
    dt, shape, b, e = TENSORS[name]
    old = np.frombuffer(BASE[b:e], np.uint8).copy()
    new = old.copy()
    idx = rng.choice(len(old), size=max(1, int(len(old) * frac)), replace=False)
    new[idx] ^= rng.integers(1, 255, size=len(idx)).astype(np.uint8)
    return old.tobytes(), new.tobytes()


def skyrl(rng, alg="xxh3-128", legacy=False, names=("w", "n", "i")):
    recs, ents = [], {}
    for n in names:
        old, new = changed(n, rng)
        x = bytes(a ^ b for a, b in zip(old, new))
        f = xorgen.zstd1(x)
        ents[n] = ("U8", [len(f)], f)
        r = {"name": n, "dtype": TORCH[TENSORS[n][0]], "shape": TENSORS[n][1], "uncompressed_num_bytes": len(new),
             "compressed_num_bytes": len(f), "payload_file": "p.safetensors", "payload_key": n}
        if legacy:
            r["sha256"] = xorgen.checksum("sha256", new)
        else:
            r.update(checksum=xorgen.checksum(alg, new), checksum_algorithm=alg)
        recs.append(r)
    man = {"version": 1, "base_version": 0, "tensors": recs, "payload_files": ["p.safetensors"] if recs else [],
           "total_uncompressed_num_bytes": sum(r["uncompressed_num_bytes"] for r in recs),
           "total_compressed_num_bytes": sum(r["compressed_num_bytes"] for r in recs)}
    return man, g.safetensors_bytes(ents) if ents else b""


def miles(rng, enc="xor", alg="adler32", full=False):
    ents, sums = {}, {}
    for n in TENSORS:
        old, new = changed(n, rng)
        if full:
            dt, shape, _, _ = TENSORS[n]
            ents[n] = (dt, shape, new)
            continue
        raw = bytes(a ^ b for a, b in zip(old, new)) if enc == "xor" else xorgen.overwrite_payload(old, new)
        f = xorgen.zstd1(raw)
        ents[n] = ("U8", [len(f)], f)
        sums[n] = xorgen.checksum(alg, new)
    meta = {"version": "000001", "base_version": "000000"}
    if not full:
        meta.update(delta_encoding=enc, compression_format="zstd", checksum_format=alg)
    idx = {"metadata": meta, "weight_map": {n: "s.safetensors" for n in TENSORS}}
    return idx, g.safetensors_bytes(ents, sums or None)


def seed(index, payload):
    return json.dumps(index).encode() + SEP + payload


def seeds():
    """{"fuzz_skyrl": [bytes...], "fuzz_miles": [...]}"""
    rng = np.random.default_rng(7)
    out = {"fuzz_skyrl": [], "fuzz_miles": []}
    sk = out["fuzz_skyrl"]
    for kw in ({}, {"alg": "sha256"}, {"legacy": True}, {"names": ()}, {"names": ("w",)}):
        m, p = skyrl(rng, **kw)
        sk.append(seed(m, p))
    m, p = skyrl(rng)
    for mutate in (lambda d: d.__setitem__("version", 2), lambda d: d.__setitem__("base_version", 5),
                   lambda d: d["tensors"][0].__setitem__("checksum", "0" * 32),
                   lambda d: d["tensors"][0].__setitem__("dtype", "float16"),
                   lambda d: d["tensors"][0].__setitem__("shape", [8, 32]),
                   lambda d: d["tensors"][0].__setitem__("uncompressed_num_bytes", 1 << 40),
                   lambda d: d["tensors"].append(dict(d["tensors"][0])),
                   lambda d: d["tensors"][0].__setitem__("checksum_algorithm", "blake3")):
        d = json.loads(json.dumps(m))
        mutate(d)
        sk.append(seed(d, p))
    sk.append(seed(m, p[:-5]))                        # short payload: not a version yet
    sk.append(b'{"version": 1, "tensors": [' + SEP)   # not JSON
    mi = out["fuzz_miles"]
    for kw in ({}, {"enc": "overwrite"}, {"alg": "xxh3-128"}, {"full": True}, {"alg": "blake3"}):
        i, p = miles(rng, **kw)
        mi.append(seed(i, p))
    i, p = miles(rng, enc="overwrite")
    h, meta, start = g.parse_header(p)
    e = h["w"]
    raw = struct.pack("<I", 0xFFFFFFF0)               # an overwrite count past the tensor
    f = xorgen.zstd1(raw)
    ents = {n: ("U8", [x["shape"][0]], p[start + x["data_offsets"][0]:start + x["data_offsets"][1]]) for n, x in h.items()}
    ents["w"] = ("U8", [len(f)], f)
    mi.append(seed(i, g.safetensors_bytes(ents, meta)))
    for mutate in (lambda d: d["metadata"].pop("version"), lambda d: d["metadata"].__setitem__("delta_encoding", "add"),
                   lambda d: d["weight_map"].__setitem__("x", "s.safetensors"),
                   lambda d: d["weight_map"].__setitem__("w", "../s.safetensors")):
        d = json.loads(json.dumps(i))
        mutate(d)
        mi.append(seed(d, p))
    return out
