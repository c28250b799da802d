"""Jetson install check: does ``echofleet[edge]`` install on a Jetson Orin (JetPack 6: Linux aarch64, Python 3.10)?

Asks the package index itself (``pip install --dry-run`` for that platform, wheels only, no
local pip configuration), so it needs the network: without it the test is skipped with the
reason. What JetPack provides instead of PyPI (TensorRT and its Python bindings, CUDA; the GPU
build of ONNX Runtime from NVIDIA's Jetson index) is in docs/edge.md, "Jetson install".
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging import tags
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
JETPACK6_PYTHON = "3.10"  # Ubuntu 22.04's Python, the one JetPack 6's TensorRT bindings are built for
# JetPack 6 is Ubuntu 22.04 (glibc 2.35): pip takes every manylinux tag up to it only when each is named
PLATFORMS = [f"manylinux_2_{v}_aarch64" for v in range(35, 16, -1)] + ["manylinux2014_aarch64"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _index_unreachable() -> str | None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError as e:
        return f"no network to the package index (pypi.org:443: {e})"
    return None


@pytest.mark.skipif(_index_unreachable() is not None, reason=str(_index_unreachable()))
def test_edge_extra_resolves_for_jetson_aarch64_python310(tmp_path: Path) -> None:
    project = _pyproject()["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["edge"]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--quiet", "--ignore-installed",
           "--only-binary=:all:", "--python-version", JETPACK6_PYTHON, "--target", str(tmp_path / "t"),
           "--report", str(report), *(a for p in PLATFORMS for a in ("--platform", p)), *requirements]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"echofleet[edge] does not resolve for Jetson (aarch64, Python {JETPACK6_PYTHON}):\n{res.stderr[-3000:]}"
    wheels = {i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[-1] for i in json.loads(report.read_text())["install"]}
    for name in ("onnxruntime", "openvino", "numpy", "cryptography", "pillow", "grpcio"):
        assert name in wheels, f"{name} missing from the resolution: {sorted(wheels)}"
    jetson = set(tags.cpython_tags((3, 10), platforms=PLATFORMS)) | set(tags.compatible_tags((3, 10), platforms=PLATFORMS))
    for wheel in wheels.values():  # every wheel installs on CPython 3.10 / aarch64 / glibc 2.35
        assert parse_wheel_filename(wheel)[3] & jetson, f"{wheel}: not installable on a Jetson's CPython 3.10"


def test_echofleet_itself_accepts_jetpack6_python() -> None:
    """JetPack's TensorRT bindings are built for its Python 3.10: echofleet must install next to them."""
    assert JETPACK6_PYTHON + ".12" in SpecifierSet(_pyproject()["project"]["requires-python"])


# Standard-library names that exist only from Python 3.11 on (and would fail on a Jetson at import or call time).
PY311_ONLY = ("contextlib.chdir", "hashlib.file_digest", "datetime.UTC", "enum.StrEnum", "typing.Self",
              "typing.LiteralString", "typing.Never", "typing.assert_never", "asyncio.TaskGroup", "ExceptionGroup")


def _py311_only_uses(path: Path) -> list[str]:
    """Syntax newer than 3.10 (``except*``, PEP 695) and 3.11-only standard-library names; ``tomllib`` only
    behind a ``sys.version_info`` check (with ``tomli`` for 3.10)."""
    import ast

    src = path.read_text()
    try:
        tree = ast.parse(src, feature_version=(3, 10))
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: syntax newer than Python 3.10 ({e.msg})"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            name = " ".join(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Name):
            name = node.id
        else:
            continue
        found += [f"{path}:{node.lineno}: {n}" for n in PY311_ONLY if n in name.split(" ") or name == n]
    if "import tomllib" in src and "import tomli as tomllib" not in src:
        found.append(f"{path}: imports tomllib without the tomli fallback for Python 3.10")
    return found


def test_package_code_runs_on_jetpack6_python() -> None:
    packages = ("echocare", "fed", "server", "edge", "echofleet")
    problems = [p for pkg in packages for f in sorted((ROOT / pkg).rglob("*.py")) for p in _py311_only_uses(f)]
    assert not problems, "\n".join(problems)
    assert "tomli>=2; python_version < '3.11'" in _pyproject()["project"]["dependencies"]
