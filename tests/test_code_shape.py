"""The code's shape (issue #16): no file in src/ or fs/ over 800 lines, no
function over 120 lines, no loop of files that call each other (from the
object files of the build under test). scripts/code_shape.py says what
breaks a rule."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_code_shape():
    build = Path(os.environ.get("DWSFS", REPO / "build" / "dwsfs")).resolve().parent
    p = subprocess.run(["/usr/bin/python3", str(REPO / "scripts" / "code_shape.py"), str(build)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
