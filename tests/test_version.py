"""--version of dwsfs and dwsctl: the version of meson.build and the source
revision the binary was built from (git describe at build time; the version
again where the source is not a git checkout)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mountutil import DWSCTL, DWSFS

REPO = Path(__file__).resolve().parent.parent


def project_version():
    return re.search(r"version\s*:\s*'([^']+)'", (REPO / "meson.build").read_text()).group(1)


def source_revision():
    """What the build saw, less a -dirty the test run cannot judge."""
    if not (REPO / ".git").exists() or not shutil.which("git"):
        return project_version()
    p = subprocess.run(["git", f"--git-dir={REPO / '.git'}", "describe", "--always", "--tags"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    return p.stdout.strip() if p.returncode == 0 else project_version()


@pytest.mark.parametrize("prog,name", [(DWSFS, "dwsfs"), (DWSCTL, "dwsctl")])
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_revision(prog, name, flag):
    if not os.access(prog, os.X_OK):
        pytest.skip(f"{prog} not built")
    p = subprocess.run([prog, flag], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    first = p.stdout.splitlines()[0]
    m = re.match(rf"^{name} (\S+) \(revision (\S+)\)", first)
    assert m, first
    assert m.group(1) == project_version(), first
    assert re.sub(r"-dirty$", "", m.group(2)) == source_revision(), first
