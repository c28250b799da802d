"""CLI: ``echofleet edge ...`` — one command per step, and ``build`` for all of them.

    echofleet edge keygen   --out keys/release
    echofleet edge build    RUN_DIR --target openvino-cpu --calib DATA --val DATA --key keys/release --out dist
    echofleet edge export   RUN_DIR|TASK_MODEL --out work/export
    echofleet edge quantize work/export/model.onnx --calib DATA --val DATA --method nncf --out work/q
    echofleet edge compile  work/q/model.int8.xml --target openvino-cpu --out work/ov
    echofleet edge bundle   work/ov/model.xml --target openvino-cpu --key keys/release --out dist
    echofleet edge verify   dist/NAME-VERSION.tar.gz --pubkey keys/release.pub
    echofleet edge infer    dist/NAME-VERSION.tar.gz image.png clip.mp4 scan.dcm --pubkey keys/release.pub
    echofleet edge bench    dist/NAME-VERSION.tar.gz --pubkey keys/release.pub

Only typer and rich are imported here; each command imports what it needs (torch only for
export/quantize/build/bench baselines), so ``infer``, ``verify`` and ``bench`` run on a scanner
with ``echofleet[edge]`` alone. Exit codes: 0 ok, 1 the model or bundle was refused (parity,
gate, signature, self-test), 2 bad input (missing file, bad option, unreadable data).
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.agent import agent

edge_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)
edge_app.command("agent", help="Keep this scanner on the registry's current release (verify, install, self-test, roll back).")(agent)


class Target(str, Enum):
    openvino_cpu = "openvino-cpu"
    onnxruntime_cpu = "onnxruntime-cpu"
    tensorrt = "tensorrt"


class Precision(str, Enum):
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


class OVPrecision(str, Enum):
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"


class Method(str, Enum):
    nncf = "nncf"
    qdq = "qdq"
    fp16 = "fp16"


class Activations(str, Enum):
    symmetric = "symmetric"
    asymmetric = "asymmetric"


class Backend(str, Enum):
    auto = "auto"
    openvino = "openvino"
    onnxruntime = "onnxruntime"


def _console(as_json: bool = False) -> Console:
    """Human output on stdout, or on stderr when stdout carries JSON."""
    return Console(stderr=as_json, highlight=False)


def _fail(console: Console, message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _print_json(data) -> None:
    from edge.build.export import _json_default

    typer.echo(json.dumps(data, indent=2, default=_json_default))


def _bounds(max_auroc_drop: float, max_dice_drop: float, max_mae_increase: float):
    from edge.build.gate import GateBounds

    return GateBounds(auroc_points=max_auroc_drop, dice=max_dice_drop, hc_mae_mm=max_mae_increase)


# Options shared by quantize and build
_IGNORE_OP_HELP = "Keep an op kind in float (repeatable): layernorm, softmax, gelu, add (residual adds)."
_IGNORE_NAME_HELP = "Keep nodes whose name matches this regex in float (repeatable)."
_AUROC_HELP = "Gate: largest accepted AUROC drop in points (classify)."
_DICE_HELP = "Gate: largest accepted Dice drop (segment)."
_MAE_HELP = "Gate: largest accepted increase of the head-circumference MAE in mm (hc)."


# ------------------------------------------------------------------------------------ keygen
@edge_app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="Key prefix: private key at PREFIX (0600), public key at PREFIX.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair (scanners trusting the old key stop updating)."),
) -> None:
    """Write an Ed25519 release-signing key pair (PEM): sign bundles with PREFIX, pin PREFIX.pub on scanners."""
    from echocare.bundle import BundleError, generate_keypair

    console = _console()
    try:
        priv, pub = generate_keypair(out, overwrite=force)
    except BundleError as e:
        _fail(console, str(e), 2)
    console.print(f"private key: {priv} (keep it secret)\npublic key:  {pub} (give to scanners and the registry)")


# ------------------------------------------------------------------------------------ export
@edge_app.command()
def export(
    source: Path = typer.Argument(..., help="Federation run directory (uses RUN/global) or a task-model directory (model.json + head.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder for model.onnx and export.json."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Data spec of real images for the parity check (default: random inputs)."),
    atol: float = typer.Option(1e-3, help="Parity: max |torch - onnx| allowed, scaled by max(1, max |output|)."),
    cosine_min: float = typer.Option(0.99999, help="Parity: minimum cosine similarity of the outputs."),
    opset: int = typer.Option(17, help="ONNX opset (legacy TorchScript exporter)."),
) -> None:
    """Export encoder + head to ONNX (fixed size, dynamic batch) and check it against PyTorch; exit 1 beyond tolerance."""
    from edge.build.evaluate import EvalDataError, load_calibration
    from edge.build.export import ExportConfig, ExportError, export_task_model, resolve_model_dir

    console = _console()
    x = None
    try:
        if samples:
            from echocare.models.task_model import read_task_model_spec

            spec = read_task_model_spec(resolve_model_dir(source))
            x = load_calibration(samples, spec.preprocess_spec(), limit=4)
        with console.status("exporting to ONNX and checking parity"):
            r = export_task_model(source, out, samples=x, config=ExportConfig(opset=opset, atol=atol, cosine_min=cosine_min))
    except EvalDataError as e:
        _fail(console, str(e), 2)
    except ExportError as e:
        _fail(console, str(e), 1 if "disagrees" in str(e) else 2)
    console.print(f"{r.onnx_path}  ({r.info['task']}, {len(r.info['labels'])} labels, {r.info['flops_per_image'] / 1e9:.2f} GFLOP/image)")
    console.print(r.parity.describe())


# ---------------------------------------------------------------------------------- quantize
@edge_app.command()
def quantize(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="FP32 model.onnx from `edge export` (export.json beside it)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data spec (INT8), e.g. busi:/data/BUSI?limit=64."),
    val: Optional[str] = typer.Option(None, "--val", help="Labelled validation data spec for the accuracy gate (skipped without it)."),
    method: Method = typer.Option(Method.nncf, help="nncf: OpenVINO INT8 IR; qdq: ONNX Runtime / TensorRT INT8 Q/DQ ONNX; fp16: float16 ONNX."),
    activations: Activations = typer.Option(Activations.symmetric, help="qdq: symmetric (S8S8, TensorRT) or asymmetric (U8S8, fast on x86 ONNX Runtime)."),
    ignore_op: List[str] = typer.Option([], "--ignore-op", help=_IGNORE_OP_HELP),
    ignore_name: List[str] = typer.Option([], "--ignore-name", help=_IGNORE_NAME_HELP),
    smooth_quant: float = typer.Option(-1.0, help="nncf: SmoothQuant alpha for MatMuls (0..1); negative = off (NNCF's setting for Swin)."),
    calib_size: int = typer.Option(64, help="Calibration images used."),
    inference_precision: OVPrecision = typer.Option(OVPrecision.f32, help="nncf gate: OpenVINO inference precision to evaluate with."),
    max_auroc_drop: float = typer.Option(1.0, help=_AUROC_HELP),
    max_dice_drop: float = typer.Option(0.01, help=_DICE_HELP),
    max_mae_increase: float = typer.Option(1.0, help=_MAE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: beside the model)."),
) -> None:
    """INT8 post-training quantization (or FP16), then the accuracy gate: FP32 vs quantized on --val; exit 1 beyond the bound."""
    from edge.build.pipeline import fp32_metrics_of, gate_session
    from edge.build.evaluate import EvalDataError, load_calibration, load_eval_set, metrics_from_outputs, predict_all
    from edge.build.export import ExportError, read_export_info, write_json_atomic
    from edge.build.gate import check_gate
    from edge.build.quantize import QuantizeConfig, QuantizeError
    from edge.build.quantize import quantize as run_quantize

    console = _console()
    try:
        qcfg = QuantizeConfig(method=method.value, ignore_ops=tuple(ignore_op), ignore_names=tuple(ignore_name), calib_size=calib_size,
                              smooth_quant=smooth_quant, activations=activations.value)
    except (ValueError, re.error) as e:  # re.error: a bad --ignore-name regex
        raise typer.BadParameter(str(e)) from None
    out = out or model.parent
    try:
        info = read_export_info(model)
        from echocare.preprocess import PreprocessSpec

        pre = PreprocessSpec.from_dict(info["preprocess"])
        x = load_calibration(calib, pre, limit=calib_size) if calib and qcfg.method != "fp16" else None
        ev = load_eval_set(val, info["task"], info["labels"], pre) if val else None
        with console.status(f"quantizing ({qcfg.method})"):
            q = run_quantize(model, x, out, qcfg)
    except (ExportError, EvalDataError) as e:
        _fail(console, str(e), 2)
    except QuantizeError as e:
        _fail(console, str(e), 1 if x is not None else 2)
    console.print(f"{q.model_path}  ({q.precision}, {q.seconds:.1f} s; kept in float: {len(q.ignored_nodes)} nodes/types)")
    if ev is None:
        console.print("[yellow]no --val: accuracy gate skipped[/]")
        return
    with console.status("gate: evaluating FP32 and quantized"):
        fp32 = fp32_metrics_of(model, ev)
        sess = gate_session(q, inference_precision.value)
        cand = metrics_from_outputs(predict_all(sess.run, ev.inputs), ev)
    result = check_gate(info["task"], fp32, cand, _bounds(max_auroc_drop, max_dice_drop, max_mae_increase),
                        candidate_name=f"{q.precision} ({sess.info.backend})")
    write_json_atomic(out / "gate.json", {**result.to_dict(), "fp32_metrics": fp32, "candidate_metrics": cand,
                                          "validation_samples": len(ev), "model": str(q.model_path)})
    _metrics_table(console, fp32, cand, q.precision)
    if not result.passed:
        _fail(console, result.reason, 1)
    console.print(f"[green]{result.reason}[/]")


def _metrics_table(console: Console, fp32: dict, cand: dict, name: str) -> None:
    t = Table(title="validation metrics")
    t.add_column("metric")
    t.add_column("fp32", justify="right")
    t.add_column(name, justify="right")
    for k in fp32:
        t.add_row(k, f"{fp32[k]:.4f}", f"{cand.get(k, float('nan')):.4f}")
    console.print(t)


# ----------------------------------------------------------------------------------- compile
@edge_app.command("compile")
def compile_(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="ONNX model, or an OpenVINO IR .xml (openvino-cpu)."),
    target: Target = typer.Option(..., "--target", help="openvino-cpu | onnxruntime-cpu | tensorrt (TensorRT: run on the device)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: beside the model)."),
    precision: OVPrecision = typer.Option(OVPrecision.f32, "--inference-precision", help="openvino-cpu: inference precision, set explicitly and recorded."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="tensorrt: build config (tensorrt.json from the bundle)."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="tensorrt: engine path (default: OUT/model.engine)."),
    max_batch: int = typer.Option(8, help="tensorrt: optimisation profile max batch (without --config)."),
    trt_precision: Precision = typer.Option(Precision.int8, "--trt-precision", help="tensorrt: precision of the ONNX graph (without --config)."),
) -> None:
    """Compile a model for a target: OpenVINO IR, an ONNX Runtime-checked ONNX, or a TensorRT engine (on the NVIDIA device)."""
    from edge.build.compiled import CompileError

    console = _console()
    out = out or model.parent
    try:
        if target is Target.openvino_cpu:
            from edge.build.compile_openvino import compile_openvino

            graph = _detect_precision(model)
            with console.status("compiling OpenVINO IR"):
                c = compile_openvino(model, out, inference_precision=precision.value, graph_precision=graph)
        elif target is Target.onnxruntime_cpu:
            from edge.build.compile_onnxruntime import compile_onnxruntime

            with console.status("checking with ONNX Runtime"):
                c = compile_onnxruntime(model, out, graph_precision=_detect_precision(model),
                                        out_name="model.onnx" if model.parent != out or model.name != "model.onnx" else "model.ort.onnx")
        else:
            from edge.build.compile_tensorrt import TensorRTBuildConfig, build_engine

            tcfg = TensorRTBuildConfig.load(config) if config else TensorRTBuildConfig(precision=trt_precision.value, max_batch=max_batch)
            with console.status("building the TensorRT engine (minutes on a Jetson)"):
                c = build_engine(model, engine or out / "model.engine", tcfg)
    except CompileError as e:
        _fail(console, str(e), 2)
    t = Table(title=f"compiled for {c.target}", show_header=False)
    t.add_row("model", str(c.model_path))
    t.add_row("files", ", ".join(str(f) for f in c.files))
    t.add_row("precision", c.precision + (f" (inference {c.inference_precision})" if c.inference_precision else ""))
    for k, v in c.details.items():
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(t)


def _detect_precision(model: Path) -> str:
    """int8 when the graph holds Q/DQ or FakeQuantize ops, fp16 when its weights are float16, else fp32."""
    if model.suffix == ".xml":
        text = model.read_text(errors="replace")
        return "int8" if 'type="FakeQuantize"' in text else "fp32"
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger") for n in m.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer):
        return "fp16"
    return "fp32"


# ------------------------------------------------------------------------------------ bundle
@edge_app.command()
def bundle(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="Compiled model: OpenVINO model.xml (with .bin) or an ONNX file."),
    target: Target = typer.Option(..., "--target", help="The target the model was compiled for."),
    key: Path = typer.Option(..., "--key", exists=True, dir_okay=False, help="Ed25519 private key (from `edge keygen`)."),
    out: Path = typer.Option(..., "--out", help="Folder for NAME-VERSION/ and NAME-VERSION.tar.gz."),
    export_info: Optional[Path] = typer.Option(None, "--export-info", exists=True, dir_okay=False, help="export.json of the model (default: searched beside it)."),
    selftest: Optional[str] = typer.Option(None, "--selftest-data", help="Data spec for the self-test sample (default: the parity inputs are random: use real images)."),
    gate_json: Optional[Path] = typer.Option(None, "--gate", exists=True, dir_okay=False, help="gate.json from `edge quantize` (FP32 vs quantized metrics for the model card)."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: TASK-ENCODER-TARGET)."),
    version: Optional[str] = typer.Option(None, help="Bundle version (default: UTC timestamp)."),
    device_class: Optional[str] = typer.Option(None, "--device-class", help="Sign the bundle for one scanner class."),
    inference_precision: OVPrecision = typer.Option(OVPrecision.f32, help="openvino-cpu: the inference precision the IR was compiled and gated with."),
) -> None:
    """Sign a compiled model into a versioned bundle (manifest + Ed25519 signature) and a tarball."""
    import numpy as np

    from echocare.preprocess import PreprocessSpec
    from edge.build.pipeline import _slug, assemble_bundle
    from echocare.bundle import BundleError
    from edge.build.evaluate import EvalDataError, load_calibration
    from edge.build.export import ExportError, read_export_info

    console = _console()
    try:
        info = json.loads(export_info.read_text()) if export_info else read_export_info(model)
        pre = PreprocessSpec.from_dict(info["preprocess"])
        x = load_calibration(selftest, pre, limit=2) if selftest else None
    except (ExportError, EvalDataError, ValueError) as e:
        _fail(console, str(e), 2)
    if x is None:
        console.print("[yellow]no --selftest-data: the self-test sample is random noise (real images test more)[/]")
        x = np.random.default_rng(0).standard_normal((2, 3, pre.size, pre.size)).astype(np.float32)
    precision = _detect_precision(model)
    if model.suffix == ".xml":
        files = {"model/model.xml": model, "model/model.bin": model.with_suffix(".bin")}
        desc = [{"path": "model/model.xml", "role": "model", "format": "openvino-ir", "precision": precision, "target": target.value,
                 "inference_precision": inference_precision.value, "weights": "model/model.bin"},
                {"path": "model/model.bin", "role": "weights", "precision": precision, "target": target.value}]
    else:
        files = {"model/model.onnx": model}
        desc = [{"path": "model/model.onnx", "role": "model", "format": "onnx", "precision": precision, "target": target.value}]
        trt_cfg = model.parent / "tensorrt.json"
        if target is Target.tensorrt and trt_cfg.is_file():
            files["tensorrt.json"] = trt_cfg
            desc.append({"path": "tensorrt.json", "role": "build-config", "target": target.value})
    extra: dict = {}
    if gate_json:
        g = json.loads(gate_json.read_text())
        extra["model_card_validation"] = {"fp32": g.get("fp32_metrics"), precision: g.get("candidate_metrics"),
                                          "gate": {k: g[k] for k in ("metric", "fp32", "candidate", "drop", "bound", "passed", "reason") if k in g},
                                          "samples": g.get("validation_samples")}
    name = _slug(name or f"{info['task']}-{info['encoder']['config']}-{target.value}")
    from datetime import datetime, timezone

    version = _slug(version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S"))
    try:
        tar = assemble_bundle(out, key, info=info, target=target.value, precision=precision, files=files, desc=desc,
                              selftest_inputs=x, name=name, version=version, work=out / f".work-{name}",
                              device_class=device_class, extra=extra)
    except BundleError as e:
        _fail(console, str(e), 2)
    console.print(f"{tar}\n{out / f'{name}-{version}'}/")


# ------------------------------------------------------------------------------------ verify
@edge_app.command()
def verify(
    bundle_path: Path = typer.Argument(..., exists=True, help="Bundle directory or .tar.gz."),
    pubkey: Path = typer.Option(..., "--pubkey", exists=True, dir_okay=False, help="Release-signing public key (PEM)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verified manifest as JSON."),
) -> None:
    """Check the Ed25519 signature and every artifact hash; exit 1 on any flipped byte, unlisted file or unsafe tar member."""
    from echocare.bundle import BundleError, verify_bundle

    console = _console(as_json)
    try:
        manifest = verify_bundle(bundle_path, pubkey)
    except BundleError as e:
        _fail(console, f"REFUSED: {e}", 1)
    if as_json:
        _print_json(manifest)
        return
    t = Table(title=f"{manifest.get('name')}-{manifest.get('version')}: signature OK, all hashes OK")
    for col in ("artifact", "role", "precision", "target", "bytes", "sha256"):
        t.add_column(col, overflow="fold")
    for a in manifest["artifacts"]:
        t.add_row(a["path"], str(a.get("role", "")), str(a.get("precision") or ""), str(a.get("target") or ""), f"{a['size']:,}", a["sha256"][:16])
    console.print(t)
    card = manifest.get("model_card", {})
    console.print(f"task {manifest.get('task')} · labels {manifest.get('labels')} · encoder sha256 {str(manifest.get('encoder', {}).get('sha256'))[:16]}")
    if card.get("sites"):
        eps = ", ".join(f"{s} ε={p.get('epsilon'):.2f}" for s, p in card.get("privacy", {}).items() if p.get("epsilon") is not None)
        console.print(f"federation: {len(card['sites'])} sites, {card.get('rounds')} rounds; {eps}")
    if "validation" in card:
        console.print(f"gate: {card['validation'].get('gate', {}).get('reason', '-')}")


# ------------------------------------------------------------------------------------- infer
@edge_app.command()
def infer(
    bundle_path: Path = typer.Argument(..., exists=True, help="Bundle directory or .tar.gz."),
    inputs: List[Path] = typer.Argument(..., help="PNG/JPEG/BMP/TIFF images, DICOM files (multi-frame too), or video clips (mp4...)."),
    pubkey: Optional[Path] = typer.Option(None, "--pubkey", exists=True, dir_okay=False, envvar="ECHOFLEET_PUBKEY",
                                          help="Release-signing public key: the bundle is verified before it runs."),
    skip_verify: bool = typer.Option(False, "--skip-verify", help="Run without checking the signature (only for a bundle the agent already verified)."),
    backend: Backend = typer.Option(Backend.auto, help="auto picks the best installed backend for the bundle's models."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: bundle info and a result per input."),
    masks_dir: Path = typer.Option(Path("masks"), "--masks-dir", help="segment/hc: where predicted mask PNGs (at the input's own size) are written."),
    pixel_mm: Optional[float] = typer.Option(None, "--pixel-mm", help="hc: source pixel size in mm when the file does not carry it (DICOM does)."),
    max_frames: int = typer.Option(16, help="Clips / multi-frame DICOM: frames run per file (evenly spaced); classify averages them."),
) -> None:
    """Run a bundle on images: class probabilities, or mask PNGs (+ foreground fraction), or head circumference in mm."""
    from echocare.data.base import UnreadableImage
    from echocare.bundle import BundleError
    from edge.device.inputs import read_frames
    from edge.device.runtime import load_bundle

    console = _console(as_json)
    if pubkey is None and not skip_verify:
        _fail(console, "no --pubkey (or ECHOFLEET_PUBKEY): refusing to run an unverified bundle (use --skip-verify for one the agent installed)", 2)
    try:
        rt = load_bundle(bundle_path, backend.value, public_key=None if skip_verify else pubkey)
    except BundleError as e:
        _fail(console, f"REFUSED: {e}", 1)
    except Exception as e:  # backend cannot load the model
        _fail(console, f"{bundle_path}: cannot load ({e})", 2)
    results, failed = [], 0
    with rt:
        for path in inputs:
            try:
                frames = read_frames(path, max_frames=max_frames)
            except UnreadableImage as e:
                failed += 1
                results.append({"input": str(path), "error": e.reason})
                continue
            preds = rt.predict([f.image for f in frames], pixel_mm=[f.pixel_mm or pixel_mm for f in frames])
            results.append(_summarise(rt, path, frames, preds, masks_dir))
        info = rt.describe()
    if as_json:
        _print_json({"bundle": info, "results": results})
    else:
        _print_results(console, info, rt.task, results)
    if failed:
        raise typer.Exit(2)


def _summarise(rt, path: Path, frames, preds: list[dict], masks_dir: Path) -> dict:
    """One result per input file (clips: mean probabilities / per-frame masks)."""
    import numpy as np
    from PIL import Image

    r: dict = {"input": str(path), "frames": len(frames)}
    if rt.task == "classify":
        labels = list(preds[0]["probabilities"])
        mean = np.mean([[p["probabilities"][k] for k in labels] for p in preds], axis=0)
        r["probabilities"] = {k: float(v) for k, v in zip(labels, mean)}
        r["label"] = labels[int(np.argmax(mean))]
        if len(preds) > 1:
            r["per_frame_labels"] = [p["label"] for p in preds]
        return r
    masks_dir.mkdir(parents=True, exist_ok=True)
    r["masks"], r["foreground_fraction"] = [], []
    for f, p in zip(frames, preds):
        suffix = f"_f{f.frame}" if f.frame is not None else ""
        out = masks_dir / f"{path.stem}{suffix}_mask.png"
        Image.fromarray((p["mask"] > 0).astype(np.uint8) * 255).save(out)
        r["masks"].append(str(out))
        r["foreground_fraction"].append(p["foreground_fraction"])
    if rt.task == "hc":
        r["hc_mm"] = [p.get("hc_mm") for p in preds]
        if all(v is None for v in r["hc_mm"]):
            r["note"] = "no pixel size: pass --pixel-mm (or use DICOM with an ultrasound calibration region) for HC in mm"
    return r


def _print_results(console: Console, info: dict, task: str, results: list[dict]) -> None:
    console.print(f"{info['bundle']} · {info['artifact']} on {info['backend']} ({info['precision']}"
                  + (f", inference {info['session'].get('inference_precision')}" if info["session"].get("inference_precision") else "") + ")")
    t = Table()
    t.add_column("input", overflow="fold")
    t.add_column("frames", justify="right")
    if task == "classify":
        labels = next((list(r["probabilities"]) for r in results if "probabilities" in r), [])
        t.add_column("label")
        for k in labels:
            t.add_column(k, justify="right")
        for r in results:
            if "error" in r:
                t.add_row(r["input"], "-", f"[red]{r['error']}[/]", *["" for _ in labels])
            else:
                t.add_row(r["input"], str(r["frames"]), r["label"], *[f"{r['probabilities'][k]:.3f}" for k in labels])
    else:
        t.add_column("mask PNG", overflow="fold")
        t.add_column("foreground", justify="right")
        if task == "hc":
            t.add_column("HC (mm)", justify="right")
        for r in results:
            if "error" in r:
                t.add_row(r["input"], "-", f"[red]{r['error']}[/]", "", *([""] if task == "hc" else []))
                continue
            hc = [f"{v:.1f}" if v is not None and v == v else "-" for v in r.get("hc_mm", [])]
            t.add_row(r["input"], str(r["frames"]), r["masks"][0] + (f" (+{len(r['masks']) - 1})" if len(r["masks"]) > 1 else ""),
                      f"{r['foreground_fraction'][0]:.3f}", *([", ".join(hc)] if task == "hc" else []))
    console.print(t)


# ------------------------------------------------------------------------------------- bench
@edge_app.command()
def bench(
    bundle_path: Path = typer.Argument(..., exists=True, help="Bundle directory or .tar.gz."),
    pubkey: Optional[Path] = typer.Option(None, "--pubkey", exists=True, dir_okay=False, help="Verify the bundle first."),
    batch: int = typer.Option(8, help="Batch size for the throughput figure."),
    iters: int = typer.Option(20, help="Timed runs at batch 1 per model (p50/p95)."),
    torch_model: Optional[Path] = typer.Option(None, "--torch-model", help="Task-model directory for the PyTorch FP32 eager baseline (default: the one the bundle was built from, if present)."),
    no_peak: bool = typer.Option(False, "--no-peak", help="Skip the matmul peak measurement."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: the backend's)."),
    profile: bool = typer.Option(False, "--profile", help="Also show where each OpenVINO model's time goes (per node type, batch 1): the matmul kernels' share and speed."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Latency p50/p95 (batch 1), throughput (batch N), GFLOP/s vs the matmul peak, and speed-up over PyTorch FP32 eager, in one run."""
    from edge.bench.latency import bench_bundle
    from echocare.bundle import BundleError

    console = _console(as_json)
    try:
        with console.status("benchmarking") as status:
            report = bench_bundle(bundle_path, public_key=pubkey, batch=batch, iters=iters, torch_model=torch_model,
                                  with_peak=not no_peak, num_threads=threads, profile=profile,
                                  progress=lambda s: status.update(f"benchmarking {s}"))
    except BundleError as e:
        _fail(console, f"REFUSED: {e}", 1)
    if as_json:
        _print_json(report.to_dict())
        return
    print_bench(console, report)


def print_bench(console: Console, report) -> None:
    """The bench table (also used by bench/bench_edge.py)."""
    from rich.markup import escape  # labels such as "model.xml [openvino/f32]" are not markup
    gf = f"{report.flops_per_image / 1e9:.2f} GFLOP/image" if report.flops_per_image else "FLOPs unknown"
    t = Table(title=f"{report.image_size}² · {gf} · {report.machine.get('cpu', '?')} ({report.machine.get('cpu_count')} CPUs)")
    for col in ("model", "backend", "precision", "p50 ms", "p95 ms", f"img/s @b{report.rows[0].batch if report.rows else ''}",
                "GFLOP/s", "peak GFLOP/s", "% of peak", f"% of peak @b{report.rows[0].batch if report.rows else ''}", "× torch"):
        t.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right", overflow="fold")
    for r in report.rows:
        t.add_row(escape(r.label), r.backend, r.precision if r.precision == r.compute_precision else f"{r.precision} ({r.compute_precision})",
                  f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}", f"{r.throughput_ips:.2f}",
                  f"{r.gflops:.0f}" if r.gflops else "-", f"{r.peak_gflops:.0f}" if r.peak_gflops else "-",
                  f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction else "-",
                  f"{100 * r.throughput_peak_fraction:.0f}%" if r.throughput_peak_fraction else "-",
                  f"{r.speedup_vs_torch:.2f}" if r.speedup_vs_torch else "-")
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


# ------------------------------------------------------------------------------------- build
@edge_app.command()
def build(
    run_dir: Path = typer.Argument(..., help="Federation run directory (uses RUN/global) or a task-model directory."),
    target: Target = typer.Option(..., "--target", help="openvino-cpu (Intel carts) | onnxruntime-cpu (generic) | tensorrt (Jetson Orin)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data spec (needed for int8)."),
    val: str = typer.Option(..., "--val", help="Labelled validation data spec for the accuracy gate."),
    key: Path = typer.Option(..., "--key", exists=True, dir_okay=False, help="Ed25519 private key (from `edge keygen`)."),
    out: Path = typer.Option(..., "--out", help="Output folder for NAME-VERSION/ and NAME-VERSION.tar.gz."),
    precision: Precision = typer.Option(Precision.int8, help="int8 (default), fp16 or fp32."),
    inference_precision: OVPrecision = typer.Option(OVPrecision.f32, help="openvino-cpu: OpenVINO inference precision (explicit; recorded)."),
    ignore_op: List[str] = typer.Option([], "--ignore-op", help=_IGNORE_OP_HELP),
    ignore_name: List[str] = typer.Option([], "--ignore-name", help=_IGNORE_NAME_HELP),
    smooth_quant: float = typer.Option(-1.0, help="openvino-cpu int8: NNCF SmoothQuant alpha (negative = off)."),
    calib_limit: int = typer.Option(64, help="Calibration images used."),
    val_limit: Optional[int] = typer.Option(None, help="Validation images used (default: all the spec yields)."),
    max_auroc_drop: float = typer.Option(1.0, help=_AUROC_HELP),
    max_dice_drop: float = typer.Option(0.01, help=_DICE_HELP),
    max_mae_increase: float = typer.Option(1.0, help=_MAE_HELP),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: TASK-ENCODER-TARGET)."),
    version: Optional[str] = typer.Option(None, help="Bundle version (default: UTC timestamp)."),
    device_class: Optional[str] = typer.Option(None, "--device-class", help="Sign the bundle for one scanner class."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON."),
) -> None:
    """export → quantize → gate → compile → bundle → verify, with a summary table; exit 1 when the gate or self-test fails."""
    from edge.build.pipeline import BuildConfig, default_quantize_config
    from edge.build.pipeline import build as run_build
    from echocare.bundle import BundleError
    from edge.build.compiled import CompileError
    from edge.build.evaluate import EvalDataError
    from edge.build.export import ExportError
    from edge.build.gate import GateFailed
    from edge.build.quantize import QuantizeError

    console = _console(as_json)
    q = default_quantize_config(target.value, precision.value)
    if q is not None:
        from dataclasses import replace

        try:
            q = replace(q, ignore_ops=tuple(ignore_op), ignore_names=tuple(ignore_name), smooth_quant=smooth_quant, calib_size=calib_limit)
        except (ValueError, re.error) as e:
            raise typer.BadParameter(str(e)) from None
    cfg = BuildConfig(precision=precision.value, inference_precision=inference_precision.value, quantize=q,
                      bounds=_bounds(max_auroc_drop, max_dice_drop, max_mae_increase), calib_limit=calib_limit,
                      val_limit=val_limit, name=name, version=version, device_class=device_class)
    summary, code, error = None, 0, None
    try:
        with console.status("edge build") as status:
            summary = run_build(run_dir, target.value, calib, val, key, out, config=cfg, progress=lambda s: status.update(s))
        if not summary.ok:
            code, error = 1, f"self-test failed: {summary.selftest[1] if summary.selftest else 'not run'}"
    except GateFailed as e:
        summary, code, error = getattr(e, "summary", None), 1, str(e)
    except ExportError as e:
        code, error = (1 if "disagrees" in str(e) else 2), str(e)
    except (EvalDataError, BundleError, CompileError, QuantizeError, ValueError) as e:
        code, error = 2, str(e)
    if summary is not None:
        if as_json:
            _print_json(_summary_dict(summary))
        else:
            _print_build(console, summary)
    if error:
        _fail(console, error, code)


def _summary_dict(s) -> dict:
    return {"target": s.target, "precision": s.precision, "ok": s.ok, "tarball": s.tarball, "bundle_dir": s.bundle_dir,
            "gate": s.gate.to_dict() if s.gate else None, "fp32_metrics": s.fp32_metrics, "candidate_metrics": s.candidate_metrics,
            "selftest": list(s.selftest) if s.selftest else None,
            "steps": [{"name": st.name, "seconds": round(st.seconds, 2), "detail": st.detail} for st in s.steps]}


def _print_build(console: Console, s) -> None:
    t = Table(title=f"edge build · {s.target} · {s.precision}")
    t.add_column("step")
    t.add_column("time", justify="right")
    t.add_column("result", overflow="fold")
    for st in s.steps:
        style = "red" if (st.name == "gate" and s.gate and not s.gate.passed) else ""
        t.add_row(st.name, f"{st.seconds:.1f} s", f"[{style}]{st.detail}[/]" if style else st.detail)
    console.print(t)
    if s.fp32_metrics:
        _metrics_table(console, s.fp32_metrics, s.candidate_metrics, s.precision)
    if s.tarball:
        console.print(f"[green]bundle:[/] {s.tarball}")


if __name__ == "__main__":  # python -m echofleet.cli.edge ...
    edge_app()
