#!/usr/bin/python3
"""Write a benchmark bucket: a Qwen3-0.6B-shaped BF16 model as one complete
anchor at step 1, then a chain of gap_delta deltas (steps 2..deltas+1).

    make_model.py OUT [--params 600e6] [--deltas 20] [--changed 0.01] [--seed 0]

OUT/anchors/step_000001.safetensors, OUT/deltas/step_0000NN.safetensors; mtimes
are set 10 s apart so that the catalog sees one run. OUT must not exist or be
empty. Prints one `key=value` line per figure (params, bytes, changed elements).

The shape is Qwen3-0.6B's (28 layers, hidden 1024, intermediate 3072, 16 query
heads and 8 kv heads of 128, q/k norms, vocab 151936, tied embeddings so no
lm_head): 596M parameters. A smaller --params drops layers first, then shrinks
the vocabulary (a smoke run). Values are random BF16 bits with a narrow
exponent (finite, |x| ~ 0.01); each delta changes every element independently
with probability --changed (positions drawn as geometric gaps, so sorted and
unique), with new random values. No oracle: this is for timing only.
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

HIDDEN, INTER, LAYERS, VOCAB = 1024, 3072, 28, 151936
Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def layer_params(i):
    a, m, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
    return [(a + "q_proj.weight", (Q_HEADS * HEAD_DIM, HIDDEN)),
            (a + "k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (a + "v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (a + "o_proj.weight", (HIDDEN, Q_HEADS * HEAD_DIM)),
            (a + "q_norm.weight", (HEAD_DIM,)),
            (a + "k_norm.weight", (HEAD_DIM,)),
            (m + "gate_proj.weight", (INTER, HIDDEN)),
            (m + "up_proj.weight", (INTER, HIDDEN)),
            (m + "down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,))]


def numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def qwen3_params(target):
    """(name, shape) in named_parameters() order, scaled down to ~target (or,
    past Qwen3-0.6B's size, up: more layers of the same shape)."""
    per_layer = sum(numel(s) for _, s in layer_params(0))
    layers, vocab = LAYERS, VOCAB
    full = VOCAB * HIDDEN + LAYERS * per_layer + HIDDEN
    if target > full + per_layer:
        layers = LAYERS + int((target - full) // per_layer)
    elif target < full:
        layers = int(max(1, min(LAYERS, (target - VOCAB * HIDDEN - HIDDEN) // per_layer)))
        if layers == 1:
            vocab = int(max(1024, min(VOCAB, (target - per_layer - HIDDEN) // HIDDEN)))
    p = [(g.EMBED, (vocab, HIDDEN))]
    for i in range(layers):
        p += layer_params(i)
    p.append(("model.norm.weight", (HIDDEN,)))
    return p


def random_bf16(rng, n):
    """n random finite BF16 bit patterns: random sign and mantissa, exponent
    2^-7 or 2^-6 (0x3C00 | 1 bit of exponent): fast and never NaN/inf."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return (bits & np.uint16(0x80FF)) | np.uint16(0x3C00)


def random_positions(rng, n, p):
    """Sorted unique flat indices: each of n elements with probability p."""
    if p >= 1:
        return np.arange(n, dtype=np.int64)
    k = n * p
    chunks, last = [], -1
    while True:
        gaps = rng.geometric(p, int(k + 6 * k ** 0.5 + 16))
        pos = np.cumsum(gaps, dtype=np.int64) + last
        chunks.append(pos)
        last = int(pos[-1])
        if last >= n:
            break
    pos = np.concatenate(chunks)
    return pos[:np.searchsorted(pos, n)]


def _header(params, meta):
    entries, pos = {g.META: meta}, 0
    for name, shape in params:
        size = 2 * numel(shape)
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    hb = g.pad_header(json.dumps(entries, separators=(",", ":")))
    return struct.pack("<Q", len(hb)) + hb, pos


def write_streaming(path, params, meta, fill, mtime_ns, shards=()):
    """A dense safetensors file written tensor by tensor (same layout as
    dwsgen.safetensors_bytes: metadata first, data in the given order), so the
    whole model never needs to be in memory at once. shards: optional
    [(path, meta, params slice)], consecutive slices of params covering them
    all: each gets the same tensors' bytes as a safetensors file of its own
    (a base model's shards holding the anchor's values). Returns the bytes of
    the file at path."""
    head, pos = _header(params, meta)
    outs = []
    try:
        for spath, smeta, sparams in shards:
            os.makedirs(os.path.dirname(spath), exist_ok=True)
            f = open(spath, "wb")
            outs.append((f, {n for n, _ in sparams}))
            f.write(_header(sparams, smeta)[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(head)
            for name, shape in params:
                buf = np.ascontiguousarray(fill(numel(shape)), dtype="<u2").data
                f.write(buf)
                for sf, names in outs:
                    if name in names:
                        sf.write(buf)
    finally:
        for sf, _ in outs:
            sf.close()
    for p in [path] + [sp for sp, _, _ in shards]:
        os.utime(p, ns=(mtime_ns, mtime_ns))
    return len(head) + pos


def base_shards(base_dir, params, nshards=2):
    """A Hugging Face model folder's files around the shards (config.json,
    generation_config.json, tokenizer files, model.safetensors.index.json) and
    the shards' (path, meta, params) for write_streaming: nshards files of
    about equal bytes, whole tensors, in named_parameters() order."""
    total = sum(2 * numel(s) for _, s in params)
    slices, cur, acc = [], [], 0
    for name, shape in params:
        cur.append((name, shape))
        acc += 2 * numel(shape)
        if len(slices) < nshards - 1 and acc >= total * (len(slices) + 1) / nshards:
            slices.append(cur)
            cur = []
    slices.append(cur)
    slices = [s for s in slices if s]
    n = len(slices)
    shards, weight_map = [], {}
    for i, sl in enumerate(slices):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append((os.path.join(base_dir, fname), {"format": "pt"}, sl))
        weight_map.update({name: fname for name, _ in sl})
    layers = sum(1 for name, _ in params if name.endswith("input_layernorm.weight"))
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": Q_HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": params[0][1][0],
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "max_position_embeddings": 40960,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000}
    vocab = {f"t{i}": i for i in range(min(params[0][1][0], 50000))}  # a tokenizer.json of some size
    files = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n",
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}),
        "tokenizer_config.json": json.dumps({"model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer"}) + "\n",
        "model.safetensors.index.json": json.dumps({"metadata": {"total_size": total},
                                                    "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
    }
    return files, shards


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--params", type=float, default=600e6, help="target parameter count (default: Qwen3-0.6B)")
    ap.add_argument("--deltas", type=int, default=20)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of elements each delta changes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", action="store_true",
                    help="also write OUT/base/: a Hugging Face folder (config, tokenizer, 2 shards + index) "
                         "holding the anchor's values, as a bucket with a base model has")
    ap.add_argument("--hold", type=int, default=0, metavar="K",
                    help="the last K of the deltas go to OUT.pending/deltas/ instead, for a benchmark to publish")
    a = ap.parse_args(argv)
    if not 0 < a.changed <= 1:
        ap.error("--changed must be in (0, 1]")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} exists and is not empty")
    t_start = time.monotonic()
    rng = np.random.default_rng(a.seed)
    params = qwen3_params(int(a.params))
    total = sum(numel(s) for _, s in params)

    if not 0 <= a.hold <= a.deltas:
        ap.error("--hold must be in [0, --deltas]")
    meta = g.trainer_metadata(1, False, len(params), total, total)
    base_files, shards = base_shards(os.path.join(out, "base"), params) if a.base else ({}, [])
    base_mtime = gb.T0_NS - 3600 * 10**9
    for rel, text in base_files.items():
        gb._write(os.path.join(out, "base", rel), text.encode(), base_mtime)
    anchor_bytes = write_streaming(os.path.join(out, "anchors", gb.step_file(1)), params, meta,
                                   lambda n: random_bf16(rng, n), gb.T0_NS, shards)
    for sp, _, _ in shards:
        os.utime(sp, ns=(base_mtime, base_mtime))
    delta_bytes = changed_total = 0
    for d in range(a.deltas):
        step = d + 2
        tensors = {}
        for name, shape in params:
            idx = random_positions(rng, numel(shape), a.changed)
            if not len(idx):
                continue
            dtype, gaps = g.gaps_from_indices(idx)
            tensors[name + ".idx"] = g.tensor(dtype, gaps)
            tensors[name + ".val"] = g.tensor("BF16", random_bf16(rng, len(idx)))
        nparams = len(tensors) // 2
        changed = sum(len(t[2]) // 2 for n, t in tensors.items() if n.endswith(".val"))
        meta = g.trainer_metadata(step, True, nparams, changed, total, encoding="gap_delta")
        blob = g.safetensors_bytes(tensors, meta)
        where = out + ".pending" if d >= a.deltas - a.hold else out
        gb._write(os.path.join(where, "deltas", gb.step_file(step)), blob, gb.T0_NS + (step - 1) * gb.STEP_NS)
        delta_bytes += len(blob)
        changed_total += changed
    print(f"params={total}")
    print(f"tensors={len(params)}")
    print(f"layers={sum(1 for n, _ in params if n.endswith('input_layernorm.weight'))}")
    print(f"vocab={params[0][1][0]}")
    print(f"anchor_bytes={anchor_bytes}")
    print(f"deltas={a.deltas}")
    print(f"delta_bytes={delta_bytes}")
    print(f"changed_elements={changed_total}")
    print(f"changed_fraction_per_delta={changed_total / max(1, a.deltas) / total:.6f}")
    print(f"last_step={a.deltas + 1 - a.hold}")
    print(f"held={a.hold}")
    if a.base:
        print(f"base_shards={','.join(os.path.basename(p) for p, _, _ in shards)}")
        print(f"base_bytes={sum(os.path.getsize(p) for p, _, _ in shards)}")
    print(f"generate_seconds={time.monotonic() - t_start:.1f}")


if __name__ == "__main__":
    sys.exit(main())
