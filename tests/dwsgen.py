"""Test-data library for dwsfs: safetensors writer, BF16 helpers, the encoders of
every trainer variant (see shared/spec/dws-format.md) and a small deterministic
training simulator whose state is the oracle for what dwsctl must produce.

Only numpy and the standard library: this must stay independent of the C code.
"""
import json
import struct

import numpy as np

DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
              "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# BF16 is handled as its raw bits (uint16).
NP_DTYPE = {"BOOL": "u1", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2",
            "F16": "<f2", "BF16": "<u2", "I32": "<i4", "U32": "<u4", "F32": "<f4",
            "I64": "<i8", "U64": "<u8", "F64": "<f8"}

META = "__metadata__"


# ---------------------------------------------------------------- safetensors

def tensor(dtype, array, shape=None):
    """(dtype, shape, bytes) for the writer; BF16 arrays are uint16 bits."""
    a = np.ascontiguousarray(array, dtype=NP_DTYPE[dtype])
    return dtype, list(a.shape if shape is None else shape), a.tobytes()


def pad_header(header_json):
    """Header bytes padded with spaces to a multiple of 8."""
    b = header_json.encode() if isinstance(header_json, str) else header_json
    return b + b" " * (-len(b) % 8)


def raw_safetensors(header, data):
    """A file from a header (dict, or str/bytes written as is) and data bytes."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    hb = pad_header(header)
    return struct.pack("<Q", len(hb)) + hb + data


def safetensors_bytes(tensors, metadata=None, order=None, key_order=None):
    """Serialize tensors {name: (dtype, shape, bytes)}.

    order: the order of the tensors' data in the file (default: dict order).
    key_order: the order of the header's keys, may contain "__metadata__"
    (default: metadata first, then `order`).
    """
    order = list(tensors) if order is None else list(order)
    assert sorted(order) == sorted(tensors)
    entries, chunks, pos = {}, [], 0
    for name in order:
        dtype, shape, data = tensors[name]
        assert len(data) == DTYPE_SIZE[dtype] * int(np.prod(shape, dtype=np.int64)), name
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        chunks.append(data)
        pos += len(data)
    if metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        entries[META] = dict(metadata)
    if key_order is None:
        key_order = ([META] if metadata is not None else []) + order
    assert sorted(key_order) == sorted(entries)
    header = {k: entries[k] for k in key_order}
    return raw_safetensors(header, b"".join(chunks))


def parse_header(blob):
    """(header dict without metadata, metadata dict, data start) of a valid file."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n])
    meta = header.pop(META, {})
    return header, meta, 8 + n


def tensor_array(blob, entry, data_start):
    begin, end = entry["data_offsets"]
    return np.frombuffer(blob, dtype=NP_DTYPE[entry["dtype"]], count=(end - begin) // DTYPE_SIZE[entry["dtype"]],
                         offset=data_start + begin)


def replace_tensor_data(blob, replacements):
    """Copy of a safetensors file with the data of some tensors replaced by the
    given bytes; header and layout stay byte-identical."""
    header, _, start = parse_header(blob)
    out = bytearray(blob)
    for name, data in replacements.items():
        begin, end = header[name]["data_offsets"]
        assert len(data) == end - begin, name
        out[start + begin:start + end] = data
    return bytes(out)


# ---------------------------------------------------------------- BF16

def f32_to_bf16(x):
    """float32 -> BF16 bits, round to nearest even (NaN -> quiet NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def bf16_to_f32(bits):
    b = np.asarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).reshape(-1).view(np.float32).reshape(b.shape)


def bf16_to_f16(bits):
    # BF16 values are exact in F32, so this is a single RNE rounding into F16
    # (values past F16's range become inf, as RNE says).
    with np.errstate(over="ignore"):
        return bf16_to_f32(bits).astype(np.float16)


def bf16_as(bits, dtype):
    """BF16 bits converted into a stored dtype, as bytes."""
    if dtype == "BF16":
        return np.ascontiguousarray(bits, dtype="<u2").tobytes()
    if dtype == "F32":
        return bf16_to_f32(bits).astype("<f4").tobytes()
    if dtype == "F16":
        return bf16_to_f16(bits).astype("<f2").tobytes()
    raise ValueError(f"cannot store BF16 values as {dtype}")


def f32_as(x, dtype):
    """float32 values rounded into a stored dtype, as bytes (for base checkpoints)."""
    if dtype == "BF16":
        return f32_to_bf16(x).astype("<u2").tobytes()
    return np.asarray(x, dtype=np.float32).astype(NP_DTYPE[dtype]).tobytes()


# ---------------------------------------------------------------- trainer encoders

def trainer_metadata(step, sparse, num_changed_params, changed_elements, total_elements, **extra):
    meta = {
        "format": "sparse_weight_patch",
        "version": "1",
        "sparse": "True" if sparse else "False",
        "model_version": str(step),
        "num_changed_params": str(num_changed_params),
        "total_changed_elements": str(changed_elements),
        "total_elements": str(total_elements),
        "sparsity": f"{1.0 - changed_elements / total_elements:.6f}",
    }
    meta.update(extra)
    return meta


def _counts(changed):
    return sum(1 for i in changed.values() if len(i)), sum(len(i) for i in changed.values())


def encode_dense(step, state, shapes, names, changed, total_elements):
    """Dense BF16 file holding full values of `names` (every parameter for a
    complete anchor, only the step's changed ones for a partial anchor)."""
    tensors = {n: tensor("BF16", state[n], shapes[n]) for n in names}
    return tensors, trainer_metadata(step, False, *_counts(changed), total_elements)


def encode_v1(step, state, changed, total_elements):
    tensors, names = {}, []
    for name, idx in changed.items():
        if len(idx):
            names.append(name)
            tensors[name + ".indices"] = tensor("I32", idx)
            tensors[name + ".values"] = tensor("BF16", state[name][idx])
    meta = trainer_metadata(step, True, *_counts(changed), total_elements, changed_params=json.dumps(names))
    return tensors, meta


def gaps_from_indices(idx):
    """gap_delta: g[k] = idx[k] - idx[k-1] - 1 with idx[-1] = -1; U16 unless a gap needs 32 bits."""
    idx = np.asarray(idx, dtype=np.int64)
    gaps = np.diff(idx, prepend=-1) - 1
    assert (gaps >= 0).all()
    if gaps.max(initial=0) < 1 << 16:
        return "U16", gaps.astype(np.uint16)
    return "U32", gaps.astype(np.uint32)


def indices_from_gaps(gaps):
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1


def encode_v23(step, state, changed, total_elements, encoding):
    tensors = {}
    for name, idx in changed.items():
        if not len(idx):
            continue
        if encoding == "raw":
            tensors[name + ".idx"] = tensor("I32", idx)
        elif encoding == "gap_delta":
            dtype, gaps = gaps_from_indices(idx)
            tensors[name + ".idx"] = tensor(dtype, gaps)
        else:
            raise ValueError(encoding)
        tensors[name + ".val"] = tensor("BF16", state[name][idx])
    return tensors, trainer_metadata(step, True, *_counts(changed), total_elements, encoding=encoding)


# ---------------------------------------------------------------- simulator

EMBED = "model.embed_tokens.weight"


def model_params(hidden=64, intermediate=128, layers=2, vocab=1152, kv=32):
    """(name, shape) in named_parameters() order of a tiny Qwen2-like model.
    vocab * hidden > 65536 so the embedding can hold a gap that needs U32."""
    p = [(EMBED, (vocab, hidden))]
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        p += [(a + "q_proj.weight", (hidden, hidden)), (a + "q_proj.bias", (hidden,)),
              (a + "k_proj.weight", (kv, hidden)), (a + "k_proj.bias", (kv,)),
              (a + "v_proj.weight", (kv, hidden)), (a + "v_proj.bias", (kv,)),
              (a + "o_proj.weight", (hidden, hidden)),
              (m + "gate_proj.weight", (intermediate, hidden)), (m + "up_proj.weight", (intermediate, hidden)),
              (m + "down_proj.weight", (hidden, intermediate)),
              (f"model.layers.{i}.input_layernorm.weight", (hidden,)),
              (f"model.layers.{i}.post_attention_layernorm.weight", (hidden,))]
    p += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return p


class TrainerSim:
    """F32 master weights, Adam, BF16 published state.

    `bits[name]` is the flat BF16 state; step() returns the changed set: the flat
    indices whose BF16 bits differ from the previous step. The embedding gets a
    sparse (per-token-row) update like an embedding gradient does.
    """
    # A trainer's lr ~3e-6, scaled down for this model's weight scale so that
    # ~1% of BF16 elements change per step (measured 0.8-2%).
    LR = 6e-7
    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, seed, params=None, lr=LR, rows_per_step=0.1):
        self.rng = np.random.default_rng(seed)
        self.params = list(params or model_params())
        self.shapes = {n: tuple(s) for n, s in self.params}
        self.lr, self.rows_per_step = lr, rows_per_step
        self.master, self.m, self.v, self.drift = {}, {}, {}, {}
        for name, shape in self.params:
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                w = 1.0 + 0.02 * self.rng.standard_normal(n)
            else:
                w = 0.02 * self.rng.standard_normal(n)
            self.master[name] = w.astype(np.float32)
            self.m[name] = np.zeros(n, np.float32)
            self.v[name] = np.zeros(n, np.float32)
            # A persistent gradient direction so Adam's momentum builds up.
            self.drift[name] = self.rng.standard_normal(n).astype(np.float32)
        self.init = {n: w.copy() for n, w in self.master.items()}
        self.bits = {n: f32_to_bf16(w) for n, w in self.master.items()}
        self.t = 0

    @property
    def total_elements(self):
        return sum(len(b) for b in self.bits.values())

    def state(self):
        return {n: b.copy() for n, b in self.bits.items()}

    def step(self, idle=False, embed_rows=None, force=None):
        """One optimizer step. idle: nothing is trained (no changes at all).
        embed_rows: the embedding rows the batch touches (default: random).
        force: (name, flat index) that must change in this step; if Adam left
        its BF16 value alone, the master weight moves to the next BF16 value."""
        if idle:
            return {n: np.zeros(0, np.int64) for n in self.bits}
        self.t += 1
        b1, b2 = self.BETAS
        changed = {}
        for name, shape in self.params:
            sel = slice(None)
            if name == EMBED:
                vocab, hidden = shape
                if embed_rows is None:
                    embed_rows = self.rng.choice(vocab, int(vocab * self.rows_per_step), replace=False)
                rows = np.sort(np.asarray(embed_rows))
                sel = (rows[:, None] * hidden + np.arange(hidden)).ravel()
            w, m, v = self.master[name], self.m[name], self.v[name]
            grad = 0.5 * self.drift[name][sel] + self.rng.standard_normal(w[sel].shape).astype(np.float32)
            m[sel] = b1 * m[sel] + (1 - b1) * grad
            v[sel] = b2 * v[sel] + (1 - b2) * grad * grad
            mhat = m[sel] / (1 - b1 ** self.t)
            vhat = v[sel] / (1 - b2 ** self.t)
            w[sel] = (w[sel] - self.lr * mhat / (np.sqrt(vhat) + self.EPS)).astype(np.float32)
            new = f32_to_bf16(w)
            if force is not None and force[0] == name and new[force[1]] == self.bits[name][force[1]]:
                b = int(new[force[1]])
                w[force[1]] = bf16_to_f32(np.uint16(b + 1 if (b & 0x7FFF) < 0x7F7F else b - 1))  # next BF16 value
                new = f32_to_bf16(w)
            changed[name] = np.flatnonzero(new != self.bits[name]).astype(np.int64)
            self.bits[name] = new
        return changed
