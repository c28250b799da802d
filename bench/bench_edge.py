"""Stock vs echofleet edge builds of the EchoCare encoder at 256², measured side by side in one run.

What it does (all on this machine, in this process, so the ratios are comparable):

1. builds a ``classify`` task model on the chosen encoder config (seeded random init: no
   pretrained EchoCare weights are available offline) with a linear head *fitted* on pooled
   features of real BUSI images (scikit-learn), so the accuracy figures are meaningful;
2. **stock** builds, what a user gets from the plain ONNX export of MONAI's model (parity-checked,
   ``ExportConfig(graph_rewrites=False)``) with the tools' defaults: OpenVINO f32 and bf16,
   ``nncf.quantize(model, dataset)`` with every default (run with the CPU's default inference
   precision and with f32), ONNX Runtime's CPU provider;
3. **echofleet** builds from the rewritten export (:mod:`edge.build.rewrites`, parity-checked
   against the same MONAI model): OpenVINO f32 / bf16, echofleet's NNCF INT8 (edge/build/quantize.py)
   with f32 and bf16 for the rest, ONNX Runtime;
4. accuracy: FP32 vs each INT8 model on a BUSI validation split (AUROC points; echofleet's gate);
5. latency (round-robin, batch 1), throughput (batch N), the ratios to PyTorch FP32 eager and to
   the best stock build, and each build's fraction of the machine's compute limit: its FLOPs/s over
   the INT8 chained-matmul peak measured in this run (edge/bench/peak.py);
6. OpenVINO's per-node counters of the best stock and the best echofleet build (where the time goes);
7. the CPU's name and ISA flags; on a CPU with AMX, the latency part again with AMX disabled
   (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, which OpenVINO's CPU plugin honours: its kernels
   change from ``brgemm_avx512_amx_*`` to ``brgemm_avx512_*``), in a child process.

Target (issue 13, checked at the end): the best echofleet build >= 1.3x faster at batch 1 than the
best stock build, with the INT8 accuracy gate unchanged. Train, calibration and validation images
are disjoint parts of one BUSI pool (by image and near-duplicate group). Expect 30-40 minutes
for the full config on 2 cores (two exports, two NNCF runs, two timing passes)::

    .venv/bin/python bench/bench_edge.py                      # full echocare config
    .venv/bin/python bench/bench_edge.py --config echocare-tiny --train 24 --val 24   # quick look
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from common import Steps, split_pool
from rich.console import Console
from rich.table import Table

SHARED = Path(os.environ.get("ECHOFLEET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BUSI = SHARED / "busi" / "Dataset_BUSI_with_GT"
LABELS = ["benign", "malignant", "normal"]
console = Console(highlight=False, width=170)


def _features_model(config: str):
    """encoder -> pooled features (what the classify head sees), as a plain module for export."""
    from torch import nn

    from echocare.models.encoder import encode, load_encoder, pooled_features

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = load_encoder(config, None, seed=0)[0]

        def forward(self, x):
            return pooled_features(encode(self.encoder, x))

    return Pooled().eval()


def fit_task_model(config: str, train_data, out: Path, work: Path) -> Path:
    """Task model with a linear head fitted on BUSI pooled features (features via OpenVINO bf16, for speed)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from echocare.models.heads import build_head, head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model
    from echocare.preprocess import PreprocessSpec
    from edge.build.evaluate import load_eval_set
    from edge.build.export import torch_to_onnx
    from edge.device.backends import open_session, run_batched

    ev = load_eval_set(train_data, "classify", LABELS, PreprocessSpec())
    torch_to_onnx(_features_model(config), work / "features.onnx", 256)
    feats = run_batched(open_session(work / "features.onnx", "openvino", inference_precision="bf16"), ev.inputs, 4).astype(np.float64)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=5000).fit((feats - mu) / sd, ev.targets)
    head = build_head("classify", config, len(LABELS))
    linear = head.net[-1]
    linear.weight.data = torch.tensor(clf.coef_ / sd, dtype=torch.float32)
    linear.bias.data = torch.tensor(clf.intercept_ - (clf.coef_ * mu / sd).sum(1), dtype=torch.float32)
    spec = TaskModelSpec(config, None, None, 0, "classify", LABELS, head_kwargs_of(head),
                         provenance={"bench": f"linear head fitted on {len(ev)} BUSI images"})
    save_task_model(out, spec, head.state_dict())
    return out


def cpu_info() -> dict:
    """The CPU's name and the ISA flags that decide bf16 / INT8 speed (Linux /proc/cpuinfo; OpenVINO's view)."""
    info: dict = {"name": "?", "flags": {}}
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
        info["name"] = name
        info["flags"] = {f: f in flags for f in ("amx_tile", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f")}
    except OSError:
        pass
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino"] = {"name": core.get_property("CPU", "FULL_DEVICE_NAME"),
                            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}
    except Exception as e:  # no OpenVINO, no CPU plugin: the bench will fail later with its own error
        info["openvino"] = {"error": str(e)}
    return info


NO_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def stock_nncf(onnx_path: Path, calib: np.ndarray, out_xml: Path) -> Path:
    """``nncf.quantize(model, dataset)`` with every default on the plain export (what a user would run)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    q = nncf.quantize(model, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]))
    ov.save_model(q, str(out_xml))
    return out_xml


def _candidates(spec: list[dict]):
    from edge.bench.latency import Candidate

    return [Candidate(c["label"], Path(c["path"]), c["backend"], c["graph_precision"], c.get("inference_precision")) for c in spec]


def time_only(spec_path: Path) -> None:
    """Child process (``--time-only SPEC``): time the candidates in SPEC, write the report beside it."""
    from edge.bench.latency import bench_candidates

    spec = json.loads(spec_path.read_text())
    report = bench_candidates(_candidates(spec["candidates"]), spec["size"], flops=spec["flops"], batch=spec["batch"],
                              iters=spec["iters"], warmup=2, torch_model=spec["torch_model"])
    spec_path.with_suffix(".out.json").write_text(json.dumps(report.to_dict(), default=str))


def summary(title: str, rows: list[dict], kinds: dict[str, str], drops: dict[str, float]) -> tuple[Table, dict]:
    """Each build's p50, x PyTorch, x best stock, % of the INT8 compute limit, INT8 AUROC drop."""
    torch_row = next((r for r in rows if r["backend"] == "torch"), None)
    builds = [r for r in rows if r["backend"] != "torch"]
    int8_peak = max((r["peak_gflops"] or 0 for r in builds if r["compute_precision"] == "int8" and r["backend"] == "openvino"), default=0)
    stock = [r for r in builds if kinds.get(r["label"]) == "stock"]
    ours = [r for r in builds if kinds.get(r["label"]) == "echofleet"]
    best_stock = min(stock, key=lambda r: r["p50_ms"])
    best_ours = min(ours, key=lambda r: r["p50_ms"])
    t = Table(title=title)
    for col in ("build", "kind", "p50 ms", "runs", "x PyTorch", "x best stock", "% of INT8 peak", "INT8 AUROC drop"):
        t.add_column(col, justify="left" if col in ("build", "kind") else "right")
    if torch_row:
        t.add_row("pytorch eager fp32", "baseline", f"{torch_row['p50_ms']:.1f}", str(torch_row.get("runs") or "-"), "1.00",
                  f"{best_stock['p50_ms'] / torch_row['p50_ms']:.2f}", "-", "-")
    for r in builds:
        frac = (r["gflops"] or 0) / int8_peak if int8_peak else None
        t.add_row(r["label"], kinds.get(r["label"], "?"), f"{r['p50_ms']:.1f}", str(r.get("runs") or "-"),
                  f"{torch_row['p50_ms'] / r['p50_ms']:.2f}" if torch_row else "-", f"{best_stock['p50_ms'] / r['p50_ms']:.2f}",
                  f"{100 * frac:.0f}%" if frac else "-", f"{drops[r['label']]:+.2f}" if r["label"] in drops else "-")
    ratio = best_stock["p50_ms"] / best_ours["p50_ms"]
    return t, {"best_stock": best_stock["label"], "best_stock_ms": best_stock["p50_ms"], "best_echofleet": best_ours["label"],
               "best_echofleet_ms": best_ours["p50_ms"], "ratio": ratio, "int8_peak_gflops": int8_peak,
               "best_echofleet_peak_fraction": (best_ours["gflops"] or 0) / int8_peak if int8_peak else None,
               "best_echofleet_x_torch": torch_row["p50_ms"] / best_ours["p50_ms"] if torch_row else None}


def main(
    config: str = typer.Option("echocare", help="Encoder config (echocare | echocare-small | echocare-tiny)."),
    train: int = typer.Option(64, help="BUSI images to fit the head on."),
    val: int = typer.Option(240, help="BUSI validation images for the accuracy gate (60 resolved little: an AUROC drop "
                            "of 1.5 points was within their noise)."),
    calib: int = typer.Option(32, help="Calibration images."),
    batch: int = typer.Option(4, help="Batch size for the throughput column."),
    iters: int = typer.Option(8, help="Timed batch-1 runs per model (round-robin)."),
    perf_smooth_quant: float = typer.Option(-1.0, help="SmoothQuant alpha for the PERFORMANCE-preset build's MatMuls "
                                            "(QuantizeConfig.smooth_quant; negative: off, echofleet's default)."),
    no_amx: Optional[bool] = typer.Option(None, "--no-amx/--skip-no-amx", help="Also time with AMX disabled (default: when the CPU has AMX)."),
    json_out: Optional[Path] = typer.Option(None, help="Write all numbers to this JSON file."),
    time_only_spec: Optional[Path] = typer.Option(None, "--time-only", hidden=True, help="Internal: the child process of --no-amx."),
) -> None:
    if time_only_spec is not None:
        return time_only(time_only_spec)
    from echocare.preprocess import PreprocessSpec
    from edge.bench.latency import bench_candidates
    from edge.bench.opprofile import profile_openvino
    from edge.build.evaluate import evaluate, load_calibration, load_eval_set
    from edge.build.export import ExportConfig, export_task_model
    from edge.build.gate import check_gate
    from edge.build.quantize import QuantizeConfig, quantize
    from edge.device.backends import open_session
    from edge.report import print_bench

    if not BUSI.is_dir():
        console.print(f"[red]BUSI not found at {BUSI}[/] (set ECHOFLEET_SHARED_DATA)")
        raise typer.Exit(2)
    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    t_all = time.perf_counter()
    timed = Steps(console)
    cpu = cpu_info()
    console.print(f"CPU: {cpu['name']} ({os.cpu_count()} logical CPUs); ISA: "
                  + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
                  + f"; OpenVINO: {cpu.get('openvino')}")

    pre = PreprocessSpec()
    pool = f"busi:{BUSI}?limit={train + calib + val}&seed=7"
    _, parts = split_pool(pool, train, calib, val)
    console.print(f"{pool}: train {len(parts['train'].samples)}, calibration {len(parts['calib'].samples)}, validation "
                  f"{len(parts['val'].samples)} images, disjoint by image and near-duplicate group (checked)")
    model_dir = timed("fit head on BUSI features", lambda: fit_task_model(config, parts["train"], work / "model", work))
    ev = load_eval_set(parts["val"], "classify", LABELS, pre)
    cal = load_calibration(parts["calib"], pre, limit=None)
    plain = timed("plain export + parity", lambda: export_task_model(model_dir, work / "plain", samples=ev.inputs[:2],
                                                                        config=ExportConfig(graph_rewrites=False)))
    console.print(f"plain export: {plain.parity.describe()}")
    rewritten = timed("rewritten export + parity", lambda: export_task_model(model_dir, work / "rewritten", samples=ev.inputs[:2]))
    console.print(f"rewritten export: {rewritten.parity.describe()}")
    stock_q = timed("quantize stock nncf (defaults)", lambda: stock_nncf(plain.onnx_path, cal, work / "stock-nncf.xml"))
    ours_q = timed("quantize echofleet nncf", lambda: quantize(rewritten.onnx_path, cal, work / "echofleet-nncf", QuantizeConfig("nncf")))
    # NNCF's PERFORMANCE preset (symmetric activations): faster INT8 kernels; it counts only if it passes the gate.
    perf_q = timed("quantize echofleet nncf (performance preset)", lambda: quantize(
        rewritten.onnx_path, cal, work / "echofleet-nncf-perf", QuantizeConfig("nncf", preset="performance",
                                                                                smooth_quant=perf_smooth_quant)))

    # Accuracy: FP32 reference on OpenVINO f32 (plain export), each INT8 model as it ships.
    fp32 = timed("evaluate fp32", lambda: evaluate(open_session(plain.onnx_path, "openvino", inference_precision="f32").run, ev, 4))
    acc = {"fp32": fp32}
    quantized = {"stock nncf": stock_q, "echofleet nncf": ours_q.model_path, "echofleet nncf perf": perf_q.model_path}
    for key, path in quantized.items():
        acc[key] = timed(f"evaluate {key}", lambda p=path: evaluate(open_session(p, "openvino", inference_precision="f32", graph_precision="int8").run, ev, 4))
    gates = {k: check_gate("classify", fp32, acc[k]) for k in quantized}

    spec = [
        ("stock onnxruntime fp32", plain.onnx_path, "onnxruntime", "fp32", None, "stock"),
        ("stock openvino f32", plain.onnx_path, "openvino", "fp32", "f32", "stock"),
        ("stock openvino bf16", plain.onnx_path, "openvino", "fp32", "bf16", "stock"),
        ("stock nncf int8 (f32 rest)", stock_q, "openvino", "int8", "f32", "stock"),
        ("stock nncf int8 (bf16 rest)", stock_q, "openvino", "int8", "bf16", "stock"),
        ("echofleet onnxruntime fp32", rewritten.onnx_path, "onnxruntime", "fp32", None, "echofleet"),
        ("echofleet openvino f32", rewritten.onnx_path, "openvino", "fp32", "f32", "echofleet"),
        ("echofleet openvino bf16", rewritten.onnx_path, "openvino", "fp32", "bf16", "echofleet"),
        ("echofleet int8 (f32 rest)", ours_q.model_path, "openvino", "int8", "f32", "echofleet"),
        ("echofleet int8 (bf16 rest)", ours_q.model_path, "openvino", "int8", "bf16", "echofleet"),
        ("echofleet int8 perf (f32 rest)", perf_q.model_path, "openvino", "int8", "f32", "echofleet"),
        ("echofleet int8 perf (bf16 rest)", perf_q.model_path, "openvino", "int8", "bf16", "echofleet"),
    ]
    cand_spec = [{"label": l, "path": str(p), "backend": b, "graph_precision": g, "inference_precision": i} for l, p, b, g, i, _ in spec]
    kinds = {l: k for l, *_, k in spec}
    gate_of = {l: "stock nncf" if k == "stock" else "echofleet nncf perf" if " perf " in l else "echofleet nncf"
               for l, _, _, g, _, k in spec if g == "int8"}
    drops = {l: gates[g].drop for l, g in gate_of.items()}
    # An echofleet INT8 build that fails the unchanged gate would not ship, so it cannot be "the best echofleet
    # build"; stock builds count whatever their accuracy (the comparison is against what a user gets).
    kinds.update({l: "echofleet (gate fails)" for l, g in gate_of.items() if kinds[l] == "echofleet" and not gates[g].passed})
    flops = rewritten.info["flops_per_image"]
    report = timed("latency / throughput / peaks", lambda: bench_candidates(
        _candidates(cand_spec), pre.size, flops=flops, batch=batch, iters=iters, warmup=2, torch_model=model_dir))
    print_bench(console, report)
    rows = [asdict_row(r) for r in report.rows]
    table, result = summary(f"{config}, batch 1: stock vs echofleet ({cpu['name']})", rows, kinds, drops)
    console.print(table)

    t = Table(title=f"accuracy on {len(ev)} BUSI validation images (FP32 vs INT8; head fitted on {train})")
    for col in ("model", "AUROC", "bal. acc", "echofleet gate"):
        t.add_column(col)
    t.add_row("fp32 (openvino f32, plain export)", f"{fp32['auroc']:.4f}", f"{fp32['balanced_accuracy']:.4f}", "-")
    for k, gate in gates.items():
        t.add_row(k, f"{acc[k]['auroc']:.4f}", f"{acc[k]['balanced_accuracy']:.4f}", gate.reason)
    console.print(t)

    # Where the time goes: OpenVINO's per-node counters of the best stock and the best echofleet build.
    profiles = {}
    by_label = {c["label"]: c for c in cand_spec}
    for key in ("best_stock", "best_echofleet"):
        c = by_label[result[key]]
        if c["backend"] != "openvino":
            continue
        prof = timed(f"op profile {c['label']}", lambda c=c: profile_openvino(c["path"], pre.size, inference_precision=c["inference_precision"], batch=1))
        profiles[c["label"]] = prof.to_dict()
        console.print(f"{c['label']}: {prof.latency_ms:.0f} ms; " + ", ".join(f"{n} {ms:.1f} ms ({100 * ms / prof.total_ms:.0f}%)" for n, ms in prof.top(10)))

    no_amx_result = None
    if no_amx is None:
        no_amx = bool(cpu["flags"].get("amx_tile"))
    if no_amx:
        spec_path = work / "no-amx.json"
        spec_path.write_text(json.dumps({"candidates": cand_spec, "size": pre.size, "flops": flops, "batch": batch,
                                         "iters": iters, "torch_model": str(model_dir)}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--time-only", str(spec_path)]
        timed("latency with AMX disabled (child process)", lambda: subprocess.run(cmd, env={**os.environ, **NO_AMX_ENV}, check=True))
        no_amx_rows = json.loads(spec_path.with_suffix(".out.json").read_text())["rows"]
        table, no_amx_result = summary(f"{config}, batch 1, AMX disabled ({NO_AMX_ENV}): stock vs echofleet", no_amx_rows, kinds, drops)
        console.print(table)
        no_amx_result["rows"] = no_amx_rows

    checks = [((f"best echofleet build >= 1.3x the best stock build (batch 1): {result['best_echofleet']} "
                f"{result['best_echofleet_ms']:.1f} ms vs {result['best_stock']} {result['best_stock_ms']:.1f} ms = {result['ratio']:.2f}x"),
               result["ratio"] >= 1.3)]
    checks += [(f"{key} INT8 accuracy gate: {gates[key].reason}", gates[key].passed) for key in ("echofleet nncf", "echofleet nncf perf")]
    if no_amx_result:
        checks.append((f"AMX disabled: {no_amx_result['best_echofleet']} vs {no_amx_result['best_stock']} = {no_amx_result['ratio']:.2f}x",
                       no_amx_result["ratio"] >= 1.3))
    for text, ok in checks:
        console.print(f"[{'green' if ok else 'red'}]{'MET ' if ok else 'MISSED'}[/] {text}")
    if result["best_echofleet_peak_fraction"] is not None:
        console.print(f"best echofleet build: {result['best_echofleet_x_torch']:.2f}x PyTorch eager, "
                      f"{100 * result['best_echofleet_peak_fraction']:.0f}% of the INT8 chained-matmul peak ({result['int8_peak_gflops']:.0f} GFLOP/s)")
    console.print(f"total {time.perf_counter() - t_all:.0f} s; work files in {work}")
    if json_out:
        json_out.write_text(json.dumps({"config": config, "cpu": cpu, "bench": report.to_dict(), "summary": result,
                                        "no_amx": no_amx_result, "accuracy": acc,
                                        "gates": {k: g.to_dict() for k, g in gates.items()}, "timings": timed.timings,
                                        "checks": [{"check": c, "met": ok} for c, ok in checks], "op_profiles": profiles,
                                        "parity": {"plain": asdict(plain.parity), "rewritten": asdict(rewritten.parity)}},
                                       indent=2, default=str))


def asdict_row(row) -> dict:
    from dataclasses import asdict

    return asdict(row)


if __name__ == "__main__":
    typer.run(main)
