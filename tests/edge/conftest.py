"""Fixtures shared by the edge build tests (tests/edge/test_edge_build.py, test_precision_auto.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_helpers import fake_run_dir, trained_classifier

from echocare.bundle import generate_keypair


@pytest.fixture(scope="session")
def release_keys(tmp_path_factory) -> tuple[Path, Path]:
    """(private key, public key): the release key pair the builds sign with and the tests verify against."""
    return generate_keypair(tmp_path_factory.mktemp("keys") / "release")


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, busi_root) -> Path:
    """A federation run directory (RUN/global, RUN/report.json) around the BUSI-fitted tiny classifier
    (:func:`edge_helpers.trained_classifier`), made once per test process. Builds only read it."""
    tmp = tmp_path_factory.mktemp("classifier-run")
    return fake_run_dir(tmp / "run", trained_classifier(tmp, busi_root))
