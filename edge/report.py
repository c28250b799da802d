"""Edge results for people and for JSON: the tables ``echofleet edge ...``, ``make demo`` and the
benchmarks print (rich), and :func:`to_json` for ``--json`` output.

Presentation only: every function takes the result objects the library returns
(:class:`edge.build.pipeline.BuildSummary`, :class:`edge.bench.latency.BenchReport`, a verified
manifest, :func:`edge.device.infer.infer_files` results) and imports nothing heavy, so the
scanner's torch-free ``infer`` / ``verify`` / ``bench`` use it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from edge.bench.latency import BenchReport
    from edge.build.pipeline import BuildSummary


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=json_default)


def metrics_table(fp32: dict, candidate: dict, name: str) -> Table:
    """FP32 vs candidate validation metrics, one row per metric."""
    t = Table(title="validation metrics")
    t.add_column("metric")
    t.add_column("fp32", justify="right")
    t.add_column(name, justify="right")
    for k in fp32:
        t.add_row(k, f"{fp32[k]:.4f}", f"{candidate.get(k, float('nan')):.4f}")
    return t


def print_build(console: Console, s: "BuildSummary") -> None:
    """The steps of an edge build with their time and result, the metrics and the bundle path."""
    t = Table(title=f"edge build · {s.target} · {s.precision}")
    t.add_column("step")
    t.add_column("time", justify="right")
    t.add_column("result", overflow="fold")
    for st in s.steps:
        failed = st.name == "gate" and s.gate is not None and not s.gate.passed
        t.add_row(st.name, f"{st.seconds:.1f} s", f"[red]{escape(st.detail)}[/]" if failed else escape(st.detail))
    console.print(t)
    if s.candidates or s.left_out:  # precision auto: every candidate, shipped or not, with its gate
        c = Table(title="precision candidates (the scanner times those shipped and runs the fastest)")
        for col in ("candidate", "graph", "inference", "gate", "p50 here ms"):
            c.add_column(col, justify="right" if col == "p50 here ms" else "left", overflow="fold")
        for row in s.candidates:
            c.add_row(row["name"], row["precision"], row["inference_precision"], escape(row["gate"]["reason"]),
                      f"{row['build_p50_ms']:.2f}")
        for row in s.left_out:
            c.add_row(row["name"], row["precision"], row["inference_precision"], f"[red]left out: {escape(row['reason'])}[/]", "-")
        console.print(c)
    elif s.fp32_metrics:
        console.print(metrics_table(s.fp32_metrics, s.candidate_metrics, s.precision))
    if s.tarball:
        console.print(f"[green]bundle:[/] {s.tarball}")


def print_compiled(console: Console, c: Any) -> None:
    """What a compile step produced (:class:`edge.build.compiled.CompiledModel`)."""
    t = Table(title=f"compiled for {c.target}", show_header=False)
    t.add_row("model", str(c.model_path))
    t.add_row("files", ", ".join(str(f) for f in c.files))
    t.add_row("precision", c.precision + (f" (inference {c.inference_precision})" if c.inference_precision else ""))
    for k, v in c.details.items():
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(t)


def print_verified(console: Console, manifest: dict) -> None:
    """A verified bundle: its artifacts with their hashes, the task, the federation and the gate."""
    t = Table(title=f"{manifest.get('name')}-{manifest.get('version')}: signature OK, all hashes OK")
    for col in ("artifact", "role", "precision", "target", "bytes", "sha256"):
        t.add_column(col, overflow="fold")
    for a in manifest["artifacts"]:
        t.add_row(a["path"], str(a.get("role", "")), str(a.get("precision") or ""), str(a.get("target") or ""), f"{a['size']:,}", a["sha256"][:16])
    console.print(t)
    card = manifest.get("model_card", {})
    console.print(f"task {manifest.get('task')} · labels {manifest.get('labels')} · encoder sha256 {str(manifest.get('encoder', {}).get('sha256'))[:16]}")
    if card.get("sites"):
        eps = ", ".join(f"{s} ε={p.get('epsilon'):.2f} per {p.get('unit') or 'image'}"
                        for s, p in card.get("privacy", {}).items() if p.get("epsilon") is not None)
        console.print(f"federation: {len(card['sites'])} sites, {card.get('rounds')} rounds; {eps}")
    if "validation" in card:
        console.print(f"gate: {card['validation'].get('gate', {}).get('reason', '-')}")


def print_infer(console: Console, info: dict, task: str, results: list[dict]) -> None:
    """Predictions per input file (the inputs that failed are reported by the caller)."""
    console.print(f"{info['bundle']} · {info['artifact']} on {info['backend']} ({info['precision']}"
                  + (f", inference {info['session'].get('inference_precision')}" if info["session"].get("inference_precision") else "") + ")")
    if info.get("candidate"):  # an auto bundle: which precision candidate ran, and why
        console.print(f"precision candidate {info['candidate']}: {escape(info['choice']['reason'])}")
    t = Table()
    t.add_column("input", overflow="fold")
    t.add_column("frames", justify="right")
    if task == "classify":
        labels = next((list(r["probabilities"]) for r in results if "probabilities" in r), [])
        t.add_column("label")
        for k in labels:
            t.add_column(k, justify="right")
        for r in results:
            t.add_row(r["input"], str(r["frames"]), r["label"], *[f"{r['probabilities'][k]:.3f}" for k in labels])
    else:
        t.add_column("mask PNG", overflow="fold")
        t.add_column("foreground", justify="right")
        if task == "hc":
            t.add_column("HC (mm)", justify="right")
        for r in results:
            hc = [f"{v:.1f}" if v is not None and v == v else "-" for v in r.get("hc_mm", [])]
            t.add_row(r["input"], str(r["frames"]), r["masks"][0] + (f" (+{len(r['masks']) - 1})" if len(r["masks"]) > 1 else ""),
                      f"{r['foreground_fraction'][0]:.3f}", *([", ".join(hc)] if task == "hc" else []))
    console.print(t)


def _ms(v: float) -> str:
    """A latency with three significant digits down to microseconds (0.0 ms says nothing)."""
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def print_bench(console: Console, report: "BenchReport") -> None:
    """The bench table: latency (p50/p90/mean over N runs, benchmark_app's p50 beside OpenVINO rows), throughput,
    GFLOP/s vs the matmul peak, speed-up over PyTorch; profiles; notes."""
    gf = f"{report.flops_per_image / 1e9:.2f} GFLOP/image" if report.flops_per_image else "FLOPs unknown"
    timed = f" · {report.duration_s:g} s per model" if report.duration_s else ""
    t = Table(title=f"{report.image_size}² · {gf} · {report.machine.get('cpu', '?')} ({report.machine.get('cpu_count')} CPUs){timed}")
    batch = report.rows[0].batch if report.rows else ""
    ref = any(r.reference for r in report.rows)
    cols = ["model", "backend", "precision", "p50 ms", "p90 ms", "mean ms", "runs"]
    cols += ["benchmark_app p50 ms", "runtime - benchmark_app ms"] if ref else []
    cols += [f"img/s @b{batch}", "GFLOP/s", "peak GFLOP/s", "% of peak", f"% of peak @b{batch}", "× torch"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right", overflow="fold")
    for r in report.rows:
        # labels such as "model.xml [openvino/f32]" are not markup
        cells = [escape(r.label), r.backend, r.precision if r.precision == r.compute_precision else f"{r.precision} ({r.compute_precision})",
                 _ms(r.p50_ms), _ms(r.p90_ms) if r.p90_ms is not None else "-",
                 _ms(r.mean_ms) if r.mean_ms is not None else "-", str(r.runs or "-")]
        if ref:
            cells += [f"{_ms(r.reference['p50_ms'])} ({r.reference['runs']} runs)", f"{r.p50_ms - r.reference['p50_ms']:+.3f}"] if r.reference else ["-", "-"]
        cells += [f"{r.throughput_ips:.2f}",
                  f"{r.gflops:.0f}" if r.gflops else "-", f"{r.peak_gflops:.0f}" if r.peak_gflops else "-",
                  f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction else "-",
                  f"{100 * r.throughput_peak_fraction:.0f}%" if r.throughput_peak_fraction else "-",
                  f"{r.speedup_vs_torch:.2f}" if r.speedup_vs_torch else "-"]
        t.add_row(*cells)
    console.print(t)
    for label, p in report.profiles.items():
        top = sorted(p["by_type_ms"].items(), key=lambda kv: -kv[1])[:6]
        total = sum(p["by_type_ms"].values()) or 1.0
        line = f"{escape(label)}: matmul kernels {100 * p['matmul_share']:.0f}% of the time"
        if "kernel_peak_fraction" in p:
            line += (f" at {100 * p['kernel_peak_fraction']:.0f}% of the peak; ceiling with every matmul at the peak "
                     f"{100 * p['ceiling_fraction']:.0f}%")
        console.print(line + "; top: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top))
    for n in report.notes:
        console.print(f"[yellow]note:[/] {n}")
