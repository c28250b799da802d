"""One call for a whole edge build: export -> quantize -> gate -> compile -> bundle -> verify.

:func:`build` is what ``echofleet edge build`` and ``make demo`` call. Each step is its own
module (:mod:`edge.build.export`, :mod:`edge.build.quantize`, :mod:`edge.build.gate`, ``edge.compile_*``,
:mod:`echocare.bundle`); this one only wires them together and records what happened:

1. **export** the run's global model (or a task-model directory) to ONNX, parity-checked;
2. **quantize** it for the target (``openvino-cpu``: NNCF INT8 IR; ``onnxruntime-cpu``: QDQ U8S8;
   ``tensorrt``: QDQ S8S8 or FP16), calibrated on ``calib_spec``;
3. **gate**: FP32 vs the candidate on the labelled ``val_spec``; a drop beyond the bound raises
   :class:`~edge.build.gate.GateFailed` and nothing is bundled;
4. **compile** for the target (OpenVINO IR with an explicit inference precision; a basic-optimised
   ONNX for ONNX Runtime; the ONNX + ``tensorrt.json`` for a Jetson, whose engine is built on it);
5. **bundle**: manifest (task, labels, input and preprocessing spec, encoder sha256, model card
   with sites / rounds / epsilon per site / FP32 vs candidate metrics), self-test sample and
   expected outputs, Ed25519 signature;
6. **verify**: the tarball is checked with the public key, loaded by the torch-free runtime and
   its self-test run.

The intermediate files live in ``out/.work-<name>/`` (kept for inspection; safe to delete).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.device.backends import open_session
from echocare.bundle import load_private_key, verify_bundle, write_bundle
from edge.build.compiled import CompiledModel
from edge.build.evaluate import EvalSet, load_calibration, load_eval_set, metrics_from_outputs, predict_all
from edge.build.export import ExportConfig, export_task_model, resolve_model_dir, write_json_atomic
from edge.build.gate import GateBounds, GateFailed, GateResult, check_gate, enforce
from edge.build.quantize import QuantizeConfig, QuantizeResult, quantize

TARGETS = ("openvino-cpu", "onnxruntime-cpu", "tensorrt")
PRECISIONS = ("int8", "fp16", "fp32")
# Self-test tolerances per target: CPU backends reproduce the build machine closely; a Jetson's
# TensorRT engine (its own kernels, fp16 accumulation) less so.
SELFTEST_TOLERANCE = {
    "openvino-cpu": {"probability_atol": 0.05, "mask_min_agreement": 0.98, "mask_min_dice": 0.9},
    "onnxruntime-cpu": {"probability_atol": 0.05, "mask_min_agreement": 0.98, "mask_min_dice": 0.9},
    "tensorrt": {"probability_atol": 0.1, "mask_min_agreement": 0.95, "mask_min_dice": 0.85},
}


@dataclass
class BuildConfig:
    """Options of an edge build beyond the positional essentials (all recorded in the manifest)."""

    precision: str = "int8"
    inference_precision: str = "f32"  # openvino-cpu: f32 | bf16 | f16 (explicit, never OpenVINO's default)
    quantize: QuantizeConfig | None = None  # None: the target's default (see default_quantize_config)
    bounds: GateBounds = field(default_factory=GateBounds)
    calib_limit: int = 64
    val_limit: int | None = None
    name: str | None = None
    version: str | None = None
    device_class: str | None = None  # signed into the manifest; the scanner agent refuses other classes
    selftest_samples: int = 2
    batch_size: int = 8
    tensorrt_max_batch: int = 8
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")


@dataclass
class Step:
    name: str
    seconds: float
    detail: str


@dataclass
class BuildSummary:
    """What a build produced; ``steps`` make the summary table."""

    target: str
    precision: str
    tarball: Path | None
    bundle_dir: Path | None
    manifest: dict | None
    gate: GateResult | None
    fp32_metrics: dict
    candidate_metrics: dict
    selftest: tuple[bool, str] | None
    steps: list[Step] = field(default_factory=list)
    work_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.tarball is not None and (self.gate is None or self.gate.passed) and bool(self.selftest and self.selftest[0])


def default_quantize_config(target: str, precision: str) -> QuantizeConfig | None:
    """The quantization each target expects (None for fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return QuantizeConfig(method="fp16")
    if target == "openvino-cpu":
        return QuantizeConfig(method="nncf")
    if target == "onnxruntime-cpu":
        return QuantizeConfig(method="qdq", activations="asymmetric")  # U8S8: ORT's fast x86 path
    # S8S8 Q/DQ for TensorRT's explicit quantization. Percentile calibration: on BUSI with the tiny
    # config, min-max S8S8 lost ~1.9 AUROC points, percentile ~0.7 (symmetric activation ranges
    # are wasted on outliers).
    return QuantizeConfig(method="qdq", activations="symmetric", calibrate_method="percentile")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")[:100] or "model"


# ------------------------------------------------------------------------------ model card
def model_card(info: dict, report: dict | None) -> dict:
    """Model card: the task model's provenance plus, for a federation run, its ``report.json`` digest.

    From the report (``{..., "dp": {...}, "rounds": [{"round", "sites": {site: {"privacy": {...},
    "evaluate": {...}}}, "excluded", "aggregated": {"evaluate": {...}}}]}``): the sites, the number
    of rounds, each site's final privacy figures (epsilon, delta, noise multiplier, DP-SGD steps),
    excluded sites, the final aggregated evaluation metrics and the DP settings. Nothing else of
    the run (e.g. local data paths) is copied into a manifest that ships to scanners.
    """
    card: dict[str, Any] = {"provenance": dict(info.get("provenance") or {})}
    if not report:
        return card
    rounds = [r for r in report.get("rounds", []) if isinstance(r, dict)]
    sites = sorted({s for r in rounds for s in r.get("sites", {})})
    privacy: dict[str, dict] = {}
    for r in rounds:
        for site, entry in r.get("sites", {}).items():
            p = entry.get("privacy") or {}
            if p.get("epsilon") is not None:
                privacy[site] = {k: p[k] for k in ("epsilon", "delta", "noise_multiplier", "steps") if k in p}
    card.update({
        "sites": sites,
        "rounds": len(rounds),
        "privacy": privacy,
        "excluded_sites": sorted({s for r in rounds for s in r.get("excluded", [])}),
        "federated_metrics": rounds[-1].get("aggregated", {}).get("evaluate", {}) if rounds else {},
    })
    if isinstance(report.get("dp"), dict):
        card["dp"] = report["dp"]
    return card


# ----------------------------------------------------------------------------------- steps
def fp32_metrics_of(onnx_path: Path, ev: EvalSet, batch: int = 8) -> dict:
    """The gate's reference: the exported FP32 ONNX on ONNX Runtime, scored on ``ev``."""
    return metrics_from_outputs(predict_all(open_session(onnx_path, "onnxruntime").run, ev.inputs, batch), ev)


def gate_session(q: QuantizeResult, inference_precision: str):
    """Where a quantized candidate is evaluated: the backend it ships on (OpenVINO for IR; ONNX
    Runtime for Q/DQ and FP16 ONNX, which also stands in for TensorRT on a CPU machine)."""
    if q.format == "openvino-ir":
        return open_session(q.model_path, "openvino", inference_precision=inference_precision, graph_precision=q.precision)
    return open_session(q.model_path, "onnxruntime", graph_precision=q.precision)


def _compile(target: str, model_path: Path, precision: str, work: Path, cfg: BuildConfig, input_chw: tuple[int, int, int]) -> tuple[CompiledModel, dict[str, Path], list[dict]]:
    """Compile for ``target``; return (compiled, bundle artifacts, artifact descriptions)."""
    if target == "openvino-cpu":
        from edge.build.compile_openvino import compile_openvino

        c = compile_openvino(model_path, work / "openvino", inference_precision=cfg.inference_precision, graph_precision=precision)
        files = {"model/model.xml": c.files[0], "model/model.bin": c.files[1]}
        desc = [{"path": "model/model.xml", "role": "model", "format": "openvino-ir", "precision": precision,
                 "target": target, "inference_precision": c.inference_precision, "weights": "model/model.bin"},
                {"path": "model/model.bin", "role": "weights", "precision": precision, "target": target}]
        return c, files, desc
    if target == "onnxruntime-cpu":
        from edge.build.compile_onnxruntime import compile_onnxruntime

        c = compile_onnxruntime(model_path, work / "onnxruntime", graph_precision=precision)
        return c, {"model/model.onnx": c.model_path}, [{"path": "model/model.onnx", "role": "model", "format": "onnx",
                                                       "precision": precision, "target": target}]
    from edge.build.compile_tensorrt import TensorRTBuildConfig, write_build_config

    tcfg = TensorRTBuildConfig(precision=precision, input_chw=input_chw, max_batch=cfg.tensorrt_max_batch)
    (work / "tensorrt").mkdir(parents=True, exist_ok=True)
    cfg_path = write_build_config(tcfg, work / "tensorrt" / "tensorrt.json")
    c = CompiledModel(target, Path(model_path), [Path(model_path)], "onnx", precision, None,
                      {"engine": "built on the device: echofleet edge compile model/model.onnx --target tensorrt --config tensorrt.json",
                       "tensorrt": tcfg.to_dict()})
    files = {"model/model.onnx": Path(model_path), "tensorrt.json": cfg_path}
    desc = [{"path": "model/model.onnx", "role": "model", "format": "onnx", "precision": precision, "target": target},
            {"path": "tensorrt.json", "role": "build-config", "target": target}]
    return c, files, desc


def _selftest_expectations(files: dict[str, Path], desc: list[dict], x: np.ndarray, task: str, size: int,
                           work: Path) -> tuple[dict, dict[str, Path]]:
    """Expected self-test outputs of each model artifact, computed here with the backend the runtime would pick."""
    from edge.device import postprocess as post
    from edge.device.runtime import FORMAT_BACKENDS
    from edge.device.backends import backend_installed

    outputs, extra = {}, {}
    for d in desc:
        if d.get("role") != "model":
            continue
        backend = next(b for b in FORMAT_BACKENDS[d["format"]] if backend_installed(b))
        sess = open_session(files[d["path"]], backend, inference_precision=d.get("inference_precision") or "f32",
                            graph_precision=d["precision"])
        out = sess.run(x)
        if task == "classify":
            outputs[d["path"]] = {"probabilities": post.softmax(out).tolist(), "backend": backend}
        else:
            masks = post.foreground(post.masks_from_logits(out, size))
            name = f"selftest/expected-{_slug(Path(d['path']).stem)}.npy"
            p = work / "selftest" / Path(name).name
            np.save(p, masks)
            extra[name] = p
            outputs[d["path"]] = {"masks": name, "foreground_fraction": [float(m.mean()) for m in masks], "backend": backend}
    return outputs, extra


def assemble_bundle(out: Path, key: str | Path, *, info: dict, target: str, precision: str, files: dict[str, Path],
                    desc: list[dict], selftest_inputs: np.ndarray, name: str, version: str, work: Path,
                    device_class: str | None = None, extra: dict | None = None) -> Path:
    """Write the signed bundle: manifest from the export info, self-test sample + expected outputs, artifacts.

    ``extra`` may carry ``quantization``, ``source``, ``tensorrt`` and ``model_card_validation``
    (FP32 vs candidate metrics and the gate result). Returns the tarball path.
    """
    extra = dict(extra or {})
    task, size = info["task"], int(info["input"]["shape"][-1])
    (work / "selftest").mkdir(parents=True, exist_ok=True)
    np.save(work / "selftest" / "input.npy", np.asarray(selftest_inputs, np.float32))
    expected, expected_files = _selftest_expectations(files, desc, selftest_inputs, task, size, work)
    files = {**files, "selftest/input.npy": work / "selftest" / "input.npy", **expected_files}
    desc = desc + [{"path": "selftest/input.npy", "role": "selftest"}] + [{"path": p, "role": "selftest"} for p in expected_files]
    card = model_card(info, info.get("run_report"))
    if "model_card_validation" in extra:
        card["validation"] = extra.pop("model_card_validation")
    manifest = {
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "labels": list(info["labels"]),
        "target": target,
        "precision": precision,
        "input": info["input"],
        "output": info["output"],
        "preprocess": info["preprocess"],
        "encoder": info["encoder"],
        "head": info.get("head"),
        "flops_per_image": info.get("flops_per_image"),
        "export": {"opset": info.get("opset"), "parity": info.get("parity")},
        "source": {"model_dir": info.get("source")},  # for `edge bench`'s PyTorch baseline on the build machine
        "model_card": card,
        "selftest": {"input": "selftest/input.npy", "outputs": expected, "tolerance": SELFTEST_TOLERANCE[target]},
        "artifacts": desc,
        **extra,
    }
    if device_class:
        manifest["device_class"] = device_class
    return write_bundle(out, manifest, files, key)


# ------------------------------------------------------------------------------------ build
def build(run_dir: str | Path, target: str, calib_spec: str | None, val_spec: str, key: str | Path, out: str | Path, *,
          config: BuildConfig | None = None, progress: Callable[[str], None] | None = None) -> BuildSummary:
    """Build, gate, sign and verify an edge bundle for ``target`` from a run directory or task-model directory.

    Returns a :class:`BuildSummary`; raises :class:`~edge.build.gate.GateFailed` (nothing bundled) when
    the candidate loses more than the bound, :class:`~edge.build.export.ExportError` on a failed
    parity check, and :class:`~echocare.bundle.BundleError` for key or bundle problems.
    """
    cfg = config or BuildConfig()
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if cfg.precision == "int8" and not calib_spec:
        raise ValueError("an INT8 build needs a calibration set (--calib DATA_SPEC)")
    say = progress or (lambda _msg: None)
    load_private_key(key)  # fail on a bad key before minutes of work
    out = Path(out)
    model_dir = resolve_model_dir(run_dir)
    steps: list[Step] = []

    def step(name: str, t0: float, detail: str) -> None:
        steps.append(Step(name, time.perf_counter() - t0, detail))

    # 1. data + export ------------------------------------------------------------------
    from echocare.models.task_model import read_task_model_spec

    spec = read_task_model_spec(model_dir)
    pre = spec.preprocess_spec()
    name = _slug(cfg.name or f"{spec.task}-{spec.encoder_config}-{target}")
    version = _slug(cfg.version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S"))
    work = out / f".work-{name}"
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    say("loading validation data")
    ev = load_eval_set(val_spec, spec.task, list(spec.labels), pre, limit=cfg.val_limit)
    calib = None
    if cfg.precision == "int8":
        calib = load_calibration(calib_spec, pre, limit=cfg.calib_limit)
    step("data", t0, f"val {len(ev)} samples ({len(ev.problems)} skipped)" + (f", calib {len(calib)}" if calib is not None else ""))

    t0 = time.perf_counter()
    say("export: ONNX + parity")
    exp = export_task_model(run_dir, work / "export", samples=ev.inputs[:4], config=cfg.export)
    step("export", t0, exp.parity.describe())

    # 2. quantize -------------------------------------------------------------------------
    qcfg = cfg.quantize if cfg.quantize is not None else default_quantize_config(target, cfg.precision)
    if qcfg is not None and qcfg.precision != cfg.precision:
        raise ValueError(f"quantize method {qcfg.method} makes {qcfg.precision}, but the build asks for {cfg.precision}")
    t0 = time.perf_counter()
    say("evaluating FP32")
    fp32_metrics = fp32_metrics_of(exp.onnx_path, ev, cfg.batch_size)
    candidate_path, q = exp.onnx_path, None
    if qcfg is not None:
        say(f"quantize: {qcfg.method} {qcfg.precision}")
        t1 = time.perf_counter()
        q = quantize(exp.onnx_path, calib, work / "quantized", qcfg)
        candidate_path = q.model_path
        step("quantize", t1, f"{qcfg.method} -> {q.model_path.name} ({q.precision})")

    # 3. gate ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say("gate: evaluating the candidate")
    if q is not None:
        sess = gate_session(q, cfg.inference_precision)
    elif target == "openvino-cpu":
        sess = open_session(exp.onnx_path, "openvino", inference_precision=cfg.inference_precision)
    else:
        sess = open_session(exp.onnx_path, "onnxruntime")
    cand_metrics = metrics_from_outputs(predict_all(sess.run, ev.inputs, cfg.batch_size), ev)
    gate = check_gate(spec.task, fp32_metrics, cand_metrics, cfg.bounds, candidate_name=f"{cfg.precision} ({sess.info.backend})")
    step("gate", t0, gate.reason)
    summary = BuildSummary(target, cfg.precision, None, None, None, gate, fp32_metrics, cand_metrics, None, steps, work)
    try:
        enforce(gate)  # nothing is bundled past a failed gate
    except GateFailed as e:
        e.summary = summary  # the CLI prints the steps so far
        raise

    # 4. compile ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"compile: {target}")
    compiled, files, desc = _compile(target, candidate_path, cfg.precision, work, cfg, (3, pre.size, pre.size))
    step("compile", t0, f"{compiled.format} {compiled.precision}" + (f", inference {compiled.inference_precision}" if compiled.inference_precision else ""))

    # 5. bundle ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say("bundle: manifest, self-test, signature")
    extra = {
        "quantization": q.config if q is not None else None,
        "model_card_validation": {"data": _public_spec(val_spec), "samples": len(ev), "fp32": fp32_metrics,
                                  cfg.precision: cand_metrics, "gate": gate.to_dict(), "gate_backend": sess.info.backend},
        "source": {"model_dir": str(model_dir.resolve()), "run_dir": str(Path(run_dir).resolve())},
    }
    if target == "tensorrt":
        extra["tensorrt"] = compiled.details["tensorrt"]
    tarball = assemble_bundle(out, key, info=exp.info, target=target, precision=cfg.precision, files=files, desc=desc,
                              selftest_inputs=ev.inputs[: max(1, cfg.selftest_samples)], name=name, version=version,
                              work=work, device_class=cfg.device_class, extra=extra)
    step("bundle", t0, f"{tarball.name} ({tarball.stat().st_size / 1e6:.1f} MB)")

    # 6. verify ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say("verify: signature, hashes, self-test")
    from cryptography.hazmat.primitives import serialization

    from edge.device.runtime import load_bundle

    public_pem = load_private_key(key).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed = verify_bundle(tarball, public_pem)
    with load_bundle(tarball, public_key=public_pem) as rt:
        selftest = rt.self_test()
        backend = rt.backend
    step("verify", t0, f"signature + {len(signed['artifacts'])} hashes ok; {selftest[1]}")
    write_json_atomic(work / "build-summary.json", {"steps": [s.__dict__ for s in steps], "gate": gate.to_dict(),
                                                     "fp32": fp32_metrics, "candidate": cand_metrics, "backend": backend})
    return replace(summary, tarball=tarball, bundle_dir=out / f"{name}-{version}", manifest=signed, selftest=selftest)


def _public_spec(spec: str) -> str:
    """The data kind only (a hospital's local paths do not go into a shipped manifest)."""
    return spec.split(":", 1)[0] if ":" in spec else spec
