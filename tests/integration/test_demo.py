"""The demo (``scripts/demo.sh``) as a user runs it: it shows what the README says and leaves
nothing in the temp folder (its runs, about 35 MB, go to a temporary folder it removes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).parents[2] / "examples" / "demo.py"


@pytest.mark.slow  # about a minute: four short fine-tunes, one killed and resumed
def test_the_demo_shows_an_exact_resume_and_leaves_nothing_in_the_temp_folder(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "bit for bit: identical; final weights: identical" in proc.stdout
    assert "pass --workdir DIR to keep the runs" in proc.stdout
    assert list(temp.iterdir()) == []
