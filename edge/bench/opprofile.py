"""Where an OpenVINO model's inference time goes: matrix-multiply kernels vs everything else.

The bench's "fraction of the matmul peak" divides the model's FLOPs (nearly all in MatMul /
FullyConnected / Convolution) by its whole latency. When that fraction is low, this profile says
why: either the matmul kernels themselves run far below the peak (a kernel or quantization
problem), or they run near it and the time goes to the other ops — normalisations, softmax,
window partition transposes, layout reorders — which do almost no FLOPs (an Amdahl limit that no
matmul tuning removes). Uses OpenVINO's own per-node performance counters (``PERF_COUNT``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Node types whose work is a matrix multiply or a convolution (everything the FLOP count covers).
MATMUL_TYPES = ("FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul", "Convolution", "GroupConvolution",
                "Deconvolution")


@dataclass
class OpProfile:
    """Milliseconds per inference of one batch, by OpenVINO node type (sums of per-node real time)."""

    batch: int
    latency_ms: float  # wall time of one inference of the batch (median)
    by_type_ms: dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return sum(self.by_type_ms.values())

    @property
    def matmul_ms(self) -> float:
        return sum(v for k, v in self.by_type_ms.items() if k in MATMUL_TYPES)

    @property
    def matmul_share(self) -> float:
        return self.matmul_ms / self.total_ms if self.total_ms else 0.0

    def kernel_gflops(self, flops_per_image: float) -> float:
        """GFLOP/s inside the matmul-class kernels (the model's FLOPs over their time only)."""
        return flops_per_image * self.batch / (self.matmul_ms / 1e3) / 1e9 if self.matmul_ms else 0.0

    def ceiling_fraction(self, flops_per_image: float, peak_gflops: float) -> float:
        """Fraction of the peak the whole model would reach if its matmuls ran exactly at the peak
        and every other op kept its measured time (the Amdahl limit of matmul tuning)."""
        mm_at_peak = flops_per_image * self.batch / (peak_gflops * 1e9)
        other = (self.total_ms - self.matmul_ms) / 1e3
        return mm_at_peak / (mm_at_peak + other)

    def top(self, n: int = 8) -> list[tuple[str, float]]:
        return sorted(self.by_type_ms.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {**asdict(self), "matmul_ms": self.matmul_ms, "matmul_share": self.matmul_share}


def profile_openvino(model_path: str | Path, size: int, *, inference_precision: str = "f32", batch: int = 1,
                     iters: int = 5, num_threads: int | None = None) -> OpProfile:
    """Run ``model_path`` (IR or ONNX) with OpenVINO's performance counters on; median over ``iters``
    inferences of the total time per node type (the last inference's counters, after warm-up)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_path))
    model.reshape({model.inputs[0].get_any_name(): [batch, 3, size, size]})
    config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for _ in range(2):
        request.infer({0: x})
    walls, runs = [], []
    for _ in range(max(1, iters)):
        t = time.perf_counter()
        request.infer({0: x})
        walls.append(time.perf_counter() - t)
        per_type: dict[str, float] = defaultdict(float)
        for node in request.get_profiling_info():
            per_type[node.node_type] += node.real_time.total_seconds() * 1e3
        runs.append(per_type)
    median_run = runs[int(np.argsort([sum(r.values()) for r in runs])[len(runs) // 2])]
    return OpProfile(batch, float(np.median(walls)) * 1e3, dict(median_run))
