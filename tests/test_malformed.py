"""dwsctl extract refuses each malformed file with one clear error line."""
import json

import pytest

import dwsref
from gen_malformed import CASES


@pytest.mark.parametrize("case", list(CASES))
def test_malformed(extract, malformed, tmp_path, case):
    with open(malformed / case / "expect.json") as f:
        expect = json.load(f)
    out = tmp_path / "out"
    proc = extract(malformed / case / "bucket", out, expect["step"])
    problem = dwsref.failure_problem(proc)
    assert problem is None, problem
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    assert expect["file"] in lines[0], f"error line does not name {expect['file']}: {lines[0]}"
    assert expect["reason"] in lines[0].lower(), f"error line lacks {expect['reason']!r}: {lines[0]}"
    assert not out.exists(), "a failed extract must not leave OUTDIR behind"
