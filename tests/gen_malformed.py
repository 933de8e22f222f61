#!/usr/bin/python3
"""Write one small bucket per kind of malformed file.

    gen_malformed.py OUT

OUT/<case>/bucket/    a valid complete anchor at step 1 and ONE bad file (usually
                      deltas/step_000002.safetensors, sometimes the anchor itself,
                      which then replaces the valid one)
OUT/<case>/expect.json  {"step": step to extract, "file": the bad file relative to the
                      bucket, "reason": lowercase phrase the error line must contain,
                      "detail": what is wrong}
"""
import json
import os
import struct
import sys

import numpy as np

import dwsgen as g

EMB, UP, NORM = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
SHAPES = {EMB: (16, 8), UP: (16, 8), NORM: (8,)}
TOTAL = sum(int(np.prod(s)) for s in SHAPES.values())
T0_NS = 1_700_000_000_000_000_000
ANCHOR, DELTA = "anchors/step_000001.safetensors", "deltas/step_000002.safetensors"
VALS = g.f32_to_bf16(np.array([0.5, -0.25, 0.125], np.float32))


def anchor_tensors():
    return {n: g.tensor("BF16", g.f32_to_bf16(np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32)), s)
            for n, s in SHAPES.items()}


def anchor():
    return g.safetensors_bytes(anchor_tensors(), g.trainer_metadata(1, False, 3, TOTAL, TOTAL))


def meta(**extra):
    m = g.trainer_metadata(2, True, 1, 3, TOTAL)
    m.update(extra)
    return m


def v3(tensors, encoding="gap_delta", **extra):
    return g.safetensors_bytes(tensors, meta(encoding=encoding, **extra))


def v1(tensors, names):
    return g.safetensors_bytes(tensors, meta(changed_params=json.dumps(names)))


def gap_delta(name=EMB, gaps=(3, 13, 82), idx_dtype="U16"):
    return v3({name + ".idx": g.tensor(idx_dtype, gaps), name + ".val": g.tensor("BF16", VALS)})


def raw(idx):
    return v3({EMB + ".idx": g.tensor("I32", idx), EMB + ".val": g.tensor("BF16", VALS)}, "raw")


def by_hand(idx_entry, val_entry, data, metadata=None):
    """An EMB gap_delta delta whose two header entries are given as is."""
    header = {g.META: metadata or meta(encoding="gap_delta"), EMB + ".idx": idx_entry, EMB + ".val": val_entry}
    return g.raw_safetensors(header, data)


def relength(blob, n):
    return struct.pack("<Q", n) + blob[8:]


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GIB = 1 << 30
ZSTD_BLOCK = 128 * 1024  # the largest block a zstd frame may hold


def zstd_frame(data, zeros=0, content_size=None):
    """A zstd frame written by hand, so a test says exactly what it holds:
    `data` in raw blocks, then `zeros` zero bytes in RLE blocks (4 bytes per
    128 KiB: 2 GiB of zeros cost 64 KiB). content_size, when given, is the
    frame header's content size field (else the frame has none)."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    # descriptor: an 8-byte content size or none, a window descriptor follows;
    # window: 2**(10 + 7) = 128 KiB, room for the largest block
    out += bytes([0xC0 if content_size is not None else 0x00, 7 << 3])
    if content_size is not None:
        out += struct.pack("<Q", content_size)
    blocks = [(0, len(c), c) for c in (data[i:i + ZSTD_BLOCK] for i in range(0, len(data), ZSTD_BLOCK))]
    full, rest = divmod(zeros, ZSTD_BLOCK)
    if full:
        blocks.append((1, ZSTD_BLOCK, b"\0", full))
    if rest:
        blocks.append((1, rest, b"\0"))
    if not blocks:
        blocks.append((0, 0, b""))
    for i, (kind, size, body, *count) in enumerate(blocks):
        header = (size << 3) | (kind << 1)
        block = struct.pack("<I", header)[:3] + body
        n = count[0] if count else 1
        last = i == len(blocks) - 1
        out += block * (n - 1 if last else n)
        if last:
            out += struct.pack("<I", header | 1)[:3] + body
    return bytes(out)


def claims_gbs():
    """An anchor whose header declares a 4 GiB embedding, holding 1 KiB of data."""
    shapes = ((EMB, [65536, 32768]), (UP, [16, 8]), (NORM, [8]))
    total = sum(int(np.prod(s, dtype=np.int64)) for _, s in shapes)
    header = {g.META: g.trainer_metadata(1, False, 3, total, total)}  # complete, as it claims
    pos = 0
    for name, shape in shapes:
        n = 2 * int(np.prod(shape, dtype=np.int64))
        header[name] = entry("BF16", shape, pos, pos + n)
        pos += n
    return g.raw_safetensors(header, b"\0" * 1024)


def too_large_delta():
    """A gap_delta naming one tensor with 2**28 changed elements (1.5 GiB of
    indices and values) for a model of 264 elements, and holding them."""
    n = 1 << 28
    header = {g.META: meta(encoding="gap_delta"), EMB + ".idx": entry("U32", [n], 0, 4 * n),
              EMB + ".val": entry("BF16", [n], 4 * n, 6 * n)}
    blob = g.raw_safetensors(header, b"")
    return zstd_frame(blob, zeros=6 * n)


IDX_OK = entry("U16", [3], 0, 6)
DATA = np.array([3, 13, 82], "<u2").tobytes() + VALS.astype("<u2").tobytes()
ANCHOR_BLOB = anchor()

# case: (bad file, its bytes, reason, detail)
CASES = {
    "truncated_data": (DELTA, gap_delta()[:-3], "truncated", "a valid delta cut 3 bytes short"),
    "short_file": (DELTA, b"\x10\x00\x00\x00\x00", "truncated", "5 bytes: no room for the length"),
    "header_past_end": (DELTA, relength(gap_delta(), 4096), "header length",
                        "a valid delta whose header length says 4096 (the file has ~300 bytes)"),
    "header_huge": (DELTA, relength(gap_delta(), 2**62), "header length",
                    "a valid delta whose header length says 2**62"),
    "invalid_json": (DELTA, g.raw_safetensors('{"a": [1, 2', DATA), "invalid json", "JSON cut in the middle"),
    "json_not_object": (DELTA, g.raw_safetensors("[1, 2, 3]", DATA), "invalid json", "header is a JSON array"),
    "overlap": (DELTA, by_hand(IDX_OK, entry("BF16", [3], 4, 10), DATA),
                "overlap", ".val [4,10) overlaps .idx [0,6); sizes fit the 12 data bytes"),
    "outside": (DELTA, by_hand(IDX_OK, entry("BF16", [3], 2**40, 2**40 + 6), DATA),
                "outside", ".val at offset 2**40 of 12 data bytes; the file is as long as its tensors need"),
    "size_mismatch": (DELTA, by_hand(IDX_OK, entry("BF16", [3], 6, 14), DATA + b"\0\0"),
                      "size", ".val is BF16 [3] (6 bytes) but spans 8 bytes"),
    "unknown_dtype": (DELTA, by_hand(IDX_OK, entry("X9", [3], 6, 12), DATA), "unknown dtype", 'dtype "X9"'),
    "negative_shape": (DELTA, by_hand(IDX_OK, entry("BF16", [-3], 6, 12), DATA), "shape", "shape [-3]"),
    "metadata_not_string": (DELTA, by_hand(IDX_OK, entry("BF16", [3], 6, 12), DATA,
                                           dict(meta(encoding="gap_delta"), model_version=2)),
                            "metadata", "model_version is the number 2, not a string"),
    "count_mismatch": (DELTA, v1({EMB + ".indices": g.tensor("I32", [3, 17, 100]),
                                  EMB + ".values": g.tensor("BF16", VALS[:2])}, [EMB]),
                       "count mismatch", "v1: 3 indices, 2 values"),
    "index_out_of_range": (DELTA, raw([3, 17, 128]), "out of range", "raw: index 128 of a 128-element tensor"),
    "not_ascending": (DELTA, raw([17, 3, 100]), "not ascending", "raw: indices 17, 3, 100"),
    "duplicate_index": (DELTA, v1({EMB + ".indices": g.tensor("I32", [3, 17, 17]),
                                   EMB + ".values": g.tensor("BF16", VALS)}, [EMB]),
                        "not ascending", "v1: indices 3, 17, 17"),
    "unknown_tensor": (DELTA, gap_delta("model.layers.7.mlp.up_proj.weight"), "unknown tensor",
                       "a delta for a parameter the anchor does not have"),
    "nvcomp": (DELTA, v3({EMB + ".idx": g.tensor("U8", [1, 2, 3]), EMB + ".val": g.tensor("BF16", VALS)},
                         "nvcomp_cascaded"), "nvcomp", "encoding nvcomp_cascaded"),
    "v1_missing_indices": (DELTA, v1({EMB + ".indices": g.tensor("I32", [3, 17, 100]),
                                      EMB + ".values": g.tensor("BF16", VALS)}, [EMB, NORM]),
                           "missing", "changed_params names model.norm.weight, which has no .indices"),
    "gap_dtype_i8": (DELTA, gap_delta(idx_dtype="I8"), "dtype", "gap_delta .idx is I8"),
    "gaps_past_numel": (DELTA, gap_delta(gaps=(3, 13, 200)), "out of range",
                        "gaps 3, 13, 200 reach index 218 of 128"),
    "sparse_maybe": (DELTA, v3({EMB + ".idx": g.tensor("U16", [3, 13, 82]), EMB + ".val": g.tensor("BF16", VALS)},
                               sparse="maybe"), "sparse", "sparse=maybe"),
    "bad_zstd": (DELTA + ".zst", b"this is not a zstd frame\n" * 4, "zstd", "a .zst file that is not zstd"),
    "trailing_garbage": (DELTA, gap_delta() + b"\0garbage" * 4, "trailing",
                         "a valid delta followed by 32 bytes past the end of its last tensor"),
    "anchor_trailing": (ANCHOR, ANCHOR_BLOB + b"x", "trailing", "the only anchor with one byte past its last tensor"),
    "zstd_trailing": (DELTA + ".zst", zstd_frame(gap_delta() + b"\0garbage"), "trailing",
                      "a .zst delta whose content goes on 8 bytes past its last tensor"),
    "zstd_bomb_delta": (DELTA + ".zst", zstd_frame(gap_delta(), zeros=2 * GIB), "trailing",
                        "a .zst delta: a valid 3-element delta followed by 2 GiB of zeros (64 KiB compressed)"),
    "zstd_bomb_delta_sized": (DELTA + ".zst", zstd_frame(gap_delta(), zeros=2 * GIB,
                                                         content_size=len(gap_delta()) + 2 * GIB), "trailing",
                              "zstd_bomb_delta whose frame header gives its 2 GiB size"),
    "zstd_delta_too_large": (DELTA + ".zst", too_large_delta(), "too large",
                             "a .zst gap_delta holding 2**28 indices and values (1.5 GiB) for a 264-element model"),
    "zstd_bomb_anchor": (ANCHOR + ".zst", zstd_frame(ANCHOR_BLOB, zeros=2 * GIB), "trailing",
                         "the only anchor, .zst: a valid anchor followed by 2 GiB of zeros (64 KiB compressed)"),
    "zstd_anchor_claims_gbs": (ANCHOR + ".zst", zstd_frame(claims_gbs()), "truncated",
                               "the only anchor, .zst: its header declares a 4 GiB tensor, it holds 1 KiB"),
    "anchor_truncated": (ANCHOR, ANCHOR_BLOB[:-100], "truncated", "the only anchor cut 100 bytes short"),
    "anchor_unknown_dtype": (ANCHOR, ANCHOR_BLOB.replace(b'"BF16"', b'"X9"  ', 1), "unknown dtype",
                             'the only anchor has a tensor of dtype "X9"'),
}


def generate(out):
    for case, (rel, blob, reason, detail) in CASES.items():
        bucket = os.path.join(out, case, "bucket")
        # a bad anchor replaces the valid one (one file per step)
        files = {rel: blob} if rel.startswith(ANCHOR) else {ANCHOR: ANCHOR_BLOB, rel: blob}
        for name, data in files.items():
            path = os.path.join(bucket, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            t = T0_NS + (0 if name.startswith(ANCHOR) else 10 * 10**9)
            os.utime(path, ns=(t, t))
        expect = {"step": 1 if rel.startswith(ANCHOR) else 2, "file": rel, "reason": reason, "detail": detail}
        with open(os.path.join(out, case, "expect.json"), "w") as f:
            json.dump(expect, f, indent=2)
            f.write("\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    generate(argv[0])


if __name__ == "__main__":
    sys.exit(main())
