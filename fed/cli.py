"""CLI: ``echofleet simulate`` and ``echofleet evaluate``."""

from __future__ import annotations


def simulate() -> None:
    raise SystemExit("not implemented yet")


def evaluate() -> None:
    raise SystemExit("not implemented yet")
