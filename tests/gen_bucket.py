#!/usr/bin/python3
"""Write a test bucket plus the exact output `dwsctl extract` must give for each step.

    gen_bucket.py OUT --scenario NAME [--seed N]    (NAME = all: OUT/<name>/ for each)
    gen_bucket.py --list

OUT/bucket/           anchors/, deltas/ (and base/ for some scenarios), mtimes set
OUT/base/             external base model folder (scenario v3gap)
OUT/expected/<N>/     the folder `dwsctl extract OUT/bucket DIR --step N <extract_args>` writes
OUT/info.json         scenario, bucket, extract_args, steps, latest, invalid_steps,
                      changed_fraction (one per entry of steps)

The expected bytes come from the simulator's state, never from decoding the files
written here, so they are an independent oracle for the decoder.
"""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

import dwsgen as g

T0_NS = 1_700_000_000_123_456_789   # upload time of a scenario's first step
STEP_NS = 10 * 10**9                # consecutive steps are uploaded 10 s apart
RESTART_NS = 3600 * 10**9           # a restarted run starts 1 h after the last file


@dataclass
class Run:
    seed: int                                     # added to --seed
    steps: range                                  # every step the trainer runs
    complete: frozenset                           # steps written as complete dense files
    partial: frozenset = frozenset()              # partial dense anchors (changed params only)
    idle: frozenset = frozenset()                 # nothing changed: nothing uploaded
    dense_delta: frozenset = frozenset()          # complete dense files under deltas/ (v1)
    zst: frozenset = frozenset()                  # files compressed with zstd

    def uploaded(self):
        return [s for s in self.steps if s not in self.idle]


def all_bf16(name):
    return "BF16"


def all_f32(name):
    return "F32"


def mixed_dtype(name):
    if name.endswith("norm.weight") or name == "lm_head.weight" or ".layers.0.self_attn." in name:
        return "F32"
    if name == g.EMBED or ".mlp." in name or name.endswith(".bias"):
        return "F16"
    return "BF16"


def _rope(n):
    return (1.0 / 10000 ** (np.arange(n, dtype=np.float64) / n)).astype(np.float32)


# Base tensors the trainer never has: their bytes pass through unchanged.
BUFFERS = [("model.rotary_emb.inv_freq", "F32", _rope(16)),
           ("model.position_ids", "I64", np.arange(64, dtype=np.int64).reshape(1, 64))]
VISION = [("model.visual.patch_embed.proj.weight", "BF16",
           g.f32_to_bf16(np.linspace(-1, 1, 512, dtype=np.float32)).reshape(32, 16))]


@dataclass
class Scenario:
    encoding: str                     # "v1" | "raw" | "gap_delta"
    runs: list
    base: str = None                  # None | "bucket" (bucket/base/) | "external" (OUT/base/)
    sharded: bool = True              # base: two shards + index.json, else model.safetensors
    base_dtype: object = all_bf16     # trainer name -> dtype in the base
    base_extra: list = field(default_factory=list)
    map_prefix: tuple = None          # (trainer prefix, base prefix)
    far_gap_step: int = None          # force an embedding gap >= 65536 (U32) at this step


def _every(start, stop, n):
    return frozenset(range(start, stop + 1, n))


SCENARIOS = {
    "v1": Scenario("v1", [Run(0, range(1, 13), frozenset({1, 2}), partial=frozenset({5, 10}),
                              dense_delta=frozenset({2}))], base="bucket"),
    "v2raw": Scenario("raw", [Run(0, range(1, 10), frozenset({1}), partial=frozenset({5, 9}))]),
    "v3gap": Scenario("gap_delta", [Run(0, range(1, 12), _every(1, 11, 5))], base="external",
                      base_dtype=mixed_dtype, base_extra=BUFFERS, far_gap_step=3),
    "gaps": Scenario("gap_delta", [Run(0, range(1, 14), frozenset({1, 10}), idle=frozenset({4, 7, 8, 11, 12}))]),
    "restart": Scenario("gap_delta", [Run(0, range(1, 16), frozenset({1, 10})),
                                      Run(1, range(1, 7), frozenset({1}))]),
    "bigsteps": Scenario("gap_delta", [Run(0, range(999998, 1000003), frozenset({999998}))]),
    # Every delta and the anchor at 6 compressed; the anchors at 1 and 11 plain.
    "zstd": Scenario("gap_delta", [Run(0, range(1, 12), _every(1, 11, 5),
                                       zst=frozenset(range(2, 11)))], far_gap_step=3),
    "prefix": Scenario("gap_delta", [Run(0, range(1, 8), frozenset({1, 5}))], base="bucket", sharded=False,
                       base_extra=VISION, map_prefix=("model.", "model.language_model.")),
    "single": Scenario("v1", [Run(0, range(1, 9), _every(1, 8, 3))], base="bucket", sharded=False,
                       base_dtype=all_f32),
}


def valid_steps(name):
    return SCENARIOS[name].runs[-1].uploaded()


def invalid_steps(name):
    runs = SCENARIOS[name].runs
    valid = set(valid_steps(name))
    bad = set(runs[-1].steps) - valid
    for r in runs[:-1]:
        bad |= set(r.uploaded()) - valid
    bad.add(max(valid) + 1)
    if min(valid) > 1:
        bad.add(min(valid) - 1)
    return sorted(bad)


def extract_args(name, out):
    sc = SCENARIOS[name]
    args = []
    if sc.base == "external":
        args += ["--base", os.path.join(out, "base")]
    if sc.map_prefix:
        args += ["--map-prefix", "=".join(sc.map_prefix)]
    return args


def step_file(step):
    return f"step_{step:06d}.safetensors"


def _orders(rng, names):
    """A data order and a header key order, varied per file: the key order
    must never matter to a reader."""
    style = rng.integers(3)
    data = [list(names), sorted(names), list(rng.permutation(names))][style]
    keys = list(data)
    if rng.integers(2):
        keys = list(rng.permutation(keys))
    keys.insert(int(rng.integers(len(keys) + 1)) if rng.integers(2) else 0, g.META)
    return data, keys


def _write(path, blob, mtime_ns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def write_run(bucket, sc, run, seed, t0_ns):
    """Train, upload every step's file; returns (sim, states, complete-file bytes,
    changed fractions, mtime of the last step)."""
    sim = g.TrainerSim(seed * 100 + run.seed)
    rng = np.random.default_rng(seed * 100 + run.seed + 7)
    names = [n for n, _ in sim.params]
    total = sim.total_elements
    states, complete, fractions = {}, {}, {}
    for i, step in enumerate(run.steps):
        t = t0_ns + i * STEP_NS
        kw = {}
        if step == sc.far_gap_step:
            vocab, hidden = sim.shapes[g.EMBED]
            kw = dict(embed_rows=[0, vocab - 1], force=(g.EMBED, vocab * hidden - 1))
        changed = sim.step(idle=step in run.idle, **kw)
        n_changed = sum(len(c) for c in changed.values())
        if step in run.idle:
            assert n_changed == 0
            continue
        state = sim.state()
        states[step], fractions[step] = state, n_changed / total
        if step in run.complete or step in run.partial:
            held = names if step in run.complete else [n for n in names if len(changed[n])]
            assert step in run.complete or 0 < len(held) < len(names), "a partial anchor must be partial"
            tensors, meta = g.encode_dense(step, state, sim.shapes, held, changed, total)
            folder = "deltas" if step in run.dense_delta else "anchors"
        elif sc.encoding == "v1":
            tensors, meta = g.encode_v1(step, state, changed, total)
            folder = "deltas"
        else:
            tensors, meta = g.encode_v23(step, state, changed, total, sc.encoding)
            folder = "deltas"
        order, keys = _orders(rng, list(tensors))
        blob = g.safetensors_bytes(tensors, meta, order, keys)
        if step in run.complete:
            complete[step] = blob
        path = os.path.join(bucket, folder, step_file(step))
        _write(path, blob, t)
        if step in run.zst:
            subprocess.run(["zstd", "-q", "-f", "-o", path + ".zst", path], check=True)
            os.remove(path)
            os.utime(path + ".zst", ns=(t, t))
    return sim, states, complete, fractions, t


def base_name(sc, trainer_name):
    if sc.map_prefix and trainer_name.startswith(sc.map_prefix[0]):
        return sc.map_prefix[1] + trainer_name[len(sc.map_prefix[0]):]
    return trainer_name


def base_folder(sc, sim, rng):
    """{relative path: bytes} of a Hugging Face model folder holding the
    trainer's initial F32 weights (rounded to each tensor's dtype)."""
    tensors = {}
    for name, shape in sim.params:
        dtype = sc.base_dtype(name)
        tensors[base_name(sc, name)] = (dtype, list(shape), g.f32_as(sim.init[name], dtype))
    for name, dtype, arr in sc.base_extra:
        tensors[name] = g.tensor(dtype, arr)
    files = {
        "config.json": json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                                   "num_hidden_layers": 2, "vocab_size": 1152}, indent=2).encode() + b"\n",
        "generation_config.json": b'{\n  "do_sample": true,\n  "temperature": 0.7\n}\n',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}).encode(),
    }

    def shard(names):
        order, keys = _orders(rng, names)
        return g.safetensors_bytes({n: tensors[n] for n in names}, {"format": "pt"}, order, keys)

    if not sc.sharded:
        files["model.safetensors"] = shard(list(tensors))
        return files
    first = [n for n in tensors if n == base_name(sc, g.EMBED) or ".layers.0." in n or n == "model.position_ids"]
    second = [n for n in tensors if n not in first]
    shards = [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    weight_map = {}
    for fname, names in shards:
        files[fname] = shard(names)
        weight_map.update({n: fname for n in names})
    total_size = sum(len(tensors[n][2]) for n in tensors)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode() + b"\n"
    return files


def expected_folder(sc, state, base, layout):
    """What extract must write for a step whose trainer state is `state`."""
    if base is None:
        return {"model.safetensors": g.replace_tensor_data(layout, {n: b.tobytes() for n, b in state.items()})}
    trained = {base_name(sc, n): n for n in state}
    out, seen = {}, set()
    for rel, blob in base.items():
        if rel.endswith(".safetensors"):
            header, _, _ = g.parse_header(blob)
            repl = {b: g.bf16_as(state[trained[b]], e["dtype"]) for b, e in header.items() if b in trained}
            seen |= set(repl)
            blob = g.replace_tensor_data(blob, repl)
        out[rel] = blob
    assert seen == set(trained), "every trained parameter must be in the base"
    return out


def generate(out, name, seed=1):
    sc = SCENARIOS[name]
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} exists and is not empty")
    bucket = os.path.join(out, "bucket")
    t0 = T0_NS
    for run in sc.runs:
        sim, states, complete, fractions, last = write_run(bucket, sc, run, seed, t0)
        t0 = last + RESTART_NS
    base = None
    if sc.base:
        base = base_folder(sc, sim, np.random.default_rng(seed + 99))
        where = os.path.join(bucket, "base") if sc.base == "bucket" else os.path.join(out, "base")
        for rel, blob in base.items():
            _write(os.path.join(where, rel), blob, T0_NS - RESTART_NS)
    steps = valid_steps(name)
    assert steps == sorted(states)
    for n in steps:
        layout = complete[max(a for a in complete if a <= n)]
        for rel, blob in expected_folder(sc, states[n], base, layout).items():
            path = os.path.join(out, "expected", str(n), rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob)
    info = {"scenario": name, "bucket": bucket, "extract_args": extract_args(name, out), "steps": steps,
            "latest": steps[-1], "invalid_steps": invalid_steps(name),
            "changed_fraction": [round(fractions[n], 6) for n in steps]}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS) + ["all"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--list", action="store_true", help="print the scenario names")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(SCENARIOS))
        return
    if not a.out or not a.scenario:
        ap.error("OUT and --scenario are required")
    names = list(SCENARIOS) if a.scenario == "all" else [a.scenario]
    for name in names:
        generate(os.path.join(a.out, name) if a.scenario == "all" else a.out, name, a.seed)


if __name__ == "__main__":
    sys.exit(main())
