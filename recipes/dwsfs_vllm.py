"""dwsfs catch-up patches into a running vLLM, in place.

A vLLM worker extension: start the server with

    PYTHONPATH=/usr/local/share/dwsfs/recipes \\
    VLLM_SERVER_DEV_MODE=1 vllm serve /mnt/model \\
        --worker-extension-cls dwsfs_vllm.DwsfsWorkerExtension

and `vllm-patch.sh` as the mount's on_swap hook calls, through
`/collective_rpc`, `dwsfs_apply_patch(DWSFS_PATCH, DWSFS_STEP_DIR)` on every
worker. Each worker reads the patch file (docs/patches.md) and hands it to
vLLM's `load_checkpoint_weight_patches`, which maps checkpoint names onto the
model's parameters (tensor-parallel slices, packed QKV) and writes only the
changed elements.

vLLM marks "unchanged" with NaN inside a sparse patch, so a sparse tensor
whose new values hold a NaN, or whose dtype is not floating point, goes in
dense instead, read whole from the step folder.

Reading and applying a patch needs numpy only (`read_patch`,
`apply_to_arrays`, `plan`); torch and vLLM are imported by the extension
alone.
"""

import json
import math
import os
import struct

import numpy as np

FORMAT = "dwsfs_patch"
MAX_HEADER = 100 << 20

# safetensors dtype -> (numpy type holding its bytes, floating point?)
DTYPES = {
    "BF16": ("<u2", True), "F16": ("<f2", True), "F32": ("<f4", True), "F64": ("<f8", True),
    "F8_E4M3": ("u1", True), "F8_E5M2": ("u1", True),
    "I8": ("i1", False), "I16": ("<i2", False), "I32": ("<i4", False), "I64": ("<i8", False),
    "U8": ("u1", False), "U16": ("<u2", False), "U32": ("<u4", False), "U64": ("<u8", False),
    "BOOL": ("u1", False),
}


class PatchError(ValueError):
    """A patch file that is not what docs/patches.md says."""


class Entry:
    """One changed tensor: `indices` (int64, flat) is None for a dense one."""

    def __init__(self, name, dtype, shape, values, indices):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)
        self.values, self.indices = values, indices

    @property
    def sparse(self):
        return self.indices is not None


class Patch:
    def __init__(self, from_step, to_step, entries):
        self.from_step, self.to_step, self.entries = from_step, to_step, entries


def _header(buf, what):
    if len(buf) < 8:
        raise PatchError(f"{what}: shorter than a safetensors header")
    n = struct.unpack_from("<Q", buf, 0)[0]
    if n > MAX_HEADER or 8 + n > len(buf):
        raise PatchError(f"{what}: header of {n} bytes does not fit the file")
    try:
        head = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise PatchError(f"{what}: header is not JSON ({e})") from None
    if not isinstance(head, dict):
        raise PatchError(f"{what}: header is not an object")
    return head, 8 + n


def _array(buf, start, t, name, what):
    """The tensor's bytes as a flat numpy array of its storage type."""
    if not isinstance(t, dict) or t.get("dtype") not in DTYPES:
        raise PatchError(f"{what}: {name}: unknown dtype {t.get('dtype') if isinstance(t, dict) else t!r}")
    shape, offs = t.get("shape"), t.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
        raise PatchError(f"{what}: {name}: bad shape or data_offsets")
    np_type = np.dtype(DTYPES[t["dtype"]][0])
    b, e = offs
    if not 0 <= b <= e or start + e > len(buf) or e - b != math.prod(shape) * np_type.itemsize:
        raise PatchError(f"{what}: {name}: data_offsets {offs} do not hold shape {shape}")
    return np.frombuffer(buf, dtype=np_type, count=math.prod(shape), offset=start + b)


def read_patch(path):
    """Parse and check a dwsfs patch file; the arrays view its bytes."""
    what = str(path)
    with open(path, "rb") as f:
        buf = f.read()
    head, start = _header(buf, what)
    meta = head.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PatchError(f"{what}: not a {FORMAT} file")
    try:
        shapes = json.loads(meta.get("shapes", "{}"))
        frm, to = int(meta["from_step"]), int(meta["to_step"])
    except (KeyError, ValueError) as e:
        raise PatchError(f"{what}: bad __metadata__ ({e})") from None
    entries = []
    for key in sorted(head):
        if not key.endswith(".values"):
            if not key.endswith(".indices") or key[:-8] + ".values" not in head:
                raise PatchError(f"{what}: {key}: neither T.values nor a T.indices with its T.values")
            continue
        name = key[:-7]
        values = _array(buf, start, head[key], key, what)
        indices, shape = None, head[key]["shape"]
        if name + ".indices" in head:
            it = head[name + ".indices"]
            if it.get("dtype") != "I64":
                raise PatchError(f"{what}: {name}.indices: dtype {it.get('dtype')}, not I64")
            indices = _array(buf, start, it, name + ".indices", what)
            shape = shapes.get(name)
            if not isinstance(shape, list) or len(indices) != len(values):
                raise PatchError(f"{what}: {name}: no full shape in __metadata__ or indices/values differ")
            n = math.prod(shape)
            if len(indices) and (indices[0] < 0 or indices[-1] >= n or (np.diff(indices) <= 0).any()):
                raise PatchError(f"{what}: {name}: indices not sorted, unique and within {n} elements")
        entries.append(Entry(name, head[key]["dtype"], shape, values, indices))
    return Patch(frm, to, entries)


def apply_to_arrays(patch, arrays):
    """Apply to {name: numpy array} in place (each array holds the tensor's
    bytes in its storage type, e.g. uint16 for BF16); returns the names."""
    for e in patch.entries:
        if e.name not in arrays:
            raise PatchError(f"patch {patch.from_step}-{patch.to_step}: {e.name}: not in the model")
        a = arrays[e.name]
        if tuple(a.shape) != e.shape or a.dtype.itemsize != e.values.dtype.itemsize:
            raise PatchError(f"{e.name}: the model has {a.dtype}{list(a.shape)}, the patch {e.dtype}{list(e.shape)}")
    for e in patch.entries:
        flat = arrays[e.name].reshape(-1).view(e.values.dtype)
        if e.sparse:
            flat[e.indices] = e.values
        else:
            flat[:] = e.values
    return {e.name for e in patch.entries}


def has_nan(dtype, values):
    """Whether any value is a NaN, judged on its bits."""
    if dtype == "BF16":
        return bool(((values & 0x7FFF) > 0x7F80).any())
    if dtype == "F8_E4M3":
        return bool(((values & 0x7F) == 0x7F).any())
    if dtype == "F8_E5M2":
        return bool(((values & 0x7F) > 0x7C).any())
    if DTYPES[dtype][1]:
        return bool(np.isnan(values).any())
    return False


def read_tensor(folder, name):
    """One tensor of a model folder, whole, as a flat array of its storage
    type (from model.safetensors.index.json, else every *.safetensors)."""
    folder = str(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    files = None
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map", {})
        if name in wm:
            files = [wm[name]]
    if files is None:
        files = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    for fname in files:
        path = os.path.join(folder, os.path.basename(fname))
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > MAX_HEADER:
                raise PatchError(f"{path}: header of {n} bytes")
            head = json.loads(f.read(n))
            if name in head:
                t = head[name]
                b, e = t["data_offsets"]
                f.seek(8 + n + b)
                buf = f.read(e - b)
                return _array(buf, -b, t, name, path)
    raise PatchError(f"{folder}: no tensor {name}")


def plan(patch, step_dir=None):
    """(sparse, dense) lists of Entry for vLLM: a call is all sparse or all
    dense, and a sparse entry must be floating point without NaN values;
    the others go dense, read whole from step_dir (the patch's TO step)."""
    sparse, dense = [], []
    for e in patch.entries:
        if not e.sparse:
            dense.append(e)
        elif DTYPES[e.dtype][1] and not has_nan(e.dtype, e.values):
            sparse.append(e)
        elif step_dir is None:
            raise PatchError(f"{e.name}: sparse {e.dtype} values vLLM cannot take sparse, and no step folder")
        else:
            dense.append(Entry(e.name, e.dtype, e.shape, read_tensor(step_dir, e.name), None))
    return sparse, dense


class DwsfsWorkerExtension:
    """Mixed into vLLM's worker (`--worker-extension-cls`)."""

    def dwsfs_apply_patch(self, patch_path, step_dir=None):
        import torch
        from vllm.model_executor.model_loader.checkpoint_weight_patch import (
            CheckpointWeightPatch, load_checkpoint_weight_patches)

        torch_types = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                       "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                       "U8": torch.uint8, "BOOL": torch.bool}
        model = self.model_runner.model
        device = next(model.parameters()).device
        patch = read_patch(patch_path)
        sparse, dense = plan(patch, step_dir)

        def to_vllm(e):
            if e.dtype not in torch_types:
                raise PatchError(f"{e.name}: dtype {e.dtype} has no torch type")
            dt = torch_types[e.dtype]
            values = torch.from_numpy(e.values.copy().view(np.uint8)).view(dt).to(device)
            indices = None if e.indices is None else torch.from_numpy(e.indices.copy()).to(device)
            return CheckpointWeightPatch(e.name, e.shape, dt, values, indices)

        loaded = set()
        for group in (sparse, dense):
            if group:
                loaded |= load_checkpoint_weight_patches(model, [to_vllm(e) for e in group])
        return {"from_step": patch.from_step, "to_step": patch.to_step,
                "sparse": len(sparse), "dense": len(dense), "loaded": len(loaded)}
