"""The layers point down only: ``lint-imports`` (import-linter) with the contracts in pyproject.toml.

echofleet (the shell) > edge > server > fed > echocare (ground floor); the scanner side (``edge.device``)
never imports torch nor the build side. The second test breaks a copy of the tree on purpose and checks
that the same contracts notice, so a linter that silently checked nothing would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("echofleet", "edge", "server", "fed", "echocare")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_point_down_only():
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_contracts_notice_an_upward_import_and_torch_on_the_scanner(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "echocare" / "atomic.py", "a") as f:
        f.write("\nimport fed.policy  # upward: the ground floor must not know the hospital side\n")
    with open(tmp_path / "edge" / "device" / "backends.py", "a") as f:
        f.write("\nimport torch  # the scanner has no torch\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "echocare.atomic -> fed.policy" in res.stdout
    assert "edge.device.backends -> torch" in res.stdout
