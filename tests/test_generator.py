"""Self-checks of the test data: they run without dwsctl.

The reference reader decodes the files the generator wrote; its output must equal
expected/<N>/, which the generator wrote from the simulator's state instead.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dwsgen as g
import dwsref
import gen_bucket
import gen_malformed
from gen_bucket import SCENARIOS

HERE = os.path.dirname(os.path.abspath(__file__))


def _ref_args(info):
    a = info["extract_args"]
    return {"base": a[a.index("--base") + 1] if "--base" in a else None,
            "map_prefix": a[a.index("--map-prefix") + 1] if "--map-prefix" in a else None}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reference_decoder_matches_oracle(scenarios, tmp_path, name):
    root, info = scenarios[name]
    assert info["steps"] == gen_bucket.valid_steps(name)
    for step in info["steps"] + [None]:
        out = str(tmp_path / f"out{step}")
        dwsref.extract(info["bucket"], out, step, **_ref_args(info))
        diff = dwsref.diff_folders(out, root / "expected" / str(step or info["latest"]))
        assert diff is None, f"step {step}: {diff}"
    for step in info["invalid_steps"]:
        with pytest.raises(dwsref.RefError):
            dwsref.extract(info["bucket"], str(tmp_path / "bad"), step, **_ref_args(info))
        assert not (tmp_path / "bad").exists()


def test_changed_fraction_is_realistic(scenarios):
    for name, (_, info) in scenarios.items():
        assert len(info["changed_fraction"]) == len(info["steps"])
        assert all(0.005 <= f <= 0.02 for f in info["changed_fraction"]), (name, info["changed_fraction"])


def _headers(bucket):
    for folder in ("anchors", "deltas"):
        for f in sorted(os.listdir(os.path.join(bucket, folder))):
            yield f"{folder}/{f}", dwsref.read_file(os.path.join(bucket, folder, f), f)


@pytest.mark.parametrize("name", ["v3gap", "zstd"])
def test_u32_gaps_occur(scenarios, name):
    dtypes = {e["dtype"] for _, blob in _headers(scenarios[name][1]["bucket"])
              for k, e in g.parse_header(blob)[0].items() if k.endswith(".idx")}
    assert dtypes == {"U16", "U32"}


def test_scenario_shapes(scenarios):
    def files(name):
        b = scenarios[name][1]["bucket"]
        return {f"{d}/{f}" for d in ("anchors", "deltas") for f in os.listdir(os.path.join(b, d))}

    assert "deltas/step_000002.safetensors" in files("v1")
    assert {"anchors/step_999998.safetensors", "deltas/step_1000000.safetensors",
            "deltas/step_1000002.safetensors"} <= files("bigsteps")
    assert {"anchors/step_000001.safetensors", "anchors/step_000006.safetensors.zst",
            "anchors/step_000011.safetensors", "deltas/step_000002.safetensors.zst"} <= files("zstd")
    assert not any(f.endswith(".safetensors") for f in files("zstd") if f.startswith("deltas/"))
    assert "deltas/step_000004.safetensors" not in files("gaps")
    for name, partial in [("v1", [5, 10]), ("v2raw", [5, 9])]:
        bucket, model = scenarios[name][1]["bucket"], dict(g.model_params())
        for step in partial:
            with open(os.path.join(bucket, "anchors", gen_bucket.step_file(step)), "rb") as f:
                header, meta, _ = g.parse_header(f.read())
            assert meta["sparse"] == "False" and 0 < len(header) < len(model)


def test_restart_leaves_old_run_behind(scenarios):
    bucket = scenarios["restart"][1]["bucket"]
    mtime = {s: os.stat(os.path.join(bucket, rel)).st_mtime_ns for s, rel, _ in
             [(int(f[5:11]), f"{d}/{f}", 0) for d in ("anchors", "deltas") for f in os.listdir(os.path.join(bucket, d))]}
    assert sorted(mtime) == list(range(1, 16))
    assert max(mtime[s] for s in range(7, 16)) + 3600 * 10**9 == min(mtime[s] for s in range(1, 7))
    assert scenarios["restart"][1]["latest"] == 6


def test_generation_is_deterministic(tmp_path):
    gen_bucket.generate(tmp_path / "a", "v3gap")
    gen_bucket.generate(tmp_path / "b", "v3gap")
    assert dwsref.diff_folders(tmp_path / "a" / "bucket", tmp_path / "b" / "bucket") is None


def test_list_cli():
    out = subprocess.run([sys.executable, os.path.join(HERE, "gen_bucket.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == list(SCENARIOS)


@pytest.mark.parametrize("case", list(gen_malformed.CASES))
def test_malformed_case_is_what_it_claims(malformed, case):
    with open(malformed / case / "expect.json") as f:
        expect = json.load(f)
    with pytest.raises(dwsref.RefError) as err:
        dwsref.extract(str(malformed / case / "bucket"), str(malformed / case / "out"), expect["step"])
    assert err.value.file == expect["file"] and expect["reason"] in err.value.reason.lower(), str(err.value)


def test_bf16_rounding():
    f32max = np.finfo(np.float32).max
    f = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, f32max, np.inf, np.nan], np.float32)
    assert [hex(b) for b in g.f32_to_bf16(f)] == \
        ["0x3f80", "0x3f80", "0x3f82", "0x3f81", "0xc020", "0x7f80", "0x7f80", "0x7fc0"]
    assert g.bf16_to_f32(np.array([0x3F81], np.uint16))[0] == np.float32(1 + 2**-7)
    # Into F16: exact values stay, subnormal ties go to even, too large becomes inf.
    bits = g.f32_to_bf16(np.array([1 + 2**-7, 1.5 * 2**-24, 2.5 * 2**-24, 70000.0], np.float32))
    assert g.bf16_to_f16(bits).tolist() == [1 + 2**-7, 2 * 2**-24, 2 * 2**-24, np.inf]


def test_safetensors_writer_layout():
    t = {"b": g.tensor("BF16", [1, 2, 3]), "a": g.tensor("I32", [7])}
    blob = g.safetensors_bytes(t, {"k": "v"}, order=["a", "b"], key_order=["b", g.META, "a"])
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0 and blob[8:8 + n].rstrip(b" ").endswith(b"}")
    assert list(json.loads(blob[8:8 + n])) == ["b", g.META, "a"]
    header, meta, start = g.parse_header(blob)
    assert header["a"]["data_offsets"] == [0, 4] and header["b"]["data_offsets"] == [4, 10]
    assert meta == {"k": "v"} and len(blob) == start + 10
    assert g.indices_from_gaps(g.gaps_from_indices([0, 5, 70000])[1]).tolist() == [0, 5, 70000]
    assert g.gaps_from_indices([0, 5, 70000])[0] == "U32" and g.gaps_from_indices([3, 9])[0] == "U16"
