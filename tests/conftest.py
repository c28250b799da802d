"""Shared fixtures. Real data lives in ../shared/data beside the repository (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ECHOFLEET_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set ECHOFLEET_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def busi_root() -> Path:
    return _need(SHARED_DATA / "busi" / "Dataset_BUSI_with_GT")


@pytest.fixture(scope="session")
def hc18_root() -> Path:
    return _need(SHARED_DATA / "hc18")


@pytest.fixture(scope="session")
def pocus_root() -> Path:
    return _need(SHARED_DATA / "pocus")
