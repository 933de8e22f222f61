#!/usr/bin/python3
"""Write a scale-benchmark bucket of any size in seconds: a Qwen3-shaped BF16
model whose base shards and anchor are sparse files (holes but for a few
non-zero regions per tensor), then gap_delta deltas changing ~1% of every
tensor's elements, spread over it as an RL step's are.

    make_sparse_model.py OUT --bytes 40e9 [--deltas 4] [--hold 3] [--changed 0.01]
                         [--seed 0] [--shard-bytes 4e9]

OUT/base/ (config.json, generation_config.json, tokenizer files, shards of at
most --shard-bytes + model.safetensors.index.json, as a Hub checkpoint),
OUT/anchors/step_000001.safetensors (complete, the base's values), deltas 2..
deltas+1 in OUT/deltas/, the last --hold of them in OUT.pending/deltas/ for a
benchmark to publish while mounted. The shape is the Qwen3 dense family's
(0.6B, 1.7B, 4B, 8B, 14B, 32B: the largest within 5% of --bytes / 2 parameters,
layers added or removed to reach it; below 0.6B the vocabulary shrinks too), so
tensor sizes and counts are a real checkpoint's. Prints `key=value` lines.

Disk: the base and the anchor take ~128 KiB per tensor; each delta ~2x
--changed of the model (2 bytes of gap + 2 of value per changed element). The
deltas are drawn independently per tensor and step (geometric gaps: sorted,
unique, uniform), so no two steps touch the same pattern. No oracle: timing only.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dwsgen as g  # noqa: E402
import gen_bucket as gb  # noqa: E402

# name: (hidden, intermediate, layers, query heads, kv heads, tied embeddings)
QWEN3 = [("0.6B", 1024, 3072, 28, 16, 8, True), ("1.7B", 2048, 6144, 28, 16, 8, True),
         ("4B", 2560, 9728, 36, 32, 8, True), ("8B", 4096, 12288, 36, 32, 8, False),
         ("14B", 5120, 17408, 40, 40, 8, False), ("32B", 5120, 25600, 64, 64, 8, False)]
VOCAB, HEAD_DIM = 151936, 128
REGION = 64 << 10   # bytes of values at the start (and middle) of each tensor; the rest holes


def numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def layer(i, hidden, inter, qh, kvh):
    a, m, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
    return [(a + "q_proj.weight", (qh * HEAD_DIM, hidden)), (a + "k_proj.weight", (kvh * HEAD_DIM, hidden)),
            (a + "v_proj.weight", (kvh * HEAD_DIM, hidden)), (a + "o_proj.weight", (hidden, qh * HEAD_DIM)),
            (a + "q_norm.weight", (HEAD_DIM,)), (a + "k_norm.weight", (HEAD_DIM,)),
            (m + "gate_proj.weight", (inter, hidden)), (m + "up_proj.weight", (inter, hidden)),
            (m + "down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,))]


def shape_for(target):
    """(config name, [(name, shape)] in named_parameters() order) of ~target params."""
    def total(cfg, layers, vocab):
        _, h, inter, _, qh, kvh, tied = cfg
        per = sum(numel(s) for _, s in layer(0, h, inter, qh, kvh))
        return vocab * h * (1 if tied else 2) + layers * per + h, per
    cfg = QWEN3[0]
    for c in QWEN3:
        if total(c, c[3], VOCAB)[0] <= target * 1.05:
            cfg = c
    name, h, inter, _, qh, kvh, tied = cfg
    fixed, per = total(cfg, 0, VOCAB)
    layers, vocab = max(1, round((target - fixed) / per)), VOCAB
    if fixed + per > target:   # a smoke-sized model: one layer, a smaller vocabulary
        layers, vocab = 1, int(max(1024, min(VOCAB, (target - per - h) // h)))
    p = [(g.EMBED, (vocab, h))]
    for i in range(layers):
        p += layer(i, h, inter, qh, kvh)
    p.append(("model.norm.weight", (h,)))
    if not tied:
        p.append(("lm_head.weight", (vocab, h)))
    return name, p, tied


def random_bf16(rng, n):
    """Finite BF16 bits, |x| ~ 0.01 (make_model.py's)."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return (bits & np.uint16(0x80FF)) | np.uint16(0x3C00)


def header(params, meta):
    entries, pos = {g.META: meta}, 0
    for name, shape in params:
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + 2 * numel(shape)]}
        pos += 2 * numel(shape)
    hb = g.pad_header(json.dumps(entries, separators=(",", ":")))
    return struct.pack("<Q", len(hb)) + hb, pos


def regions(size):
    """(offset, length) of a tensor's non-zero bytes: its start, and its middle if large."""
    out = [(0, min(REGION, size))]
    if size >= 256 * REGION:
        out.append(((size // 2) & ~4095, REGION))
    return out


def write_sparse(files, rng, mtime_ns):
    """files: [(path, params, meta)], written in turn with one rng: files
    holding consecutive slices of a parameter list get the same values as
    one file holding the whole list written with a fresh rng of the same
    seed. A tensor's regions() hold random values, the rest are holes."""
    for path, params, meta in files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        head, size = header(params, meta)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + size)
            pos = len(head)
            for _, shape in params:
                for off, n in regions(2 * numel(shape)):
                    os.pwrite(fd, random_bf16(rng, n // 2).tobytes(), pos + off)
                pos += 2 * numel(shape)
        finally:
            os.close(fd)
        os.utime(path, ns=(mtime_ns, mtime_ns))


def spread_gaps(rng, n, p):
    """gap_delta indices of each of n elements taken with probability p: the
    geometric gaps themselves (sorted, unique, uniform over the tensor)."""
    parts, last = [], -1
    while last < n - 1:
        geo = rng.geometric(p, int(n * p + 6 * (n * p) ** 0.5 + 16))
        pos = np.cumsum(geo, dtype=np.int64) + last
        cut = int(np.searchsorted(pos, n))
        parts.append(geo[:cut] - 1)
        if cut < len(geo):
            break
        last = int(pos[-1])
    gaps = np.concatenate(parts)
    return ("U16", gaps.astype(np.uint16)) if gaps.max(initial=0) < 1 << 16 else ("U32", gaps.astype(np.uint32))


def write_delta(path, params, rng, p, step, total, mtime_ns):
    """One gap_delta delta, tensor by tensor; returns (bytes, changed elements)."""
    tensors = []
    for name, shape in params:
        dtype, gaps = spread_gaps(rng, numel(shape), p)
        if len(gaps):
            tensors.append((name, dtype, gaps, random_bf16(rng, len(gaps))))
    changed = sum(len(t[2]) for t in tensors)
    entries, pos = {g.META: g.trainer_metadata(step, True, len(tensors), changed, total, encoding="gap_delta")}, 0
    for name, dtype, gaps, vals in tensors:
        for key, dt, arr in ((name + ".idx", dtype, gaps), (name + ".val", "BF16", vals)):
            entries[key] = {"dtype": dt, "shape": [len(arr)], "data_offsets": [pos, pos + arr.nbytes]}
            pos += arr.nbytes
    hb = g.pad_header(json.dumps(entries, separators=(",", ":")))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for _, _, gaps, vals in tensors:
            f.write(gaps.data)
            f.write(vals.data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return 8 + len(hb) + pos, changed


def base_files(out, params, tied, shard_bytes):
    """The base folder's small files, and its shards [(path, params, meta)]."""
    slices, cur, acc = [], [], 0
    for name, shape in params:
        if cur and acc + 2 * numel(shape) > shard_bytes:
            slices.append(cur)
            cur, acc = [], 0
        cur.append((name, shape))
        acc += 2 * numel(shape)
    slices.append(cur)
    n, shards, weight_map = len(slices), [], {}
    for i, sl in enumerate(slices):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append((os.path.join(out, "base", fname), sl, {"format": "pt"}))
        weight_map.update({name: fname for name, _ in sl})
    h = params[0][1][1]
    lay = [nm for nm, _ in params if nm.endswith("input_layernorm.weight")]
    q = next(s for nm, s in params if nm.endswith("q_proj.weight"))
    kv = next(s for nm, s in params if nm.endswith("k_proj.weight"))
    inter = next(s for nm, s in params if nm.endswith("gate_proj.weight"))
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": h,
              "intermediate_size": inter[0], "num_hidden_layers": len(lay), "num_attention_heads": q[0] // HEAD_DIM,
              "num_key_value_heads": kv[0] // HEAD_DIM, "head_dim": HEAD_DIM, "vocab_size": params[0][1][0],
              "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "max_position_embeddings": 40960,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000}
    small = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}) + "\n",
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "merges": [],
                                                                  "vocab": {f"t{i}": i for i in range(50000)}}}),
        "tokenizer_config.json": json.dumps({"model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer"}) + "\n",
        "model.safetensors.index.json": json.dumps({"metadata": {"total_size": sum(2 * numel(s) for _, s in params)},
                                                    "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
    }
    return small, shards


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bytes", type=float, required=True, help="model bytes (BF16: 2 per parameter)")
    ap.add_argument("--deltas", type=int, default=4)
    ap.add_argument("--hold", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=float, default=4e9)
    a = ap.parse_args(argv)
    if not 0 < a.changed < 1 or not 0 <= a.hold <= a.deltas:
        ap.error("--changed must be in (0, 1) and --hold in [0, --deltas]")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} exists and is not empty")
    t0 = time.monotonic()
    rng = np.random.default_rng(a.seed)
    cfg, params, tied = shape_for(int(a.bytes / 2))
    total = sum(numel(s) for _, s in params)
    small, shards = base_files(out, params, tied, int(a.shard_bytes))
    base_mtime = gb.T0_NS - 3600 * 10**9
    for rel, text in small.items():
        gb._write(os.path.join(out, "base", rel), text.encode(), base_mtime)
    write_sparse(shards, np.random.default_rng(a.seed), base_mtime)
    anchor = os.path.join(out, "anchors", gb.step_file(1))
    # the same seed: the same values in the same tensors' regions as the shards
    write_sparse([(anchor, params, g.trainer_metadata(1, False, len(params), total, total))],
                 np.random.default_rng(a.seed), gb.T0_NS)
    t_base = time.monotonic() - t0
    delta_bytes = changed = 0
    for d in range(a.deltas):
        step = d + 2
        where = out + ".pending" if d >= a.deltas - a.hold else out
        b, c = write_delta(os.path.join(where, "deltas", gb.step_file(step)), params, rng, a.changed, step, total,
                           gb.T0_NS + (step - 1) * gb.STEP_NS)
        delta_bytes, changed = delta_bytes + b, changed + c
    disk = sum(os.stat(os.path.join(dp, f)).st_blocks * 512 for root in (out, out + ".pending")
               for dp, _, fs in os.walk(root) for f in fs)
    print(f"shape=Qwen3-{cfg}")
    print(f"params={total}")
    print(f"tensors={len(params)}")
    print(f"layers={sum(1 for n, _ in params if n.endswith('input_layernorm.weight'))}")
    print(f"model_bytes={2 * total}")
    print(f"anchor_bytes={os.path.getsize(anchor)}")
    print(f"base_shards={','.join(os.path.basename(s[0]) for s in shards)}")
    print(f"deltas={a.deltas}")
    print(f"delta_bytes={delta_bytes}")
    print(f"changed_fraction_per_delta={changed / max(1, a.deltas) / total:.6f}")
    print(f"last_step={a.deltas + 1 - a.hold}")
    print(f"held={a.hold}")
    print(f"disk_bytes={disk}")
    print(f"base_seconds={t_base:.1f}")
    print(f"generate_seconds={time.monotonic() - t0:.1f}")


if __name__ == "__main__":
    sys.exit(main())
