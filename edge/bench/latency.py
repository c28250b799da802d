"""Latency and throughput of edge models, side by side with PyTorch FP32 eager, in one run.

For every model artifact of a bundle and every installed backend that can run it, and for the
PyTorch FP32 eager model it came from (the baseline, when torch and the task model are
available): p50/p95 latency at batch 1, throughput at batch N, achieved GFLOP/s at batch 1
and at batch N (FLOPs per image are recorded at export), and those as fractions of the matmul
peak measured in the same run at the same precision through the same backend (:mod:`edge.bench.peak`). Ratios are
only meaningful within one run: never compare numbers from different runs or machines.

Timing is by duration, as OpenVINO's ``benchmark_app -t`` does: after the warm-up each model runs
for ``duration`` seconds (and at least ``iters`` times), and a row reports p50 / p90 / p95 / mean
and the number of runs, so a noisy minute shows as a spread rather than as a different median.
Each OpenVINO model is also run by ``benchmark_app`` itself on the same file with the same
inference precision, latency hint, batch 1 and duration (when it is installed: it comes with the
``openvino`` package), printed beside ours as the external reference: the gap is what the runtime
adds per call.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.device.backends import TensorRTSession, backend_installed, default_engine_path, open_session
from edge.bench.peak import SHAPES, compute_precision, matmul_peak_gflops
from edge.device.runtime import cpu_model_name, load_bundle
from edge.device.timing import seconds_of
from edge.targets import FORMAT_BACKENDS


@dataclass
class Candidate:
    """One model file to time on one backend."""

    label: str
    path: Path
    backend: str  # "openvino" | "onnxruntime" | "tensorrt" (path: the engine)
    graph_precision: str = "fp32"
    inference_precision: str | None = None  # OpenVINO
    model_sha256: str | None = None  # TensorRT: the bundle ONNX the engine must have been built from

    def open(self, num_threads: int | None = None):
        """A session that runs this candidate, as the scanner runtime would."""
        if self.backend == "tensorrt":
            return TensorRTSession(self.path, model_sha256=self.model_sha256, graph_precision=self.graph_precision)
        return open_session(self.path, self.backend, inference_precision=self.inference_precision or "f32",
                            graph_precision=self.graph_precision, num_threads=num_threads)

    def compute_precision(self) -> str:
        # a TensorRT engine runs the graph's own precision (Q/DQ INT8, FP16 tensors)
        return self.graph_precision if self.backend == "tensorrt" else compute_precision(self.backend, self.graph_precision, self.inference_precision)


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
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0  # timed batch-1 runs
    timed_s: float = 0.0  # seconds those runs took
    reference: dict | None = None  # benchmark_app on the same model: p50_ms, mean_ms, runs, ... (OpenVINO rows)


@dataclass
class BenchReport:
    rows: list[BenchRow]
    flops_per_image: int | None
    image_size: int
    machine: dict
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)  # label -> OpenVINO per-node-type profile (opt-in)

    duration_s: float = 0.0  # timed seconds per model at batch 1 (0: a fixed number of runs)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "flops_per_image": self.flops_per_image,
                "image_size": self.image_size, "duration_s": self.duration_s, "machine": self.machine,
                "notes": self.notes, "profiles": self.profiles}


def _row(label: str, backend: str, precision: str, compute: str, t1: np.ndarray, tn: np.ndarray, batch: int,
         flops: int | None, peak: float | None) -> BenchRow:
    p50 = float(np.median(t1))
    gflops = flops / p50 / 1e9 if flops else None
    ips = batch / float(np.median(tn))
    tput = flops * ips / 1e9 if flops else None
    return BenchRow(label, backend, precision, compute, p50 * 1e3, float(np.percentile(t1, 95)) * 1e3, batch,
                    ips, gflops, peak, (gflops / peak) if gflops and peak else None,
                    throughput_gflops=tput, throughput_peak_fraction=(tput / peak) if tput and peak else None,
                    p90_ms=float(np.percentile(t1, 90)) * 1e3, mean_ms=float(np.mean(t1)) * 1e3, runs=len(t1),
                    timed_s=float(np.sum(t1)))


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

    def done(self, times: list[float], runs: int, seconds: float) -> bool:
        return len(times) >= runs and sum(times) >= seconds


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


def _round_robin(runners: list[_Runner], x: np.ndarray, times: Callable[[_Runner], list[float]], runs: int,
                 seconds: float, what: str, progress: Callable[[str], None] | None) -> None:
    """Run every model once per round until each has ``runs`` timed runs and ``seconds`` of timed runs."""
    rnd = 0
    while active := [r for r in runners if not r.done(times(r), runs, seconds)]:
        rnd += 1
        if progress:
            progress(f"{what}, round {rnd} ({len(active)} model{'s' if len(active) > 1 else ''} still timing)")
        for r in active:
            times(r).append(seconds_of(r.run, x))


def bench_candidates(candidates: list[Candidate], size: int, *, flops: int | None = None, batch: int = 8,
                     warmup: int = 3, iters: int = 20, duration: float = 0.0, torch_model: str | Path | None = None,
                     with_peak: bool = True, num_threads: int | None = None, progress: Callable[[str], None] | None = None,
                     peak_shapes=SHAPES, reference: bool = False) -> BenchReport:
    """Time each candidate (and the PyTorch baseline when ``torch_model`` is given) in this one run.

    Timing is round-robin: round *i* runs every model once before round *i+1* starts, so on a
    shared machine every model sees the same background load (sequential blocks would hand
    whichever model ran during a quiet minute an unfair ratio). A model stops once it has run
    ``duration`` seconds and at least ``iters`` times at batch 1 (p50/p90/p95/mean); the
    throughput at batch N uses a quarter of both (at least 2 runs). ``reference``: also run
    ``benchmark_app`` on each OpenVINO candidate (:func:`benchmark_app_reference`).
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
        runners.append(_Runner(c.label, c.backend, c.graph_precision, c.compute_precision(), c.open(num_threads).run))
    for r in runners:  # warm-up (and OpenVINO's per-batch-size compilation) outside the timed loop
        if progress:
            progress(f"warm-up {r.label}")
        for _ in range(max(1, warmup)):
            r.run(x1)
        r.run(xn)
    _round_robin(runners, x1, lambda r: r.t1, iters, duration, "batch 1", progress)
    _round_robin(runners, xn, lambda r: r.tn, max(2, iters // 4), duration / 4, f"batch {batch}", progress)
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
    if reference:
        by_label = {r.label: r for r in rows}
        for c in candidates:
            if c.backend != "openvino":
                continue
            if progress:
                progress(f"benchmark_app {c.label}")
            try:
                by_label[c.label].reference = benchmark_app_reference(c.path, size, c.inference_precision or "f32",
                                                                      duration=max(duration, 1.0), num_threads=num_threads)
            except BenchmarkAppError as e:
                notes.append(f"benchmark_app reference for {c.label}: {e}")
    return BenchReport(rows, flops, size, machine_info(num_threads), notes, duration_s=duration)


class BenchmarkAppError(RuntimeError):
    """benchmark_app is missing, failed, or printed no statistics (the message says which)."""


def find_benchmark_app() -> str | None:
    """OpenVINO's ``benchmark_app`` (installed with the ``openvino`` package, beside this Python)."""
    here = Path(sys.executable).parent / "benchmark_app"
    return str(here) if here.is_file() else shutil.which("benchmark_app")


_STAT = re.compile(r"\b(Count|Duration|Median|Average|Min|Max|Throughput):\s*([0-9.]+)\s*(ms|us|µs|ns|s|iterations|FPS)\b")
_TO_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6}


def parse_benchmark_app(stdout: str) -> dict:
    """The statistics ``benchmark_app`` prints at the end (Count, Duration, Median, Average, Min, Max,
    Throughput); times in ms whatever unit it chose (it prints ``us`` for sub-millisecond models)."""
    stats = {key: (float(value), unit) for key, value, unit in _STAT.findall(stdout)}
    if "Median" not in stats or "Count" not in stats:
        raise BenchmarkAppError("no latency statistics in its output")
    out: dict[str, float | int] = {"p50_ms": stats["Median"][0] * _TO_MS[stats["Median"][1]], "runs": int(stats["Count"][0])}
    for key, name in (("Average", "mean_ms"), ("Min", "min_ms"), ("Max", "max_ms"), ("Duration", "duration_ms")):
        if key in stats:
            out[name] = stats[key][0] * _TO_MS[stats[key][1]]
    if "Throughput" in stats:
        out["throughput_fps"] = stats["Throughput"][0]
    return out


def benchmark_app_reference(model_path: Path, size: int, inference_precision: str = "f32", *, duration: float = 10.0,
                            num_threads: int | None = None, exe: str | None = None) -> dict:
    """``benchmark_app`` on ``model_path`` as the runtime runs it: CPU, batch 1 (static shape),
    the latency hint, the same inference precision, for ``duration`` seconds."""
    exe = exe or find_benchmark_app()
    if exe is None:
        raise BenchmarkAppError("benchmark_app not found (it comes with the openvino package)")
    cmd = [exe, "-m", str(model_path), "-d", "CPU", "-hint", "latency", "-infer_precision", inference_precision,
           "-shape", f"[1,3,{size},{size}]", "-t", str(max(1, math.ceil(duration)))]
    if num_threads:
        cmd += ["-nthreads", str(num_threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchmarkAppError(f"could not run ({e})") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchmarkAppError(f"exit code {res.returncode} ({tail[0]})")
    return {**parse_benchmark_app(res.stdout), "command": " ".join(cmd)}


def candidates_from_bundle(bundle_dir: Path, manifest: dict) -> list[Candidate]:
    """Every (model artifact, installed backend able to run it) pair of a bundle; a ``tensorrt``
    target's ONNX also as its engine (from the engine cache) where TensorRT is installed. An auto
    bundle's precision candidates are each one row, named by the candidate (``int8-bf16`` ...)."""
    from echocare.bundle import candidates_of

    out = []
    for c in candidates_of(manifest):
        if backend_installed("openvino"):
            out.append(Candidate(f"{c.name} [openvino/{c.inference_precision}]", Path(bundle_dir) / c.path, "openvino",
                                 c.precision, c.inference_precision))
    if out:
        return out
    for a in manifest.get("artifacts", []):
        if a.get("role") != "model":
            continue
        if a.get("target") == "tensorrt" and backend_installed("tensorrt"):
            out.append(Candidate(f"{a['path']} [tensorrt engine]", default_engine_path(a["sha256"]), "tensorrt",
                                 a.get("precision", "fp32"), model_sha256=a["sha256"]))
        for b in FORMAT_BACKENDS.get(a.get("format", ""), []):
            if backend_installed(b):
                hint = (a.get("inference_precision") or "f32") if b == "openvino" else None
                label = f"{a['path']} [{b}{'/' + hint if hint else ''}]"
                out.append(Candidate(label, Path(bundle_dir) / a["path"], b, a.get("precision", "fp32"), hint))
    return out


def bench_bundle(bundle: str | Path, *, public_key: Any = None, batch: int = 8, warmup: int = 3, iters: int = 20,
                 duration: float = 0.0, torch_model: str | Path | None = None, with_peak: bool = True,
                 num_threads: int | None = None, progress: Callable[[str], None] | None = None, peak_shapes=SHAPES,
                 profile: bool = False, reference: bool = False) -> BenchReport:
    """Bench a bundle's models (verified first when ``public_key`` is given) against the PyTorch baseline.

    ``torch_model``: the task-model directory for the baseline; defaults to the one recorded at
    build time (``manifest["source"]["model_dir"]``) when it exists on this machine.
    ``profile``: also profile each OpenVINO model at batch 1 per node type (:mod:`edge.bench.opprofile`).
    ``duration`` / ``iters`` / ``reference``: see :func:`bench_candidates`.
    """
    with load_bundle(bundle, public_key=public_key) as rt:
        manifest = rt.manifest
        if torch_model is None:
            recorded = manifest.get("source", {}).get("model_dir")
            torch_model = recorded if recorded and Path(recorded, "model.json").is_file() else None
        candidates = candidates_from_bundle(rt.bundle_dir, manifest)
        report = bench_candidates(candidates, rt.preprocess.size,
                                  flops=manifest.get("flops_per_image"), batch=batch, warmup=warmup, iters=iters,
                                  duration=duration, torch_model=torch_model, with_peak=with_peak, num_threads=num_threads,
                                  progress=progress, peak_shapes=peak_shapes, reference=reference)
        if profile:
            report.profiles = profile_candidates(candidates, report, rt.preprocess.size, num_threads, progress)
        if rt.choice is not None:  # an auto bundle: what the runtime itself chose on load, and why
            report.notes.append(f"the runtime runs {rt.choice.summary()}")
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
    cpu = cpu_model_name()
    if cpu is not None:
        info["cpu"] = cpu
    for mod in ("openvino", "onnxruntime"):
        if backend_installed(mod):
            info[mod] = __import__(mod).__version__
    return info
