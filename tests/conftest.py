import json
import os
import subprocess
from pathlib import Path

import pytest

import gen_bucket
import gen_malformed
from hubserver import Hub

REPO = Path(__file__).resolve().parent.parent

# s3:// without keys ends the AWS credential chain at the instance metadata
# service, 169.254.169.254: never from a test (tests/test_creds.py points it
# at a loopback mock where it wants one)
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
DWSCTL = os.environ.get("DWSCTL", str(REPO / "build" / "dwsctl"))


@pytest.fixture(scope="session")
def dwsctl():
    if not (os.path.isfile(DWSCTL) and os.access(DWSCTL, os.X_OK)):
        pytest.skip(f"dwsctl not built: no executable {DWSCTL} (build it or set DWSCTL)")
    return DWSCTL


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory):
    """{scenario: (output folder, info.json)} for every scenario, default seed."""
    root = tmp_path_factory.mktemp("scenarios")
    out = {}
    for name in gen_bucket.SCENARIOS:
        gen_bucket.generate(root / name, name)
        with open(root / name / "info.json") as f:
            out[name] = (root / name, json.load(f))
    return out


@pytest.fixture(scope="session")
def malformed(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    gen_malformed.generate(str(root))
    return root


@pytest.fixture
def extract(dwsctl):
    """Run `dwsctl extract BUCKET OUT [--step N] ARGS...`."""
    def run(bucket, out, step=None, args=()):
        cmd = [dwsctl, "extract", str(bucket), str(out)]
        if step is not None:
            cmd += ["--step", str(step)]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)
    return run


@pytest.fixture
def hub(tmp_path):
    """A loopback Hub (tests/hubserver.py) over tmp_path/hubroot: (hub, root)."""
    root = tmp_path / "hubroot"
    (root / "buckets" / "test").mkdir(parents=True)
    h = Hub(str(root)).start()
    try:
        yield h, root
    finally:
        h.stop()
