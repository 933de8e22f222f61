#!/usr/bin/python3
"""Reference reader for the tests: a slow, strict Python `dwsctl extract`.

    dwsref.py extract BUCKET OUTDIR [--step N] [--base DIR] [--map-prefix FROM=TO]

(so `DWSCTL=tests/dwsref.py pytest tests` checks the harness itself).

It decodes the bucket's files (the path the generator's oracle never takes), so
agreement between its output and expected/<N>/ proves the encoders and the oracle
agree; its error reasons use the phrases the C tool must print.
"""
import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np

import dwsgen as g

STEP_RE = re.compile(r"step_(\d{6,})\.safetensors(\.zst)?$")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's cap
# A sparse delta holds at most one index (4 bytes at most) and one BF16 value
# per element of each tensor it patches, each tensor once.
SPARSE_BYTES_PER_ELEMENT = 6


class RefError(Exception):
    def __init__(self, file, reason):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


# ---------------------------------------------------------------- safetensors

def parse(blob, file):
    """Validate a safetensors file: (entries, metadata, data start)."""
    if len(blob) < 8:
        raise RefError(file, "truncated: shorter than 8 bytes")
    (n,) = struct.unpack_from("<Q", blob)
    if n > len(blob) - 8:
        raise RefError(file, "header length past the end of the file")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RefError(file, "invalid json header") from None
    if not isinstance(header, dict):
        raise RefError(file, "invalid json header: not an object")
    meta = header.pop(g.META, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise RefError(file, "metadata values must be strings")
    data_len = len(blob) - 8 - n
    spans = []
    for name, e in header.items():
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in g.DTYPE_SIZE:
            raise RefError(file, f"{name}: unknown dtype {dtype}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RefError(file, f"{name}: bad shape {shape}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            raise RefError(file, f"{name}: data offsets outside the data")
        if offs[1] - offs[0] != int(np.prod(shape, dtype=np.int64)) * g.DTYPE_SIZE[dtype]:
            raise RefError(file, f"{name}: size of dtype/shape disagrees with offsets")
        spans.append((offs[0], offs[1], name))
    # The tensors need sum(sizes) bytes: a shorter data section is a cut file;
    # otherwise an end past the data is an offset pointing outside it.
    if sum(e - b for b, e, _ in spans) > data_len:
        raise RefError(file, "truncated data")
    spans.sort()
    for b, e, name in spans:
        if e > data_len:
            raise RefError(file, f"{name}: data offsets outside the data")
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise RefError(file, f"{n0} and {n1}: data offsets overlap")
    # the safetensors library's rule: the file ends where the last tensor does
    if max((e for _, e, _ in spans), default=0) != data_len:
        raise RefError(file, "trailing data after the last tensor")
    return header, meta, 8 + n


def declared_size(head):
    """8 + header length + the end of the last tensor: the size a file's
    header (in `head`, its first bytes) declares; None if it does not parse."""
    try:
        (n,) = struct.unpack_from("<Q", head)
        header = json.loads(head[8:8 + n].decode("utf-8"))
        ends = [e["data_offsets"][1] for k, e in header.items() if k != g.META]
        return 8 + n + max((int(x) for x in ends), default=0)
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def check_sparse_size(file, meta, data_len, model):
    """A sparse delta holds no more than 6 bytes per element of the model."""
    if model is not None and meta.get("sparse") == "True":
        cap = SPARSE_BYTES_PER_ELEMENT * sum(model.values())
        if data_len > cap:
            raise RefError(file, f"too large for a sparse delta of this model: {data_len} bytes of data, at most {cap}")


# ---------------------------------------------------------------- bucket

def read_file(path, file, model=None):
    if path.endswith(".zst"):
        return read_zst(path, file, model)
    with open(path, "rb") as f:
        return f.read()


def read_zst(path, file, model):
    """A .zst object read as dwsfs reads it: the header first, then exactly
    the size it declares and not a byte more (a bomb is never inflated); a
    sparse delta larger than the model allows is refused before its data."""
    with open(path, "rb") as src:
        p = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=src, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        out = p.stdout.read(8)
        size = None
        if len(out) == 8 and struct.unpack("<Q", out)[0] <= MAX_HEADER:
            out += p.stdout.read(struct.unpack("<Q", out)[0])
            size = declared_size(out)
        if size is None:
            out += p.stdout.read(MAX_HEADER)  # a broken header: parse() says what is wrong
        else:
            n = struct.unpack_from("<Q", out)[0]
            meta = json.loads(out[8:8 + n]).get(g.META, {})
            check_sparse_size(file, meta if isinstance(meta, dict) else {}, size - 8 - n, model)
            out += p.stdout.read(size - len(out))
            if len(out) == size and p.stdout.read(1):
                raise RefError(file, "trailing data after the last tensor (the zstd stream goes on)")
        if p.wait() != 0:
            raise RefError(file, "zstd: cannot decompress")
        return out
    finally:
        p.kill()
        p.wait()


def current_run(bucket):
    """[(step, relative file, mtime_ns)] of the current run, ascending.

    Within one run uploads follow the steps, so the current run is the
    longest run of steps, from the one most recently uploaded downwards,
    whose mtimes do not decrease; higher steps with older mtimes are left
    over from a previous run."""
    files = {}
    for folder in ("anchors", "deltas"):
        d = os.path.join(bucket, folder)
        for f in os.listdir(d) if os.path.isdir(d) else []:
            m = STEP_RE.match(f)
            if m:
                step = int(m.group(1))
                assert step not in files, f"two files for step {step}"
                files[step] = (f"{folder}/{f}", os.stat(os.path.join(d, f)).st_mtime_ns)
    run = []
    for step in sorted(files):
        if run and files[step][1] < run[-1][2]:
            break
        run.append((step, *files[step]))
    return run


def decode(blob, file, model):
    """('dense', {name: bits}) or ('sparse', {name: (indices, bits)}), validated
    against model {name: numel} (None: accept any name, for the first anchor)."""
    header, meta, start = parse(blob, file)
    sparse = meta.get("sparse", "False")
    if sparse not in ("True", "False"):
        raise RefError(file, f"sparse must be True or False, not {sparse!r}")
    check_sparse_size(file, meta, len(blob) - start, model)

    def check_name(name):
        if model is not None and name not in model:
            raise RefError(file, f"unknown tensor {name}")

    if sparse == "False":
        out = {}
        for name, e in header.items():
            check_name(name)
            if e["dtype"] != "BF16":
                raise RefError(file, f"{name}: dense tensor dtype {e['dtype']} is not BF16")
            if model is not None and int(np.prod(e["shape"])) != model[name]:
                raise RefError(file, f"{name}: shape {e['shape']} does not match the model")
            out[name] = g.tensor_array(blob, e, start).copy()
        return "dense", out

    encoding = meta.get("encoding")
    if encoding is None:
        try:
            names = json.loads(meta.get("changed_params", ""))
        except ValueError:
            raise RefError(file, "metadata changed_params is not a JSON list") from None
        suffix_idx, suffix_val = ".indices", ".values"
    elif encoding in ("raw", "gap_delta"):
        names = [k[:-4] for k in header if k.endswith(".val")]
        suffix_idx, suffix_val = ".idx", ".val"
    elif encoding == "nvcomp_cascaded":
        raise RefError(file, "encoding nvcomp_cascaded is GPU-only; not supported")
    else:
        raise RefError(file, f"unknown encoding {encoding}")
    out = {}
    for name in names:
        ie, ve = header.get(name + suffix_idx), header.get(name + suffix_val)
        if ie is None or ve is None:
            raise RefError(file, f"{name}: missing {suffix_idx} or {suffix_val} tensor")
        check_name(name)
        want = {"gap_delta": ("U16", "U32")}.get(encoding, ("I32",))
        if ie["dtype"] not in want or ve["dtype"] != "BF16":
            raise RefError(file, f"{name}: bad index/value dtype {ie['dtype']}/{ve['dtype']}")
        if len(ie["shape"]) != 1 or len(ve["shape"]) != 1:
            raise RefError(file, f"{name}: index/value shape must be 1-D")
        idx = g.tensor_array(blob, ie, start).astype(np.int64)
        val = g.tensor_array(blob, ve, start).copy()
        if len(idx) != len(val):
            raise RefError(file, f"{name}: index/value count mismatch {len(idx)} != {len(val)}")
        if encoding == "gap_delta":
            idx = g.indices_from_gaps(idx)
        elif len(idx) > 1 and (np.diff(idx) <= 0).any():
            raise RefError(file, f"{name}: indices not ascending")
        numel = model[name] if model is not None else None
        if len(idx) and (idx[0] < 0 or (numel is not None and idx[-1] >= numel)):
            raise RefError(file, f"{name}: index out of range")
        out[name] = (idx, val)
    return "sparse", out


def reconstruct(bucket, step=None):
    """(bytes of the complete file giving the layout, {name: bits}) at step."""
    run = current_run(bucket)
    if not run:
        raise RefError(bucket, "no steps")
    steps = [s for s, _, _ in run]
    step = steps[-1] if step is None else step
    if step not in steps:
        raise RefError(bucket, f"no step {step} in the current run")
    chain = [rel for s, rel, _ in run if s <= step]
    # The model's parameters are those of the run's first file, a complete anchor.
    blobs = {chain[0]: read_file(os.path.join(bucket, chain[0]), chain[0])}
    kind, first = decode(blobs[chain[0]], chain[0], None)
    if kind != "dense":
        raise RefError(chain[0], "the run does not start with a dense anchor")
    model = {n: len(b) for n, b in first.items()}
    for rel in chain[1:]:
        blobs[rel] = read_file(os.path.join(bucket, rel), rel, model)

    def complete(rel):
        header, meta, _ = parse(blobs[rel], rel)
        return meta.get("sparse") == "False" and set(header) == set(model)

    start = max(i for i, rel in enumerate(chain) if complete(rel))
    layout = blobs[chain[start]]
    _, state = decode(layout, chain[start], model)
    for rel in chain[start + 1:]:
        kind, content = decode(blobs[rel], rel, model)
        for name, c in content.items():
            if kind == "dense":
                state[name] = c
            else:
                state[name][c[0]] = c[1]
    return layout, state


def extract(bucket, out, step=None, base=None, map_prefix=None):
    """Write the output folder; on error nothing is left at `out`."""
    layout, state = reconstruct(bucket, step)
    if base is None and os.path.isdir(os.path.join(bucket, "base")):
        base = os.path.join(bucket, "base")
    src, dst = map_prefix.split("=", 1) if map_prefix else ("", "")
    to_trainer = {(dst + n[len(src):] if map_prefix and n.startswith(src) else n): n for n in state}
    files = {}
    if base is None:
        header, _, _ = g.parse_header(layout)
        files["model.safetensors"] = g.replace_tensor_data(layout, {n: state[n].tobytes() for n in header})
    else:
        for rel in sorted(os.listdir(base)):
            with open(os.path.join(base, rel), "rb") as f:
                blob = f.read()
            if rel.endswith(".safetensors"):
                header, _, _ = parse(blob, rel)
                repl = {}
                for name, e in header.items():
                    if name in to_trainer:
                        bits = state[to_trainer[name]]
                        if int(np.prod(e["shape"])) != len(bits):
                            raise RefError(rel, f"{name}: shape does not match the trainer's")
                        repl[name] = g.bf16_as(bits, e["dtype"])
                blob = g.replace_tensor_data(blob, repl)
            files[rel] = blob
    tmp = str(out) + ".tmp"
    os.makedirs(tmp)
    try:
        for rel, blob in files.items():
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(blob)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- comparing folders

def _locate(blob, offset):
    """Which part of a safetensors file holds byte `offset`."""
    try:
        header, _, start = g.parse_header(blob)
    except (ValueError, struct.error):
        return "not a safetensors file"
    if offset < start:
        return "the header"
    for name, e in header.items():
        b, end = e["data_offsets"]
        if start + b <= offset < start + end:
            el = (offset - start - b) // g.DTYPE_SIZE[e["dtype"]]
            return f"tensor {name} ({e['dtype']} {e['shape']}), element {el}"
    return "no tensor"


def diff_folders(actual, expected):
    """None if the folders hold the same files with the same bytes, else a
    description of the first difference."""
    def listing(d):
        return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
    a, e = listing(actual), listing(expected)
    if a != e:
        return f"file sets differ: missing {sorted(set(e) - set(a))}, unexpected {sorted(set(a) - set(e))}"
    for rel in e:
        with open(os.path.join(actual, rel), "rb") as f:
            got = f.read()
        with open(os.path.join(expected, rel), "rb") as f:
            want = f.read()
        if got == want:
            continue
        n = min(len(got), len(want))
        first = next((i for i in range(n) if got[i] != want[i]), n) if got[:n] != want[:n] else n
        where = _locate(want, first) if rel.endswith(".safetensors") else "file"
        return (f"{rel}: first difference at byte {first} ({where}); "
                f"sizes {len(got)} vs expected {len(want)}")
    return None


def failure_problem(proc):
    """None if a finished dwsctl process failed cleanly (non-zero exit, no
    signal, no sanitizer report), else what went wrong."""
    if proc.returncode == 0:
        return "exit status 0, expected a failure"
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}\n{proc.stderr}"
    for bad in ("AddressSanitizer", "LeakSanitizer", "runtime error"):
        if bad in proc.stderr:
            return f"sanitizer report in stderr:\n{proc.stderr}"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["extract"])
    ap.add_argument("bucket")
    ap.add_argument("out")
    ap.add_argument("--step", type=int)
    ap.add_argument("--base")
    ap.add_argument("--map-prefix")
    a = ap.parse_args(argv)
    try:
        extract(a.bucket, a.out, a.step, a.base, a.map_prefix)
    except RefError as e:
        print(f"dwsref: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
