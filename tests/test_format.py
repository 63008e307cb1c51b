"""The tree is formatted by the one formatter pyproject.toml configures."""

import subprocess
import sys

from tests.conftest import REPO


def test_the_tree_is_formatted():
  done = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "."],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 0, (
    "Run `ruff format .` from the repository root:\n"
    + done.stdout[-3000:]
    + done.stderr[-1000:]
  )
