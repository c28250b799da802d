"""Latency and throughput of edge models, side by side with PyTorch FP32 eager, in one run.

For every model artifact of a bundle and every installed backend that can run it, and for the
PyTorch FP32 eager model it came from (the baseline, when torch and the task model are
available): p50/p95 latency at batch 1, throughput at batch N, achieved GFLOP/s at batch 1
and at batch N (FLOPs per image are recorded at export), and those as fractions of the matmul
peak measured in the same run at the same precision through the same backend (:mod:`edge.bench.peak`). Ratios are
only meaningful within one run: never compare numbers from different runs or machines.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.device.backends import backend_installed, open_session
from edge.bench.peak import SHAPES, compute_precision, matmul_peak_gflops
from edge.device.runtime import load_bundle
from edge.targets import FORMAT_BACKENDS


@dataclass
class Candidate:
    """One model file to time on one backend."""

    label: str
    path: Path
    backend: str  # "openvino" | "onnxruntime"
    graph_precision: str = "fp32"
    inference_precision: str | None = None  # OpenVINO


@dataclass
class BenchRow:
    label: str
    backend: str
    precision: str  # graph precision
    compute_precision: str  # what the matmuls run at (peak measured at this)
    p50_ms: float
    p95_ms: float
    batch: int
    throughput_ips: float  # images / s at `batch`
    gflops: float | None  # achieved at batch 1
    peak_gflops: float | None
    peak_fraction: float | None
    speedup_vs_torch: float | None = None  # torch p50 / this p50 (batch 1)
    throughput_gflops: float | None = None  # achieved at `batch`
    throughput_peak_fraction: float | None = None


@dataclass
class BenchReport:
    rows: list[BenchRow]
    flops_per_image: int | None
    image_size: int
    machine: dict
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)  # label -> OpenVINO per-node-type profile (opt-in)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "flops_per_image": self.flops_per_image,
                "image_size": self.image_size, "machine": self.machine, "notes": self.notes, "profiles": self.profiles}


def _row(label: str, backend: str, precision: str, compute: str, t1: np.ndarray, tn: np.ndarray, batch: int,
         flops: int | None, peak: float | None) -> BenchRow:
    p50 = float(np.median(t1))
    gflops = flops / p50 / 1e9 if flops else None
    ips = batch / float(np.median(tn))
    tput = flops * ips / 1e9 if flops else None
    return BenchRow(label, backend, precision, compute, p50 * 1e3, float(np.percentile(t1, 95)) * 1e3, batch,
                    ips, gflops, peak, (gflops / peak) if gflops and peak else None,
                    throughput_gflops=tput, throughput_peak_fraction=(tput / peak) if tput and peak else None)


class _PeakCache:
    """Matmul peaks measured once per (backend, precision) in this run."""

    def __init__(self, enabled: bool, num_threads: int | None, shapes=SHAPES):
        self.enabled, self.num_threads, self.shapes, self._cache = enabled, num_threads, shapes, {}

    def get(self, backend: str, precision: str) -> float | None:
        if not self.enabled:
            return None
        key = (backend, precision)
        if key not in self._cache:
            try:
                self._cache[key] = matmul_peak_gflops(backend, precision, shapes=self.shapes, num_threads=self.num_threads)
            except (ImportError, ValueError, RuntimeError):  # e.g. ORT peak without the onnx package
                self._cache[key] = None
        return self._cache[key]


@dataclass
class _Runner:
    label: str
    backend: str
    precision: str
    compute: str
    run: Callable[[np.ndarray], Any]
    t1: list[float] = field(default_factory=list)
    tn: list[float] = field(default_factory=list)


def torch_runner(model_dir: str | Path) -> Callable[[np.ndarray], Any]:
    """PyTorch FP32 eager (``torch.inference_mode``) on the task model: the baseline."""
    import torch

    from echocare.models.task_model import load_task_model

    model, _ = load_task_model(model_dir)
    model.eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def _timed(run: Callable[[np.ndarray], Any], x: np.ndarray) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def bench_candidates(candidates: list[Candidate], size: int, *, flops: int | None = None, batch: int = 8,
                     warmup: int = 3, iters: int = 20, torch_model: str | Path | None = None, with_peak: bool = True,
                     num_threads: int | None = None, progress: Callable[[str], None] | None = None,
                     peak_shapes=SHAPES) -> BenchReport:
    """Time each candidate (and the PyTorch baseline when ``torch_model`` is given) in this one run.

    Timing is round-robin: iteration *i* runs every model once before iteration *i+1* starts, so
    on a shared machine every model sees the same background load (sequential blocks would hand
    whichever model ran during a quiet minute an unfair ratio). ``iters`` batch-1 calls per model
    give p50/p95; ``max(2, iters // 4)`` batch-N calls give the throughput.
    """
    peak = _PeakCache(with_peak, num_threads, peak_shapes)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    xn = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    runners: list[_Runner] = []
    notes: list[str] = []
    if torch_model is not None:
        try:
            runners.append(_Runner("pytorch-eager", "torch", "fp32", "f32", torch_runner(torch_model)))
        except ImportError:
            notes.append("PyTorch not installed here: no eager baseline (run bench on a machine with torch for the ratio)")
    for c in candidates:
        session = open_session(c.path, c.backend, inference_precision=c.inference_precision or "f32",
                               graph_precision=c.graph_precision, num_threads=num_threads)
        runners.append(_Runner(c.label, c.backend, c.graph_precision,
                               compute_precision(c.backend, c.graph_precision, c.inference_precision), session.run))
    for r in runners:  # warm-up (and OpenVINO's per-batch-size compilation) outside the timed loop
        if progress:
            progress(f"warm-up {r.label}")
        for _ in range(max(1, warmup)):
            r.run(x1)
        r.run(xn)
    for i in range(iters):
        if progress:
            progress(f"batch 1, round {i + 1}/{iters}")
        for r in runners:
            r.t1.append(_timed(r.run, x1))
    rounds = max(2, iters // 4)
    for i in range(rounds):
        if progress:
            progress(f"batch {batch}, round {i + 1}/{rounds}")
        for r in runners:
            r.tn.append(_timed(r.run, xn))
    rows = []
    for r in runners:
        if progress:
            progress(f"matmul peak {r.backend} {r.compute}")
        # PyTorch eager fp32 matmuls are compared with the OpenVINO f32 matmul peak (oneDNN/MKL-class kernels).
        pk = peak.get("openvino" if r.backend == "torch" else r.backend, r.compute) if (r.backend != "torch" or backend_installed("openvino")) else None
        rows.append(_row(r.label, r.backend, r.precision, r.compute, np.asarray(r.t1), np.asarray(r.tn), batch, flops, pk))
    if runners and runners[0].backend == "torch":
        for row in rows:
            row.speedup_vs_torch = rows[0].p50_ms / row.p50_ms
    return BenchReport(rows, flops, size, machine_info(num_threads), notes)


def candidates_from_bundle(bundle_dir: Path, manifest: dict) -> list[Candidate]:
    """Every (model artifact, installed backend able to run it) pair of a bundle."""
    out = []
    for a in manifest.get("artifacts", []):
        if a.get("role") != "model":
            continue
        for b in FORMAT_BACKENDS.get(a.get("format", ""), []):
            if backend_installed(b):
                hint = (a.get("inference_precision") or "f32") if b == "openvino" else None
                label = f"{a['path']} [{b}{'/' + hint if hint else ''}]"
                out.append(Candidate(label, Path(bundle_dir) / a["path"], b, a.get("precision", "fp32"), hint))
    return out


def bench_bundle(bundle: str | Path, *, public_key: Any = None, batch: int = 8, warmup: int = 3, iters: int = 20,
                 torch_model: str | Path | None = None, with_peak: bool = True, num_threads: int | None = None,
                 progress: Callable[[str], None] | None = None, peak_shapes=SHAPES, profile: bool = False) -> BenchReport:
    """Bench a bundle's models (verified first when ``public_key`` is given) against the PyTorch baseline.

    ``torch_model``: the task-model directory for the baseline; defaults to the one recorded at
    build time (``manifest["source"]["model_dir"]``) when it exists on this machine.
    ``profile``: also profile each OpenVINO model at batch 1 per node type (:mod:`edge.bench.opprofile`).
    """
    with load_bundle(bundle, public_key=public_key) as rt:
        manifest = rt.manifest
        if torch_model is None:
            recorded = manifest.get("source", {}).get("model_dir")
            torch_model = recorded if recorded and Path(recorded, "model.json").is_file() else None
        candidates = candidates_from_bundle(rt.bundle_dir, manifest)
        report = bench_candidates(candidates, rt.preprocess.size,
                                  flops=manifest.get("flops_per_image"), batch=batch, warmup=warmup, iters=iters,
                                  torch_model=torch_model, with_peak=with_peak, num_threads=num_threads, progress=progress,
                                  peak_shapes=peak_shapes)
        if profile:
            report.profiles = profile_candidates(candidates, report, rt.preprocess.size, num_threads, progress)
    if torch_model is None:
        report.notes.append("no PyTorch baseline: the task model is not on this machine (pass --torch-model DIR)")
    return report


def profile_candidates(candidates: list[Candidate], report: BenchReport, size: int, num_threads: int | None = None,
                       progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Per-node-type profile of every OpenVINO candidate at batch 1, with the matmul kernels' own
    GFLOP/s and the Amdahl ceiling against the peak of its row (when FLOPs and the peak are known)."""
    from edge.bench.opprofile import profile_openvino

    rows = {r.label: r for r in report.rows}
    out = {}
    for c in candidates:
        if c.backend != "openvino":
            continue
        if progress:
            progress(f"profiling {c.label}")
        prof = profile_openvino(c.path, size, inference_precision=c.inference_precision or "f32", num_threads=num_threads)
        entry = prof.to_dict()
        row = rows.get(c.label)
        if report.flops_per_image and prof.matmul_ms:
            entry["kernel_gflops"] = prof.kernel_gflops(report.flops_per_image)
            if row is not None and row.peak_gflops:
                entry["kernel_peak_fraction"] = entry["kernel_gflops"] / row.peak_gflops
                entry["ceiling_fraction"] = prof.ceiling_fraction(report.flops_per_image, row.peak_gflops)
        out[c.label] = entry
    return out


def machine_info(num_threads: int | None = None) -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "threads": num_threads or "default"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("openvino", "onnxruntime"):
        if backend_installed(mod):
            info[mod] = __import__(mod).__version__
    return info
