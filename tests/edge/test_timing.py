"""The one timing loop (edge/device/timing.py) behind the runtime's precision choice and the bench.

A fake model sleeps a known time, so the figures are checked against what they must be; the file
takes about a quarter of a second.
"""

from __future__ import annotations

import time

import numpy as np

from edge.bench.peak import matmul_peak_gflops
from edge.device.runtime import time_p50_ms
from edge.device.timing import median_seconds, seconds_of

X = np.zeros((1, 3, 4, 4), np.float32)


class _Model:
    """Sleeps ``seconds`` per call and counts its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_one_call_is_timed():
    model = _Model(0.01)
    assert 0.01 <= seconds_of(model, X) < 0.5 and model.calls == 1


def test_the_median_comes_after_the_warm_up_and_covers_runs_and_duration():
    model = _Model(0.002)
    start = time.perf_counter()
    assert 0.002 <= median_seconds(model, X, duration=0.0, min_runs=7, warmup=3) < 0.2
    assert model.calls == 3 + 7  # warm-up runs, then exactly the minimum when no duration is asked
    assert time.perf_counter() - start < 1.0
    model = _Model(0.002)
    start = time.perf_counter()
    median_seconds(model, X, duration=0.05, min_runs=2, warmup=0)
    assert time.perf_counter() - start >= 0.05  # ran until the duration was spent
    model = _Model(0.0)
    median_seconds(model, X, duration=0.0, min_runs=2, warmup=0)
    assert model.calls == 1 + 2  # one warm-up run at least, whatever was asked


def test_the_runtime_reports_the_median_in_milliseconds():
    model = _Model(0.004)
    assert 4.0 <= time_p50_ms(model, X, duration=0.0, min_runs=3, warmup=1) < 200.0
    assert model.calls == 1 + 3


def test_the_matmul_peak_is_timed_with_the_same_loop():
    """A tiny ONNX Runtime chain: a finite, positive GFLOP/s from the shared median."""
    gflops = matmul_peak_gflops("onnxruntime", "fp32", shapes=((16, 32, 32),), min_iters=3, min_seconds=0.0)
    assert np.isfinite(gflops) and gflops > 0
