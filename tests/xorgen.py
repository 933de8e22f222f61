#!/usr/bin/python3
"""Write SkyRL (checkpoint-delta) and miles (disk-delta) folders from the spec
(shared/spec/xor-delta-formats.md), plus the exact folder every version must
give (the oracle).

    xorgen.py OUT --scenario NAME [--seed N]     (NAME = all: OUT/<name>/ each)
    xorgen.py --list

OUT/base/             the base model (a Hugging Face folder: 2 shards + index)
OUT/bucket/           delta-%08d/ (SkyRL) or weight_v%06d/ (miles)
OUT/expected/<N>/     what `dwsctl extract OUT/bucket DIR --base OUT/base --step N` writes
OUT/info.json         scenario, format, bucket, base, versions, latest

The expected bytes come from the simulator's state (numpy arrays changed in
place), never from decoding the files written here: an oracle independent of
dwsfs's C code. Uses numpy, the Debian packages python3-xxhash and
python3-zstandard, hashlib and zlib only.
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import xxhash
import zstandard

import dwsgen as g

T0_NS = 1_700_000_000_123_456_789


# ---------------------------------------------------------------- the model

def model_tensors(rng, layers=2, hidden=64, inter=128, vocab=512):
    """{name: (dtype, shape, array)}: BF16 as uint16 bits, F32 norms, an F16
    projection, integer buffers (all XOR'd byte for byte like any other)."""
    t = {"model.embed_tokens.weight": ("BF16", (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ("F32", (hidden,))
        t[p + "self_attn.q_proj.weight"] = ("BF16", (hidden, hidden))
        t[p + "self_attn.k_proj.weight"] = ("BF16", (hidden // 2, hidden))
        t[p + "self_attn.o_proj.weight"] = ("F16" if i == 1 else "BF16", (hidden, hidden))
        t[p + "mlp.up_proj.weight"] = ("BF16", (inter, hidden))
        t[p + "mlp.down_proj.weight"] = ("BF16", (hidden, inter))
    t["model.norm.weight"] = ("F32", (hidden,))
    t["lm_head.weight"] = ("BF16", (vocab, hidden))
    t["model.position_ids"] = ("I64", (1, 64))
    out = {}
    for name, (dt, shape) in t.items():
        n = int(np.prod(shape))
        if dt == "BF16":
            a = g.f32_to_bf16(rng.standard_normal(n).astype(np.float32) * 0.02)
        elif dt == "I64":
            a = np.arange(n, dtype=np.int64)
        else:
            a = (rng.standard_normal(n) * 0.02).astype(g.NP_DTYPE[dt])
        out[name] = (dt, shape, np.ascontiguousarray(a))
    return out


def base_folder(tensors):
    """{relative path: bytes}: config, tokenizer, two shards and their index."""
    names = list(tensors)
    first = [n for n in names if n.startswith("model.embed") or ".layers.0." in n or n == "model.position_ids"]
    shards = [("model-00001-of-00002.safetensors", first),
              ("model-00002-of-00002.safetensors", [n for n in names if n not in first])]
    files = {"config.json": b'{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64}\n',
             "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n'}
    wm = {}
    for fname, ns in shards:
        files[fname] = g.safetensors_bytes({n: g.tensor(tensors[n][0], tensors[n][2], tensors[n][1]) for n in ns},
                                           {"format": "pt"})
        wm.update({n: fname for n in ns})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": wm}, indent=2).encode()
    return files


def expected_folder(base, state):
    out = {}
    for rel, blob in base.items():
        if rel.endswith(".safetensors"):
            header, _, _ = g.parse_header(blob)
            blob = g.replace_tensor_data(blob, {n: state[n].tobytes() for n in header})
        out[rel] = blob
    return out


def change(rng, state, dtypes, frac, names):
    """Change about frac of the elements of the named tensors (float: the low
    mantissa bits, as an optimizer step; integer: whole values)."""
    for n in names:
        a = state[n]
        k = max(1, int(a.size * frac))
        idx = rng.choice(a.size, size=k, replace=False)
        if dtypes[n] in ("BF16", "F16"):
            a.view(np.uint16)[idx] ^= rng.integers(1, 1 << 7, size=k).astype(np.uint16)
        elif dtypes[n] == "F32":
            a.view(np.uint32)[idx] ^= rng.integers(1, 1 << 20, size=k).astype(np.uint32)
        else:
            a[idx] += rng.integers(1, 1000, size=k).astype(a.dtype)


# ---------------------------------------------------------------- checksums, payloads

def checksum(alg, data):
    if alg == "xxh3-128":
        return xxhash.xxh3_128(data).hexdigest()
    if alg == "sha256":
        return hashlib.sha256(data).hexdigest()
    if alg == "adler32":
        return "%08x" % (zlib.adler32(data) & 0xFFFFFFFF)
    if alg == "blake3":  # no Debian 12 library: a stand-in of the right form (dwsfs cannot check it)
        return hashlib.sha256(b"blake3" + data).hexdigest()
    raise ValueError(alg)


def zstd1(data):
    """One frame, level 1, content size in the header: the Python zstandard defaults."""
    return zstandard.ZstdCompressor(level=1).compress(data)


def overwrite_payload(old, new):
    """u32le K, K u32le byte offsets, K new byte values."""
    o = np.frombuffer(old, np.uint8)
    n = np.frombuffer(new, np.uint8)
    offs = np.nonzero(o != n)[0].astype("<u4")
    return struct.pack("<I", len(offs)) + offs.tobytes() + n[offs].tobytes()


def write(path, data, mtime_ns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    fmt: str                       # "skyrl" | "miles"
    versions: int
    sums: dict = field(default_factory=dict)     # version -> checksum algorithm (default below)
    legacy: frozenset = frozenset()              # skyrl: records with 'sha256' instead of 'checksum'
    empty: frozenset = frozenset()               # versions that change nothing
    split: frozenset = frozenset()               # skyrl: versions whose payload goes into several files
    overwrite: frozenset = frozenset()           # miles: versions with delta_encoding overwrite
    full: frozenset = frozenset()                # miles: full checkpoints
    frac: float = 0.01


SCENARIOS = {
    "skyrl": Scenario("skyrl", 6, empty=frozenset({3}), split=frozenset({2, 5})),
    "skyrl_sha256": Scenario("skyrl", 4, sums={1: "sha256", 2: "sha256", 4: "sha256"}, legacy=frozenset({2, 4})),
    "miles": Scenario("miles", 7, sums={v: "adler32" for v in (2, 6)}, overwrite=frozenset({3, 6}),
                      full=frozenset({4}), empty=frozenset({5})),
    "miles_blake3": Scenario("miles", 2, sums={1: "blake3", 2: "blake3"}),
}


def default_sum(sc):
    return "xxh3-128"


def skyrl_version(bucket, v, sc, changed, old, state, t_ns, max_file=None):
    """delta-%08d/: payload files, then manifest.json (written last)."""
    folder = os.path.join(bucket, "delta-%08d" % v)
    os.makedirs(folder, exist_ok=True)
    alg = sc.sums.get(v, default_sum(sc))
    records, files, cur, cur_name = [], [], {}, None
    limit = max_file or (1 << 30)

    def flush():
        if cur:
            blob = g.safetensors_bytes({k: ("U8", [len(b)], b) for k, b in cur.items()})
            write(os.path.join(folder, cur_name), blob, t_ns)
            files.append(cur_name)
            cur.clear()

    for n in changed:
        new = state[n].tobytes()
        x = np.bitwise_xor(np.frombuffer(old[n], np.uint8), np.frombuffer(new, np.uint8)).tobytes()
        if not any(x):
            continue
        frame = zstd1(x)
        if cur_name is None or sum(len(b) for b in cur.values()) + len(frame) > limit:
            flush()
            cur_name = "delta-rank00000-file%06d.safetensors" % len(files)
        cur[n] = frame
        rec = {"name": n, "dtype": TORCH[sc_dtypes[n]], "shape": list(sc_shapes[n]),
               "uncompressed_num_bytes": len(new), "compressed_num_bytes": len(frame),
               "payload_file": cur_name, "payload_key": n}
        if v in sc.legacy:
            rec["sha256"] = checksum("sha256", new)
        else:
            rec["checksum"] = checksum(alg, new)
            rec["checksum_algorithm"] = alg
        records.append(rec)
    flush()
    manifest = {"version": v, "base_version": v - 1, "tensors": records,
                "total_uncompressed_num_bytes": sum(r["uncompressed_num_bytes"] for r in records),
                "total_compressed_num_bytes": sum(r["compressed_num_bytes"] for r in records),
                "payload_files": files}
    write(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode(), t_ns + 1000)


def miles_version(bucket, v, sc, changed, old, state, t_ns):
    """weight_v%06d/: shards (0-based numbers) and model.safetensors.index.json."""
    folder = os.path.join(bucket, "weight_v%06d" % v)
    os.makedirs(folder, exist_ok=True)
    alg = sc.sums.get(v, default_sum(sc))
    if v in sc.full:
        names = list(state)
        meta = {"version": "%06d" % v, "base_version": "%06d" % (v - 1)}
        entries = {n: g.tensor(sc_dtypes[n], state[n], sc_shapes[n]) for n in names}
        sums = {}
    else:
        enc = "overwrite" if v in sc.overwrite else "xor"
        meta = {"version": "%06d" % v, "base_version": "%06d" % (v - 1), "delta_encoding": enc,
                "compression_format": "zstd", "checksum_format": alg}
        entries, sums = {}, {}
        for n in changed:
            new = state[n].tobytes()
            if new == old[n]:
                continue
            if enc == "xor":
                raw = np.bitwise_xor(np.frombuffer(old[n], np.uint8), np.frombuffer(new, np.uint8)).tobytes()
            else:
                raw = overwrite_payload(old[n], new)
            frame = zstd1(raw)
            entries[n] = ("U8", [len(frame)], frame)
            sums[n] = checksum(alg, new)
    names = list(entries)
    half = (len(names) + 1) // 2
    groups = [names[:half], names[half:]] if len(names) > 1 else [names]
    wm = {}
    for i, grp in enumerate(groups):
        fname = "model-%05d-of-%05d.safetensors" % (i, len(groups))
        gs = {k: v2 for k, v2 in sums.items() if k in grp}
        write(os.path.join(folder, fname), g.safetensors_bytes({n: entries[n] for n in grp}, gs or None), t_ns)
        wm.update({n: fname for n in grp})
    if not names:
        wm = {}
    index = {"metadata": meta, "weight_map": wm}
    write(os.path.join(folder, "model.safetensors.index.json"), json.dumps(index, indent=1).encode(), t_ns + 1000)


TORCH = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I64": "int64"}
sc_dtypes = {}
sc_shapes = {}


def generate(out, name, seed=1, frac=None):
    sc = SCENARIOS[name]
    rng = np.random.default_rng(seed * 1000 + sum(map(ord, name)))
    tensors = model_tensors(rng)
    sc_dtypes.clear()
    sc_dtypes.update({n: t[0] for n, t in tensors.items()})
    sc_shapes.clear()
    sc_shapes.update({n: t[1] for n, t in tensors.items()})
    base = base_folder(tensors)
    for rel, blob in base.items():
        write(os.path.join(out, "base", rel), blob, T0_NS)
    bucket = os.path.join(out, "bucket")
    os.makedirs(bucket, exist_ok=True)
    state = {n: t[2].copy() for n, t in tensors.items()}
    for rel, blob in expected_folder(base, state).items():
        write(os.path.join(out, "expected", "0", rel), blob, T0_NS)
    names = list(state)
    for v in range(1, sc.versions + 1):
        old = {n: a.tobytes() for n, a in state.items()}
        changed = [] if v in sc.empty else [n for n in names if rng.random() < 0.8 or n == "lm_head.weight"]
        change(rng, state, sc_dtypes, frac or sc.frac, changed)
        t_ns = T0_NS + v * 10 ** 9
        if sc.fmt == "skyrl":
            skyrl_version(bucket, v, sc, changed, old, state, t_ns, max_file=2048 if v in sc.split else None)
        else:
            miles_version(bucket, v, sc, changed, old, state, t_ns)
        for rel, blob in expected_folder(base, state).items():
            write(os.path.join(out, "expected", str(v), rel), blob, t_ns)
    info = {"scenario": name, "format": sc.fmt, "bucket": bucket, "base": os.path.join(out, "base"),
            "versions": list(range(1, sc.versions + 1)), "latest": sc.versions}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--scenario", default="all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(SCENARIOS))
        return 0
    if not a.out:
        ap.error("OUT is required")
    for n in (SCENARIOS if a.scenario == "all" else [a.scenario]):
        generate(os.path.join(a.out, n) if a.scenario == "all" else a.out, n, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
