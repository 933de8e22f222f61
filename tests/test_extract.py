"""dwsctl extract against the simulator's oracle, byte for byte."""
import pytest

import dwsref
from gen_bucket import SCENARIOS, invalid_steps, valid_steps

STEPS = [pytest.param(n, s, id=f"{n}-{s}") for n in SCENARIOS for s in valid_steps(n)]
BAD_STEPS = [pytest.param(n, s, id=f"{n}-{s}") for n in SCENARIOS for s in invalid_steps(n)]


def _check(extract, scenarios, tmp_path, name, step, expected_step):
    root, info = scenarios[name]
    out = tmp_path / "out"
    proc = extract(info["bucket"], out, step, info["extract_args"])
    assert proc.returncode == 0, f"dwsctl extract failed ({proc.returncode}):\n{proc.stderr}"
    diff = dwsref.diff_folders(out, root / "expected" / str(expected_step))
    if diff:
        pytest.fail(diff)


@pytest.mark.parametrize("name,step", STEPS)
def test_extract_step(extract, scenarios, tmp_path, name, step):
    _check(extract, scenarios, tmp_path, name, step, step)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_extract_latest_by_default(extract, scenarios, tmp_path, name):
    _check(extract, scenarios, tmp_path, name, None, scenarios[name][1]["latest"])


@pytest.mark.parametrize("name,step", BAD_STEPS)
def test_extract_invalid_step_fails(extract, scenarios, tmp_path, name, step):
    """Missing steps, an old run's steps and steps past the latest do not exist."""
    _, info = scenarios[name]
    out = tmp_path / "out"
    proc = extract(info["bucket"], out, step, info["extract_args"])
    problem = dwsref.failure_problem(proc)
    assert problem is None, problem
    assert not out.exists(), "a failed extract must not leave OUTDIR behind"
