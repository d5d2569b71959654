"""ruff (configured in ruff.toml: pyflakes, pycodestyle, lines of at most 120 columns) finds nothing in the
repository, as CI runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                            text=True, cwd=REPO, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
