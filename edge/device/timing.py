"""Wall-clock timing of one model call, the single loop every latency figure of echofleet comes from.

Timing is by duration, as OpenVINO's ``benchmark_app -t`` does: a few untimed warm-up runs, then
runs until both ``min_runs`` runs and ``duration`` seconds are done; the figure is the median.
The scanner runtime times its precision candidates with it (:func:`edge.device.runtime.time_p50_ms`),
the build times each candidate, and the bench times the matmul peak (:mod:`edge.bench.peak`) and,
call by call, its round-robin (:mod:`edge.bench.latency`). It lives on the device side (no torch)
because ``edge.device`` may not import ``edge.bench``; the bench imports it from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def seconds_of(run: Callable[[np.ndarray], Any], x: np.ndarray) -> float:
    """Wall-clock seconds of one call ``run(x)``."""
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


def median_seconds(run: Callable[[np.ndarray], Any], x: np.ndarray, *, duration: float, min_runs: int,
                   warmup: int = 2) -> float:
    """Median seconds of ``run(x)``: ``warmup`` untimed runs (at least one), then timed runs until both
    ``min_runs`` runs and ``duration`` seconds are done."""
    for _ in range(max(1, warmup)):
        run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < duration:
        times.append(seconds_of(run, x))
    return float(np.median(times))
