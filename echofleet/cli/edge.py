"""CLI: ``echofleet edge ...`` — one command per step, and ``build`` for all of them.

    echofleet edge keygen   --out keys/release
    echofleet edge build    RUN_DIR --target openvino-cpu --calib DATA --val DATA --key keys/release --out dist
    echofleet edge build    RUN_DIR --target onnxruntime-cpu --calib sites --accept sites --key keys/release --out dist \
                            --federation NAME --flwr-home FLWR_HOME      (on the SuperLink's machine: docs/edge.md)
    echofleet edge export   RUN_DIR|TASK_MODEL --out work/export
    echofleet edge quantize work/export/model.onnx --calib DATA --val DATA --method nncf --out work/q
    echofleet edge compile  work/q/model.int8.xml --target openvino-cpu --out work/ov
    echofleet edge bundle   work/ov/model.xml --target openvino-cpu --key keys/release --out dist
    echofleet edge verify   dist/NAME-VERSION.tar.gz --pubkey keys/release.pub
    echofleet edge infer    dist/NAME-VERSION.tar.gz image.png clip.mp4 scan.dcm --pubkey keys/release.pub
    echofleet edge bench    dist/NAME-VERSION.tar.gz --pubkey keys/release.pub

A thin layer: each command checks its arguments, calls one library function per step
(:mod:`edge.build`, :mod:`edge.device`, :mod:`edge.bench`; the targets come from
:data:`edge.targets.TARGETS`) and prints with :mod:`edge.report`. Only typer and rich are imported
here; each command imports what it needs (torch only for export/quantize/build/bench baselines),
so ``infer``, ``verify`` and ``bench`` run on a scanner with ``echofleet[edge]`` alone.

Exit codes: 0 ok, 1 the model or bundle was refused (parity, gate, signature, self-test),
2 bad input (missing file, bad option, unreadable data), always as one ``error: ...`` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from echofleet.cli.agent import agent
from echofleet.cli.common import fail
from edge.targets import PRECISIONS, TARGET_NAMES, TARGETS, EdgeTarget, UnknownTarget, get_target

edge_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)
edge_app.command("agent", help="Keep this scanner on the registry's current release (verify, install, self-test, roll back).")(agent)

# choices, from the table of targets where they come from there
INFERENCE_PRECISIONS = tuple(dict.fromkeys(p for t in TARGETS.values() for p in t.inference_precisions))
METHODS = ("nncf", "qdq", "fp16")
ACTIVATIONS = ("symmetric", "asymmetric")
BACKENDS = ("auto", "openvino", "onnxruntime", "tensorrt")

_TARGET_HELP = " | ".join(f"{t.name} ({t.description})" for t in TARGETS.values())
_IGNORE_OP_HELP = "Keep an op kind in float (repeatable): layernorm, softmax, gelu, add (residual adds)."
_IGNORE_NAME_HELP = "Keep nodes whose name matches this regex in float (repeatable)."
_AUROC_HELP = "Gate: largest accepted AUROC drop in points (classify)."
_DICE_HELP = "Gate: largest accepted Dice drop (segment)."
_MAE_HELP = "Gate: largest accepted increase of the head-circumference MAE in mm (hc)."


BENCH_PIPED_WIDTH = 400  # columns for `edge bench` into a file or pipe: wide enough that no cell folds


# ------------------------------------------------------------------------- argument checks
def _console(as_json: bool = False) -> Console:
    """Human output on stdout, or on stderr when stdout carries JSON."""
    return Console(stderr=as_json, highlight=False)


def _file(path: Path, what: str) -> Path:
    """``path`` must be an existing file (else: one error line, exit 2)."""
    if not path.exists():
        raise fail(f"{path}: no such {what}", 2)
    if not path.is_file():
        raise fail(f"{path}: the {what} must be a file, not a directory", 2)
    return path


def _exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise fail(f"{path}: no such {what}", 2)
    return path


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise fail(f"{option} {value!r}: choose one of {', '.join(choices)}", 2)
    return value


def _target(name: str) -> EdgeTarget:
    try:
        return get_target(name)
    except UnknownTarget as e:
        raise fail(f"--target: {e}", 2) from None


def _inference_precision(value: str, target: EdgeTarget | None = None) -> str:
    allowed = target.inference_precisions if target is not None and target.inference_precisions else INFERENCE_PRECISIONS
    return _choice(value, allowed, "--inference-precision")


def _at_least(value: float, low: float, option: str) -> None:
    if value < low:
        raise fail(f"{option} {value:g}: must be at least {low:g}", 2)


def _print_json(data) -> None:
    from edge.report import to_json

    typer.echo(to_json(data))


def _bounds(max_auroc_drop: float, max_dice_drop: float, max_mae_increase: float):
    from edge.build.gate import GateBounds

    return GateBounds(auroc_points=max_auroc_drop, dice=max_dice_drop, hc_mae_mm=max_mae_increase)


# ------------------------------------------------------------------------------------ keygen
@edge_app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="Key prefix: private key at PREFIX (0600), public key at PREFIX.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair (scanners trusting the old key stop updating)."),
) -> None:
    """Write an Ed25519 release-signing key pair (PEM): sign bundles with PREFIX, pin PREFIX.pub on scanners."""
    from echocare.bundle import BundleError, generate_keypair

    try:
        priv, pub = generate_keypair(out, overwrite=force)
    except (BundleError, OSError) as e:
        raise fail(str(e), 2) from None
    _console().print(f"private key: {priv} (keep it secret)\npublic key:  {pub} (give to scanners and the registry)")


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
    _at_least(opset, 7, "--opset")
    try:
        model_dir = resolve_model_dir(source)
        x = None
        if samples:
            from echocare.models.task_model import read_task_model_spec

            x = load_calibration(samples, read_task_model_spec(model_dir).preprocess_spec(), limit=4)
    except (EvalDataError, ExportError, ValueError) as e:
        raise fail(str(e), 2) from None
    try:
        with console.status("exporting to ONNX and checking parity"):
            r = export_task_model(source, out, samples=x, config=ExportConfig(opset=opset, atol=atol, cosine_min=cosine_min))
    except ExportError as e:
        raise fail(str(e), 1 if "disagrees" in str(e) else 2) from None
    console.print(f"{r.onnx_path}  ({r.info['task']}, {len(r.info['labels'])} labels, {r.info['flops_per_image'] / 1e9:.2f} GFLOP/image)")
    console.print(r.parity.describe())


# ---------------------------------------------------------------------------------- quantize
@edge_app.command()
def quantize(
    model: Path = typer.Argument(..., help="FP32 model.onnx from `edge export` (export.json beside it)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data spec (INT8), e.g. busi:/data/BUSI?limit=64."),
    val: Optional[str] = typer.Option(None, "--val", help="Labelled validation data spec for the accuracy gate (skipped without it)."),
    method: str = typer.Option("nncf", help="nncf: OpenVINO INT8 IR; qdq: ONNX Runtime / TensorRT INT8 Q/DQ ONNX; fp16: float16 ONNX."),
    activations: str = typer.Option("symmetric", help="qdq: symmetric (S8S8, TensorRT) or asymmetric (U8S8, fast on x86 ONNX Runtime)."),
    ignore_op: List[str] = typer.Option([], "--ignore-op", help=_IGNORE_OP_HELP),
    ignore_name: List[str] = typer.Option([], "--ignore-name", help=_IGNORE_NAME_HELP),
    smooth_quant: float = typer.Option(-1.0, help="nncf: SmoothQuant alpha for MatMuls (0..1); negative = off (NNCF's setting for Swin)."),
    calib_size: int = typer.Option(64, help="Calibration images used."),
    inference_precision: str = typer.Option("f32", help="nncf gate: OpenVINO inference precision to evaluate with (f32 | bf16 | f16)."),
    max_auroc_drop: float = typer.Option(1.0, help=_AUROC_HELP),
    max_dice_drop: float = typer.Option(0.01, help=_DICE_HELP),
    max_mae_increase: float = typer.Option(1.0, help=_MAE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: beside the model)."),
) -> None:
    """INT8 post-training quantization (or FP16), then the accuracy gate: FP32 vs quantized on --val; exit 1 beyond the bound."""
    _file(model, "model")
    _choice(method, METHODS, "--method")
    _choice(activations, ACTIVATIONS, "--activations")
    _inference_precision(inference_precision)
    _at_least(calib_size, 1, "--calib-size")
    if method != "fp16" and not calib:
        raise fail(f"--method {method} is INT8 and needs calibration images: --calib DATA_SPEC", 2)

    from echocare.preprocess import PreprocessSpec
    from edge.build.evaluate import EvalDataError, load_calibration, load_eval_set
    from edge.build.export import ExportError, read_export_info, write_json_atomic
    from edge.build.pipeline import run_gate
    from edge.build.quantize import QuantizeConfig, QuantizeError
    from edge.build.quantize import quantize as run_quantize
    from edge.report import metrics_table

    console = _console()
    try:
        qcfg = QuantizeConfig(method=method, ignore_ops=tuple(ignore_op), ignore_names=tuple(ignore_name), calib_size=calib_size,
                              smooth_quant=smooth_quant, activations=activations)
    except (ValueError, re.error) as e:  # re.error: a bad --ignore-name regex
        raise fail(str(e), 2) from None
    out = out or model.parent
    try:
        info = read_export_info(model)
        pre = PreprocessSpec.from_dict(info["preprocess"])
        x = load_calibration(calib, pre, limit=calib_size) if calib and qcfg.method != "fp16" else None
        ev = load_eval_set(val, info["task"], info["labels"], pre) if val else None
    except (ExportError, EvalDataError, ValueError) as e:
        raise fail(str(e), 2) from None
    try:
        with console.status(f"quantizing ({qcfg.method})"):
            q = run_quantize(model, x, out, qcfg)
    except QuantizeError as e:
        raise fail(str(e), 1) from None
    console.print(f"{q.model_path}  ({q.precision}, {q.seconds:.1f} s; kept in float: {len(q.ignored_nodes)} nodes/types)")
    if ev is None:
        console.print("[yellow]no --val: accuracy gate skipped[/]")
        return
    with console.status("gate: evaluating FP32 and quantized"):
        g = run_gate(info["task"], model, q.model_path, q.format, q.precision, ev,
                     _bounds(max_auroc_drop, max_dice_drop, max_mae_increase), inference_precision=inference_precision)
    write_json_atomic(out / "gate.json", g.record(q.model_path))
    console.print(metrics_table(g.fp32_metrics, g.candidate_metrics, q.precision))
    if not g.result.passed:
        raise fail(g.result.reason, 1)
    console.print(f"[green]{g.result.reason}[/]")


# ----------------------------------------------------------------------------------- compile
@edge_app.command("compile")
def compile_(
    model: Path = typer.Argument(..., help="ONNX model, or an OpenVINO IR .xml (openvino-cpu)."),
    target: str = typer.Option(..., "--target", help=f"{' | '.join(TARGET_NAMES)} (tensorrt: run on the device)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: beside the model)."),
    precision: str = typer.Option("f32", "--inference-precision", help="openvino-cpu: inference precision (f32 | bf16 | f16), set explicitly and recorded."),
    config: Optional[Path] = typer.Option(None, "--config", help="tensorrt: build config (tensorrt.json from the bundle)."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="tensorrt: engine path (default: the runtime's engine cache for this ONNX, where `edge infer` finds it)."),
    max_batch: int = typer.Option(8, help="tensorrt: optimisation profile max batch (without --config)."),
    trt_precision: str = typer.Option("int8", "--trt-precision", help="tensorrt: precision of the ONNX graph (without --config): int8 | fp16 | fp32."),
) -> None:
    """Compile a model for a target: OpenVINO IR, an ONNX Runtime-checked ONNX, or a TensorRT engine (on the NVIDIA device)."""
    _file(model, "model")
    t = _target(target)
    _inference_precision(precision, t)
    if config is not None:
        _file(config, "build config")
    _choice(trt_precision, PRECISIONS, "--trt-precision")
    _at_least(max_batch, 1, "--max-batch")

    from edge.build.compiled import CompileError, CompileOptions, compile_model, graph_precision, target_function
    from edge.report import print_compiled

    console = _console()
    out = out or model.parent
    try:
        if t.device_build:  # the model runs as an engine built here, on the device
            with console.status(f"building the {t.name} engine on this device (minutes on a Jetson)"):
                c = target_function(t.device_build)(model, out, config=config, engine=engine, precision=trt_precision,
                                                    max_batch=max_batch)
        else:
            options = CompileOptions(graph_precision=graph_precision(model), inference_precision=precision)
            with console.status(f"compiling for {t.name}"):
                c = compile_model(t, model, out, options)
    except CompileError as e:
        raise fail(str(e), 2) from None
    print_compiled(console, c)


# ------------------------------------------------------------------------------------ bundle
@edge_app.command()
def bundle(
    model: Path = typer.Argument(..., help="Compiled model: OpenVINO model.xml (with .bin) or an ONNX file."),
    target: str = typer.Option(..., "--target", help="The target the model was compiled for."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (from `edge keygen`)."),
    out: Path = typer.Option(..., "--out", help="Folder for NAME-VERSION/ and NAME-VERSION.tar.gz."),
    export_info: Optional[Path] = typer.Option(None, "--export-info", help="export.json of the model (default: searched beside it)."),
    selftest: Optional[str] = typer.Option(None, "--selftest-data", help="Data spec for the self-test sample (default: the parity inputs are random: use real images)."),
    gate_json: Optional[Path] = typer.Option(None, "--gate", help="gate.json from `edge quantize` (FP32 vs quantized metrics for the model card)."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: TASK-ENCODER-TARGET)."),
    version: Optional[str] = typer.Option(None, help="Bundle version (default: UTC timestamp)."),
    device_class: Optional[str] = typer.Option(None, "--device-class", help="Sign the bundle for one scanner class."),
    inference_precision: str = typer.Option("f32", help="openvino-cpu: the inference precision the IR was compiled and gated with."),
) -> None:
    """Sign a compiled model into a versioned bundle (manifest + Ed25519 signature) and a tarball."""
    _file(model, "model")
    t = _target(target)
    _file(key, "private key")
    for path, what in ((export_info, "export info"), (gate_json, "gate record")):
        if path is not None:
            _file(path, what)
    _inference_precision(inference_precision, t)

    import numpy as np

    from echocare.bundle import BundleError, load_private_key
    from echocare.preprocess import PreprocessSpec
    from edge.build.bundling import assemble_bundle, bundle_identity, validation_from_gate_record
    from edge.build.compiled import CompileError, describe_compiled
    from edge.build.evaluate import EvalDataError, load_calibration
    from edge.build.export import ExportError, read_export_info

    console = _console()
    try:
        load_private_key(key)
        info = read_export_info(model, export_info)
        pre = PreprocessSpec.from_dict(info["preprocess"])
        compiled = describe_compiled(t, model, inference_precision=inference_precision)
        extra = {"model_card_validation": validation_from_gate_record(gate_json, compiled.precision)} if gate_json else {}
        x = load_calibration(selftest, pre, limit=2) if selftest else None
    except (BundleError, ExportError, EvalDataError, CompileError, ValueError) as e:
        raise fail(str(e), 2) from None
    if x is None:
        console.print("[yellow]no --selftest-data: the self-test sample is random noise (real images test more)[/]")
        x = np.random.default_rng(0).standard_normal((2, 3, pre.size, pre.size)).astype(np.float32)
    name, version = bundle_identity(info["task"], info["encoder"]["config"], t.name, name, version)
    try:
        tar = assemble_bundle(out, key, info=info, compiled=compiled, selftest_inputs=x, name=name, version=version,
                              work=out / f".work-{name}", device_class=device_class, extra=extra)
    except BundleError as e:
        raise fail(str(e), 2) from None
    console.print(f"{tar}\n{out / f'{name}-{version}'}/")


# ------------------------------------------------------------------------------------ verify
@edge_app.command()
def verify(
    bundle_path: Path = typer.Argument(..., help="Bundle directory or .tar.gz."),
    pubkey: Path = typer.Option(..., "--pubkey", help="Release-signing public key (PEM)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verified manifest (with --explain: the chain) as JSON."),
    explain: bool = typer.Option(False, "--explain", help="Print the provenance chain: run, app hash, encoder, rounds, each site's disclosed epsilon, calibration and acceptance."),
) -> None:
    """Check the Ed25519 signature and every artifact hash; exit 1 on any flipped byte, unlisted file or unsafe tar member."""
    _exists(bundle_path, "bundle")
    _file(pubkey, "public key")

    from echocare.bundle import BundleError, verify_bundle
    from edge.report import print_verified

    try:
        manifest = verify_bundle(bundle_path, pubkey)
    except BundleError as e:
        raise fail(f"REFUSED: {e}", 1) from None
    if explain:
        from echocare.bundle import release_chain
        from edge.explain import print_release_chain

        chain = release_chain(manifest)
        if as_json:
            _print_json(chain)
        else:
            print_release_chain(_console(), chain)
    elif as_json:
        _print_json(manifest)
    else:
        print_verified(_console(), manifest)


# ------------------------------------------------------------------------------------- infer
def _require_pubkey(pubkey: Optional[Path], skip_verify: bool) -> None:
    """`infer` and `bench` run a bundle's models: only a verified one, unless --skip-verify says it was."""
    if pubkey is None and not skip_verify:
        raise fail("no --pubkey (or ECHOFLEET_PUBKEY): refusing to run an unverified bundle (use --skip-verify for one the agent installed)", 2)
    if pubkey is not None and not skip_verify:
        _file(pubkey, "public key")


@edge_app.command()
def infer(
    bundle_path: Path = typer.Argument(..., help="Bundle directory or .tar.gz."),
    inputs: List[Path] = typer.Argument(..., help="PNG/JPEG/BMP/TIFF images, DICOM files (multi-frame too), or video clips (mp4...)."),
    pubkey: Optional[Path] = typer.Option(None, "--pubkey", envvar="ECHOFLEET_PUBKEY",
                                          help="Release-signing public key: the bundle is verified before it runs."),
    skip_verify: bool = typer.Option(False, "--skip-verify", help="Run without checking the signature (only for a bundle the agent already verified)."),
    backend: str = typer.Option("auto", help="auto picks the best installed backend for the bundle's models; or openvino | onnxruntime | tensorrt (the engine built by `edge compile`)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: bundle info and a result per input."),
    masks_dir: Path = typer.Option(Path("masks"), "--masks-dir", help="segment/hc: where predicted mask PNGs (at the input's own size) are written."),
    pixel_mm: Optional[float] = typer.Option(None, "--pixel-mm", help="hc: source pixel size in mm when the file does not carry it (DICOM does)."),
    max_frames: int = typer.Option(16, help="Clips / multi-frame DICOM: frames run per file (evenly spaced); classify averages them."),
    choice_file: Optional[Path] = typer.Option(None, "--choice-file", help="Auto bundles: the precision choice recorded on this CPU (the agent writes DIR/precision.json at install); reused when it is for this bundle and CPU, else the candidates are timed and the choice written there."),
) -> None:
    """Run a bundle on images: class probabilities, or mask PNGs (+ foreground fraction), or head circumference in mm.

    A file that cannot be read is reported (``error: FILE: reason``) and the others still run; the exit code is then 2."""
    _exists(bundle_path, "bundle")
    _require_pubkey(pubkey, skip_verify)
    _choice(backend, BACKENDS, "--backend")
    for path in inputs:
        _file(path, "input file")
    if pixel_mm is not None and not pixel_mm > 0:
        raise fail(f"--pixel-mm {pixel_mm:g}: must be a positive pixel size in mm", 2)
    _at_least(max_frames, 1, "--max-frames")

    from echocare.bundle import BundleError
    from edge.device.infer import infer_files
    from edge.device.runtime import load_bundle
    from edge.report import print_infer

    console = _console(as_json)
    try:
        rt = load_bundle(bundle_path, backend, public_key=None if skip_verify else pubkey, choice_file=choice_file)
    except BundleError as e:
        raise fail(f"REFUSED: {e}", 1) from None
    except Exception as e:  # backend cannot load the model
        raise fail(f"{bundle_path}: cannot load ({e})", 2) from None
    with rt:
        res = infer_files(rt, inputs, masks_dir=masks_dir, pixel_mm=pixel_mm, max_frames=max_frames)
        info = rt.describe()
    if as_json:
        _print_json({"bundle": info, "results": res.results})
    elif res.succeeded:
        print_infer(console, info, rt.task, res.succeeded)
    for r in res.failed:
        fail(f"{r['input']}: {r['error']}", 2)  # printed; the exit code follows below
    if res.failed:
        raise typer.Exit(2)


# ------------------------------------------------------------------------------------- bench
@edge_app.command()
def bench(
    bundle_path: Path = typer.Argument(..., help="Bundle directory or .tar.gz."),
    pubkey: Optional[Path] = typer.Option(None, "--pubkey", envvar="ECHOFLEET_PUBKEY",
                                          help="Release-signing public key: the bundle is verified before it runs."),
    skip_verify: bool = typer.Option(False, "--skip-verify", help="Run without checking the signature (only for a bundle the agent already verified)."),
    batch: int = typer.Option(8, help="Batch size for the throughput figure."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds each model runs at batch 1 after warm-up, as benchmark_app -t (default 10; 0 with --iters alone); a quarter of it at batch N."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Minimum timed runs per model; given alone, exactly this many runs (no --duration)."),
    torch_model: Optional[Path] = typer.Option(None, "--torch-model", help="Task-model directory for the PyTorch FP32 eager baseline (default: the one the bundle was built from, if present)."),
    no_peak: bool = typer.Option(False, "--no-peak", help="Skip the matmul peak measurement."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: the backend's)."),
    profile: bool = typer.Option(False, "--profile", help="Also show where each OpenVINO model's time goes (per node type, batch 1): the matmul kernels' share and speed."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip OpenVINO's benchmark_app on each OpenVINO model (the external reference)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (on stdout; progress on stderr)."),
) -> None:
    """Latency p50/p90/mean over a fixed duration (batch 1) beside benchmark_app's, throughput (batch N), GFLOP/s vs the matmul peak, and speed-up over PyTorch FP32 eager, in one run."""
    _exists(bundle_path, "bundle")
    if torch_model is not None:
        _exists(torch_model, "task-model directory")
    _at_least(batch, 1, "--batch")
    if iters is not None:
        _at_least(iters, 1, "--iters")
    if duration is None:
        duration = 0.0 if iters is not None else 10.0  # --iters alone: a fixed number of runs
    _at_least(duration, 0, "--duration")
    if threads is not None:
        _at_least(threads, 1, "--threads")
    _require_pubkey(pubkey, skip_verify)

    from echocare.bundle import BundleError
    from edge.bench.latency import bench_bundle
    from edge.report import print_bench

    console = _console(as_json)
    if not console.is_terminal:  # piped to a file: rich's default 80 columns would fold the table's cells
        console = Console(stderr=as_json, highlight=False, width=BENCH_PIPED_WIDTH)
    try:
        with console.status("benchmarking") as status:
            report = bench_bundle(bundle_path, public_key=None if skip_verify else pubkey, batch=batch, iters=iters or 3,
                                  duration=duration, torch_model=torch_model, with_peak=not no_peak, num_threads=threads,
                                  profile=profile, reference=not no_reference, progress=lambda s: status.update(f"benchmarking {s}"))
    except BundleError as e:
        raise fail(f"REFUSED: {e}", 1) from None
    if as_json:
        _print_json(report.to_dict())
    else:
        print_bench(console, report)


# ------------------------------------------------------------------------------------- build
def _federation(run_dir: Path, name: str, app_dir: Path | None, flwr_home: Path | None):
    """The :class:`echofleet.deploy.FlowerFederation` that ``--federation NAME`` names, checked before
    anything is built: the app is a Flower app, RUN holds its training run's config (report.json),
    the connection exists in FLWR_HOME/config.toml (TLS, an address). Raises DeployError."""
    from echofleet.apps import run_config_of
    from echofleet.deploy import PROJECT_ROOT, DeployError, FlowerFederation, app_run_config

    app_dir = (app_dir or PROJECT_ROOT).resolve()
    app_run_config(app_dir)  # DeployError unless it is a Flower app with a run config
    try:  # the training run's config, as the release runs send it (mode "release", run-dir RUN)
        run = run_config_of(run_dir).replace(sim_sites_dir="")
    except ValueError as e:
        raise DeployError(f"--federation {name}: {e}") from None
    run_dir = run_dir.resolve()
    link = FlowerFederation(app=app_dir, name=name, flwr_home=(flwr_home or run_dir / ".flwr").resolve(), run_dir=run_dir,
                            workdir=run_dir / "release", run_config=run.as_run_config())
    link.connection()
    return link


@edge_app.command()
def build(
    run_dir: Path = typer.Argument(..., help="Federation run directory (uses RUN/global) or a task-model directory."),
    target: str = typer.Option(..., "--target", help=_TARGET_HELP),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data spec (needed for int8), or 'sites': the run's sites calibrate (noisy activation scales charged to their ledgers; no image here)."),
    val: Optional[str] = typer.Option(None, "--val", help="Labelled validation data spec for the central accuracy gate (needed unless --accept sites)."),
    accept: Optional[str] = typer.Option(None, "--accept", help="'sites': federated acceptance: every site gates the signed candidate on its own validation split (simulation runs: their virtual hospitals pin --key's public key; real hospitals pin it in their own policies)."),
    federation: Optional[str] = typer.Option(None, "--federation", help="--calib/--accept sites over a real federation: the name of its SuperLink connection (\\[superlink.NAME] with address and root-certificates in FLWR_HOME/config.toml); each step is a `flwr run APP NAME` with mode=\"release\". Run this on the coordinator's machine, where the SuperLink and its ServerApp run: the ServerApp reads the step's files from RUN and writes the sites' answers there. Without it: a simulation run's virtual hospitals."),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="--federation: the Flower app `flwr run` submits (default: the echofleet checkout this command runs from)."),
    flwr_home: Optional[Path] = typer.Option(None, "--flwr-home", help="--federation: Flower's home (FLWR_HOME) with the connection in config.toml (default: RUN/.flwr; ~/.flwr is never used)."),
    quorum: Optional[int] = typer.Option(None, "--quorum", help="--accept sites: how many sites must pass (default: every participating site)."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (from `edge keygen`)."),
    out: Path = typer.Option(..., "--out", help="Output folder for NAME-VERSION/ and NAME-VERSION.tar.gz."),
    precision: str = typer.Option("int8", help="int8 (default), fp16, fp32, or auto (openvino-cpu: NNCF INT8 with the MIXED and the PERFORMANCE preset (one INT8 file with --calib sites), each with f32/bf16 rest, bf16 and fp32, each gated on --val, all that pass signed into one bundle; the scanner times them and runs the fastest. Bundle ~5x an INT8 one: docs/edge.md)."),
    inference_precision: str = typer.Option("f32", help="openvino-cpu: OpenVINO inference precision f32 | bf16 | f16 (explicit; recorded; auto: per candidate)."),
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
    _exists(run_dir, "run or task-model directory")
    t = _target(target)
    _file(key, "private key")
    _choice(precision, t.build_precisions, "--precision")
    _inference_precision(inference_precision, t)
    if precision == "auto" and (not val or accept is not None):
        raise fail("--precision auto gates every candidate on --val DATA_SPEC (and not with --accept sites: one charged "
                   "acceptance per candidate at every site); build one precision for --accept sites", 2)
    if precision in ("int8", "auto") and not calib:
        raise fail("an INT8 build needs calibration images: --calib DATA_SPEC (or --precision fp16 / fp32)", 2)
    if accept is not None and accept != "sites":
        raise fail(f"--accept {accept!r}: the only value is 'sites' (federated acceptance)", 2)
    if not val and accept is None:
        raise fail("the accuracy gate needs labelled images: --val DATA_SPEC, or --accept sites", 2)
    if quorum is not None:
        _at_least(quorum, 1, "--quorum")
    calibrate_at_sites = calib == "sites" and precision in ("int8", "auto")
    if federation is not None and not calibrate_at_sites and accept != "sites":
        raise fail(f"--federation {federation}: nothing to ask the sites (give --calib sites and/or --accept sites)", 2)
    for given, option in ((app_dir, "--app"), (flwr_home, "--flwr-home")):
        if given is not None and federation is None:
            raise fail(f"{option} {given}: only with --federation NAME (a real federation's SuperLink)", 2)
    _at_least(calib_limit, 1, "--calib-limit")
    if val_limit is not None:
        _at_least(val_limit, 1, "--val-limit")

    from dataclasses import replace

    from echocare.bundle import BundleError
    from echofleet.deploy import DeployError
    from edge.build.compiled import CompileError
    from edge.build.evaluate import EvalDataError
    from edge.build.export import ExportError
    from edge.build.gate import GateFailed
    from edge.build.pipeline import SITES, AcceptanceRefused, BuildConfig, default_quantize_config
    from edge.build.pipeline import build as run_build
    from edge.build.quantize import QuantizeError
    from edge.federated.coordinator import CalibrationFailed
    from edge.report import print_build

    console = _console(as_json)
    sites = accept_at = simulated = None
    if federation is not None:  # a real federation: `flwr run` per step over its SuperLink
        try:
            link = _federation(run_dir, federation, app_dir, flwr_home)
            link.check_reachable()
        except DeployError as e:
            raise fail(str(e), 2) from None

        def progress(text: str) -> None:
            console.print(f"[federation {federation}] {text}", markup=False)

        sites = link.site_calibration(progress) if calibrate_at_sites else None
        accept_at = link.site_acceptance(progress) if accept == SITES else None
    elif calibrate_at_sites or accept == SITES:  # a simulation run: its virtual hospitals, in one engine start
        from echofleet.apps import SimulatedSites

        try:
            simulated = SimulatedSites(run_dir)
        except ValueError as e:
            raise fail(f"{'--calib sites' if calibrate_at_sites else '--accept sites'}: {e}", 2) from None
        if accept == SITES:
            from echocare.bundle import BundleError, load_private_key
            from cryptography.hazmat.primitives import serialization

            try:
                pub = load_private_key(key).public_key().public_bytes(serialization.Encoding.PEM,
                                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
            except BundleError as e:
                raise fail(str(e), 2) from None
            simulated.pin_release_key(pub)  # simulation only: the researcher holds every virtual hospital
    try:
        q = default_quantize_config(t, "int8" if precision == "auto" else precision)
        if q is not None:
            q = replace(q, ignore_ops=tuple(ignore_op), ignore_names=tuple(ignore_name), smooth_quant=smooth_quant, calib_size=calib_limit)
        cfg = BuildConfig(precision=precision, inference_precision=inference_precision, quantize=q,
                          bounds=_bounds(max_auroc_drop, max_dice_drop, max_mae_increase), calib_limit=calib_limit,
                          val_limit=val_limit, name=name, version=version, device_class=device_class, quorum=quorum)
    except (ValueError, re.error) as e:
        raise fail(str(e), 2) from None
    summary, code, error = None, 0, None
    try:
        with console.status("edge build") as status:
            def run(calibrate=None, accept_at_sites=None):
                return run_build(run_dir, t.name, calib, val, key, out, config=cfg, progress=lambda s: status.update(s),
                                 sites=calibrate if calibrate_at_sites else None,
                                 accept=accept_at_sites if accept == SITES else None)

            # a simulation's sites in one engine start; a real federation's, one `flwr run` per step; or a local build
            summary = simulated.session(run) if simulated is not None else run(sites, accept_at)
        if not summary.ok:
            code, error = 1, f"self-test failed: {summary.selftest[1] if summary.selftest else 'not run'}"
    except GateFailed as e:
        summary, code, error = getattr(e, "summary", None), 1, str(e)
    except CalibrationFailed as e:  # every site refused or failed: named in the message
        code, error = 1, str(e)
    except DeployError as e:  # --federation: a step's run failed or got no answer (federation and step named)
        code, error = 1, str(e)
    except AcceptanceRefused as e:  # names the site(s) and the metric; nothing in --out
        summary, code, error = e.summary, 1, str(e)
    except ExportError as e:
        code, error = (1 if "disagrees" in str(e) else 2), str(e)
    except (EvalDataError, BundleError, CompileError, QuantizeError, ValueError) as e:
        code, error = 2, str(e)
    if summary is not None:
        if as_json:
            _print_json(summary.to_dict())
        else:
            print_build(console, summary)
    if error:
        raise fail(error, code)


if __name__ == "__main__":  # python -m echofleet.cli.edge ...
    edge_app()
