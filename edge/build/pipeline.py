"""One call for a whole edge build: export -> quantize -> gate -> compile -> bundle -> verify.

:func:`build` is what ``echofleet edge build`` and ``make demo`` call. Each step is its own
module (:mod:`edge.build.export`, :mod:`edge.build.quantize`, :mod:`edge.build.gate`,
``edge.build.compile_*``, :mod:`edge.build.bundling`); what differs per target comes from one
row of :data:`edge.targets.TARGETS`. This module only wires the steps together and records what
happened:

1. **export** the run's global model (or a task-model directory) to ONNX, parity-checked;
2. **quantize** it as the target's row says (``openvino-cpu``: NNCF INT8 IR; ``onnxruntime-cpu``:
   QDQ U8S8; ``tensorrt``: QDQ S8S8 or FP16), calibrated on ``calib_spec``, or, with
   ``calib_spec="sites"``, on the sites' noisy activation histograms (:mod:`edge.federated`: no
   image on the build machine; the ranges go into ONNX Runtime's quantizer, so every target gets
   a QDQ ONNX, which OpenVINO compiles too);
3. **gate** (:func:`run_gate`): FP32 vs the candidate on the labelled ``val_spec``; a drop beyond
   the bound raises :class:`~edge.build.gate.GateFailed` and nothing is bundled;
4. **compile** with the row's compile module (OpenVINO IR with an explicit inference precision; a
   basic-optimised ONNX for ONNX Runtime; the ONNX + ``tensorrt.json`` for a Jetson, whose engine
   is built on it);
5. **bundle** (:func:`edge.build.bundling.assemble_bundle`): manifest (task, labels, input and preprocessing spec, encoder sha256, model card
   with sites / rounds / epsilon per site / FP32 vs candidate metrics), self-test sample and
   expected outputs, Ed25519 signature;
6. **verify**: the tarball is checked with the public key, loaded by the torch-free runtime and
   its self-test run.

``precision="auto"`` (targets with ``auto_candidates``: ``openvino-cpu``): step 2 also makes the
target's INT8 variants (:func:`quantize_auto_files`: NNCF's PERFORMANCE preset beside MIXED), and
steps 3-4 become :func:`build_candidates`: the INT8 IRs and the FP32 IR are compiled, every
candidate (each INT8 IR with f32 or bf16 for the rest, bf16, fp32) is gated on ``val_spec`` on its
own inference precision and timed
here; those that pass ship together (format ``echofleet-bundle/2``, all files signed) and the
scanner runs the fastest on its own CPU (:mod:`edge.device.runtime`). One that fails the gate,
or that this machine cannot run at its precision (so cannot be gated), is left out and the
manifest's ``candidates_left_out`` says why. Auto needs the central gate (``--val``): the sites'
acceptance gates one model per charged release, and a release per candidate would spend each
site's privacy budget once per candidate (docs/edge.md).

The intermediate files live in ``out/.work-<name>/`` (kept for inspection; safe to delete).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from echocare.bundle import load_private_key, sha256_file, verify_bundle
from edge.build.bundling import assemble_bundle, bundle_identity
from edge.build.compiled import CompileOptions, compile_model
from edge.build.evaluate import EvalSet, load_calibration, load_eval_set, metrics_from_outputs, predict_all
from edge.build.export import ExportConfig, export_task_model, resolve_model_dir, write_json_atomic
from edge.build.gate import GateBounds, GateFailed, GateResult, check_gate, enforce
from edge.build.quantize import QuantizeConfig, prepare_for_qdq, quantize
from edge.device.backends import open_session
from edge.federated.coordinator import (DEFAULT_BINS, DEFAULT_CLIP, DEFAULT_MARGIN, PUBLIC_IMAGES, SiteCalibration,
                                        calibration_record, derive_ranges, make_plan, merge)
from edge.targets import AUTO, FORMAT_BACKENDS, PRECISIONS, TARGETS, EdgeTarget, get_target

#: ``calib_spec`` value of a federated calibration (the sites' histograms instead of local images)
SITES = "sites"


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
    # federated calibration (calib_spec "sites"): public images for the bin edges, their margin,
    # bins per point, and the L2 bound of one image's contribution at a site (edge/federated/)
    public_images: str = PUBLIC_IMAGES
    public_limit: int = 24
    calib_bins: int = DEFAULT_BINS
    calib_margin: float = DEFAULT_MARGIN
    calib_clip: float = DEFAULT_CLIP
    # federated acceptance (accept_at_sites): how many sites must pass; None = every participating site
    quorum: int | None = None
    # precision "auto": seconds each candidate is timed here at batch 1 (recorded, informative only)
    candidate_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS + (AUTO,):
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS + (AUTO,)}")

    @property
    def graph_precision(self) -> str:
        """The precision the quantize step makes (auto: INT8, beside the exported FP32 graph)."""
        return "int8" if self.precision == AUTO else self.precision


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
    candidates: list[dict] = field(default_factory=list)  # precision auto: shipped candidates (manifest entries)
    left_out: list[dict] = field(default_factory=list)  # precision auto: {"name", "reason"} of those not shipped

    @property
    def ok(self) -> bool:
        return self.tarball is not None and (self.gate is None or self.gate.passed) and bool(self.selftest and self.selftest[0])

    def to_dict(self) -> dict:
        """The summary as JSON-ready data (``echofleet edge build --json``)."""
        return {"target": self.target, "precision": self.precision, "ok": self.ok, "tarball": self.tarball,
                "bundle_dir": self.bundle_dir, "gate": self.gate.to_dict() if self.gate else None,
                "fp32_metrics": self.fp32_metrics, "candidate_metrics": self.candidate_metrics,
                "selftest": list(self.selftest) if self.selftest else None,
                **({"candidates": self.candidates, "candidates_left_out": self.left_out} if self.precision == AUTO else {}),
                "steps": [{"name": st.name, "seconds": round(st.seconds, 2), "detail": st.detail} for st in self.steps]}


def default_quantize_config(target: str | EdgeTarget, precision: str) -> QuantizeConfig | None:
    """The quantization the target's row asks for at ``precision`` (None: the FP32 graph ships)."""
    t = get_target(target) if isinstance(target, str) else target
    kw = t.quantize_kwargs(precision)
    return None if kw is None else QuantizeConfig(**kw)


def federated_quantize_config(q: QuantizeConfig) -> QuantizeConfig:
    """The quantization of a federated calibration: ONNX Runtime QDQ from the merged ranges.

    NNCF (``openvino-cpu``) calibrates on images inside its own pipeline, which the federated path
    does not have; the target instead gets a QDQ ONNX with asymmetric (U8) activations, as NNCF's
    mixed preset uses, which OpenVINO reads and compiles into its INT8 IR. Entropy calibration
    needs ONNX Runtime's own collector and is refused here (minmax or percentile)."""
    if q.method == "fp16":
        return q
    if q.calibrate_method not in ("minmax", "percentile"):
        raise ValueError(f"federated calibration derives minmax or percentile ranges, not {q.calibrate_method}")
    if q.method == "nncf":
        return replace(q, method="qdq", activations="asymmetric", calibrate_method="minmax")
    return q


# ------------------------------------------------------------------------------------- gate
@dataclass
class GateRun:
    """The accuracy gate as run: its verdict, both sets of metrics, where the candidate ran."""

    result: GateResult
    fp32_metrics: dict
    candidate_metrics: dict
    backend: str
    samples: int

    def record(self, model: Path) -> dict:
        """``gate.json`` (``edge quantize``), which ``edge bundle --gate`` puts into the model card."""
        return {**self.result.to_dict(), "fp32_metrics": self.fp32_metrics, "candidate_metrics": self.candidate_metrics,
                "validation_samples": self.samples, "model": str(model)}


def fp32_metrics_of(onnx_path: Path, ev: EvalSet, batch: int = 8) -> dict:
    """The gate's reference: the exported FP32 ONNX on ONNX Runtime, scored on ``ev``."""
    return metrics_from_outputs(predict_all(open_session(onnx_path, "onnxruntime").run, ev.inputs, batch), ev)


def gate_session(model_path: Path, artifact_format: str, graph_precision: str, inference_precision: str = "f32"):
    """Where a candidate is evaluated: the first backend that runs its format on a device (OpenVINO
    for IR; ONNX Runtime for ONNX, which also stands in for TensorRT on a CPU machine)."""
    backend = FORMAT_BACKENDS[artifact_format][0]
    return open_session(model_path, backend, inference_precision=inference_precision, graph_precision=graph_precision)


def run_gate(task: str, fp32_onnx: Path, candidate: Path, artifact_format: str, precision: str, ev: EvalSet,
             bounds: GateBounds, *, inference_precision: str = "f32", batch: int = 8, fp32: dict | None = None,
             session=None, candidate_name: str | None = None) -> GateRun:
    """FP32 (ONNX Runtime) vs the candidate (on its backend) on the labelled set ``ev``; nothing raised.
    ``fp32``: the reference metrics when already computed; ``session``: the candidate already opened."""
    fp32 = fp32 if fp32 is not None else fp32_metrics_of(fp32_onnx, ev, batch)
    sess = session or gate_session(candidate, artifact_format, precision, inference_precision)
    cand = metrics_from_outputs(predict_all(sess.run, ev.inputs, batch), ev)
    result = check_gate(task, fp32, cand, bounds, candidate_name=candidate_name or f"{precision} ({sess.info.backend})")
    return GateRun(result, fp32, cand, sess.info.backend, len(ev))


# ------------------------------------------------------------------ precision auto: candidates
@dataclass
class CandidateBuild:
    """What :func:`build_candidates` made: the compiled files, the candidates that passed (manifest
    entries), those left out with the reason, and the worst gate among the shipped ones."""

    compiled: dict  # file (EdgeTarget.auto_files) -> CompiledModel
    shipped: list[dict]
    left_out: list[dict]
    fp32_metrics: dict
    worst: GateRun | None


def build_candidates(t: EdgeTarget, task: str, files: dict[str, Path], fp32_onnx: Path, ev: EvalSet, bounds: GateBounds,
                     work: Path, *, input_chw: tuple[int, int, int], batch: int = 8, seconds: float = 1.0,
                     not_built: Mapping[str, str] | None = None, say: Callable[[str], None] = lambda _m: None) -> CandidateBuild:
    """Compile each file of ``files`` (a name of ``t.auto_files`` -> model), then gate and time every
    candidate of ``t.auto_candidates`` on the compiled file at its own inference precision.

    A candidate ships when it passes the gate; it is left out (with the reason) when it fails it,
    when this machine runs another inference precision than it names (it could not be gated), or
    when its file was not built (``not_built``: file -> why)."""
    from edge.device.runtime import cpu_name, time_p50_ms

    compiled = {f: compile_model(t, path, work / f"{t.name}-{f}", CompileOptions(
        graph_precision=t.file_precision(f), inference_precision="f32", input_chw=input_chw)) for f, path in files.items()}
    fp32 = fp32_metrics_of(fp32_onnx, ev, batch)
    x1 = np.ascontiguousarray(ev.inputs[:1], np.float32)
    shipped, left_out, worst, used = [], [], None, set()
    for name, f, ip in t.auto_candidates:
        gp = t.file_precision(f)
        if f not in compiled:
            left_out.append({"name": name, "precision": gp, "inference_precision": ip,
                             "reason": (not_built or {}).get(f, f"file {f} was not built")})
            continue
        c = compiled[f]
        say(f"gate: candidate {name} ({gp} graph, {ip} inference)")
        sess = gate_session(c.model_path, c.format, gp, ip)
        effective = sess.info.details.get("inference_precision", ip)
        if effective != ip:
            left_out.append({"name": name, "precision": gp, "inference_precision": ip,
                             "reason": f"this build machine runs {effective} when asked for {ip}: not gated, not shipped"})
            continue
        g = run_gate(task, fp32_onnx, c.model_path, c.format, gp, ev, bounds, inference_precision=ip, batch=batch,
                     fp32=fp32, session=sess, candidate_name=name)
        if not g.result.passed:
            left_out.append({"name": name, "precision": gp, "inference_precision": ip, "reason": g.result.reason,
                             "gate": g.result.to_dict(), "metrics": g.candidate_metrics})
            continue
        say(f"time: candidate {name}")
        p50 = time_p50_ms(sess.run, x1, duration=seconds)
        path = f"model/{f}/model{t.suffix}"  # candidate_artifacts' layout
        used.add(f)
        shipped.append({"name": name, "path": path, "precision": gp, "inference_precision": ip,
                        "gate": g.result.to_dict(), "metrics": g.candidate_metrics, "build_p50_ms": round(p50, 3),
                        "build_cpu": cpu_name()})
        if worst is None or g.result.drop > worst.result.drop:
            worst = g
    return CandidateBuild({f: compiled[f] for f in compiled if f in used} if shipped else compiled,
                          shipped, left_out, fp32, worst)


def quantize_auto_files(t: EdgeTarget, exported: Path, quantized: Path, qcfg: QuantizeConfig, calib, work: Path, *,
                        federated: bool, say: Callable[[str], None] = lambda _m: None
                        ) -> tuple[dict[str, Path], dict[str, str], dict[str, dict]]:
    """The files of ``t.auto_files`` for a ``--precision auto`` build: the exported FP32 graph, the INT8
    model already ``quantized`` with ``qcfg``, and each variant (``qcfg`` with the file's overrides,
    e.g. NNCF's PERFORMANCE preset) quantized here from the same calibration images.

    Returns (file -> model path, file -> why it was not built, file -> its quantization config). A
    variant is not built from the sites' ranges (``federated``: the presets are NNCF's, and the
    sites answered one calibration plan), nor for another method than NNCF (the overrides are NNCF's),
    nor when it equals ``qcfg``."""
    files, not_built, configs = {}, {}, {}
    for f, (gp, over) in t.auto_files.items():
        variant = None if over is None else replace(qcfg, **over)
        if variant is None:
            files[f] = exported
        elif not over:
            files[f], configs[f] = quantized, qcfg.to_dict()
        elif federated:
            not_built[f] = (f"{dict(over)} is an NNCF setting for calibration on images here; a federated build "
                            "quantizes once, from the sites' ranges")
        elif qcfg.method != "nncf":
            not_built[f] = f"{dict(over)} is an NNCF setting; this build quantizes with {qcfg.method}"
        elif variant == qcfg:
            not_built[f] = f"{dict(over)} is what the INT8 file already has"
        else:
            say(f"quantize: {variant.method} {gp} {f} ({', '.join(f'{k}={v}' for k, v in over.items())})")
            q = quantize(exported, calib, work / f"quantized-{f}", variant)
            files[f], configs[f] = q.model_path, q.config
    return files, not_built, configs


# ------------------------------------------------------------------------------------ build
class AcceptanceRefused(Exception):
    """The sites' federated acceptance refused the candidate (the message names the site(s) and the
    metric); nothing is written to the output folder. ``record``: the acceptance record."""

    def __init__(self, message: str, record=None, summary: "BuildSummary | None" = None):
        super().__init__(message)
        self.record, self.summary = record, summary


#: A way to reach the sites for acceptance: (candidate tarball, request) -> their replies
#: (``echofleet.apps.SimulatedSites.accept``, or a deployment's).
SiteAcceptanceCall = Callable[[Path, "object"], list]


def build(run_dir: str | Path, target: str, calib_spec: str | None, val_spec: str | None, key: str | Path, out: str | Path, *,
          config: BuildConfig | None = None, progress: Callable[[str], None] | None = None,
          sites: SiteCalibration | None = None, accept: SiteAcceptanceCall | None = None) -> BuildSummary:
    """Build, gate, sign and verify an edge bundle for ``target`` from a run directory or task-model directory.

    ``calib_spec="sites"``: INT8 calibration at the sites (``sites`` sends them the plan and returns
    their answers; :mod:`edge.federated`); no calibration image is read here. ``accept``: federated
    acceptance (:mod:`edge.federated.accept`): the signed candidate and a signed FP32 reference go to
    the sites, each gates it on its own validation split; the build is signed again with their
    acceptance record, or refused (:class:`AcceptanceRefused`). ``val_spec`` None (only with
    ``accept``): no central gate; the self-test sample and the export's parity inputs are public phantoms.

    Returns a :class:`BuildSummary`; raises :class:`~edge.build.gate.GateFailed` (nothing bundled) when
    the candidate loses more than the bound, :class:`~edge.build.export.ExportError` on a failed
    parity check, and :class:`~echocare.bundle.BundleError` for key or bundle problems.
    """
    cfg = config or BuildConfig()
    t = get_target(target)  # UnknownTarget (a ValueError) names the known ones
    auto, graph = cfg.precision == AUTO, cfg.graph_precision
    if auto and not t.auto_candidates:
        raise ValueError(f"precision auto: target {t.name} has no precision candidates (targets with them: "
                         f"{', '.join(n for n, r in TARGETS.items() if r.auto_candidates)})")
    if auto and (accept is not None or not val_spec):
        raise ValueError("precision auto gates every candidate centrally: it needs --val DATA_SPEC and no --accept sites "
                         "(a federated acceptance per candidate would charge every site's privacy budget once per candidate; "
                         "build one precision for --accept sites)")
    if auto and cfg.inference_precision != "f32":
        raise ValueError(f"precision auto: each candidate has its own inference precision "
                         f"({', '.join(f'{n}: {ip}' for n, _, ip in t.auto_candidates)}); drop --inference-precision {cfg.inference_precision}")
    qcfg = cfg.quantize if cfg.quantize is not None else default_quantize_config(t, graph)
    if qcfg is not None and qcfg.precision != graph:
        raise ValueError(f"quantize method {qcfg.method} makes {qcfg.precision}, but the build asks for {cfg.precision}")
    if t.inference_precisions and cfg.inference_precision not in t.inference_precisions:
        raise ValueError(f"inference precision {cfg.inference_precision!r} for {t.name}: choose one of {', '.join(t.inference_precisions)}")
    if graph == "int8" and not calib_spec:
        raise ValueError(f"an {'auto (INT8 candidates)' if auto else 'INT8'} build needs a calibration set (--calib DATA_SPEC)")
    if not val_spec and accept is None:
        raise ValueError("the accuracy gate needs labelled images (--val DATA_SPEC) or the sites (--accept sites)")
    federated = calib_spec == SITES and qcfg is not None and qcfg.precision == "int8"
    if federated:
        if sites is None:
            raise ValueError("--calib sites needs a federation to ask (a run directory with its sites)")
        qcfg = federated_quantize_config(qcfg)
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
    name, version = bundle_identity(spec.task, spec.encoder_config, t.name, cfg.name, cfg.version)
    work = out / f".work-{name}"
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    say("loading validation data")
    ev = load_eval_set(val_spec, spec.task, list(spec.labels), pre, limit=cfg.val_limit) if val_spec else None
    public = load_calibration(cfg.public_images, pre, limit=cfg.public_limit) if (federated or ev is None) else None
    calib = None
    if federated:  # public images only: the bin edges of the sites' histograms
        calib = public
    elif graph == "int8":
        calib = load_calibration(calib_spec, pre, limit=cfg.calib_limit)
    samples = ev.inputs if ev is not None else public  # parity inputs and the bundle's self-test sample
    step("data", t0, (f"val {len(ev)} samples ({len(ev.problems)} skipped)" if ev is not None else "no central val (the sites gate)")
         + (f", {'public edges' if federated else 'calib'} {len(calib)}" if calib is not None else ""))

    t0 = time.perf_counter()
    say("export: ONNX + parity")
    exp = export_task_model(run_dir, work / "export", samples=samples[:4], config=cfg.export)
    step("export", t0, exp.parity.describe())

    # 2. quantize -------------------------------------------------------------------------
    candidate_path, candidate_format, q, calibration = exp.onnx_path, t.artifact_format, None, None
    if federated:
        say("calibrate at the sites: noisy activation statistics")
        t1 = time.perf_counter()
        qdir = work / "quantized"
        qdir.mkdir(parents=True, exist_ok=True)
        prepared = prepare_for_qdq(exp.onnx_path, qdir / "prepared.onnx")
        plan = make_plan(prepared, qcfg.op_types, calib, bins=cfg.calib_bins, margin=cfg.calib_margin, clip=cfg.calib_clip)
        merged = merge(sites(plan), plan)
        ranges = derive_ranges(merged, plan, qcfg.calibrate_method, symmetric=qcfg.activations == "symmetric")
        calibration = calibration_record(plan, merged, ranges, public=_public_spec(cfg.public_images), margin=cfg.calib_margin)
        write_json_atomic(work / "calibration.json", {**calibration, "ranges": ranges.ranges})
        step("calibrate", t1, f"{len(merged.sites)} of {len(merged.answers)} sites, {plan.describe}, "
             f"noise std of the sum {merged.noise_std:.3g}" + (f"; {'; '.join(ranges.notes)}" if ranges.notes else ""))
        say(f"quantize: {qcfg.method} {qcfg.precision} from the sites' ranges")
        t1 = time.perf_counter()
        q = quantize(prepared, None, qdir, qcfg, ranges=ranges.ranges, prepared=True)
        candidate_path, candidate_format = q.model_path, q.format
        step("quantize", t1, f"{qcfg.method} ({ranges.method} of the merged histograms) -> {q.model_path.name} ({q.precision})")
    elif qcfg is not None:
        say(f"quantize: {qcfg.method} {qcfg.precision}")
        t1 = time.perf_counter()
        q = quantize(exp.onnx_path, calib, work / "quantized", qcfg)
        candidate_path, candidate_format = q.model_path, q.format
        step("quantize", t1, f"{qcfg.method} -> {q.model_path.name} ({q.precision})")

    # 3. gate (central, on --val) ---------------------------------------------------------------
    g, gate, fp32_metrics, cand_metrics = None, None, {}, {}
    cands: CandidateBuild | None = None
    if auto:  # 3 + 4 per candidate: compile, gate, time
        t0 = time.perf_counter()
        files, not_built, auto_quantization = quantize_auto_files(t, exp.onnx_path, candidate_path, qcfg, calib, work,
                                                                  federated=federated, say=say)
        if len(auto_quantization) > 1:
            step("quantize", t0, "auto files: " + ", ".join(f"{f} (preset {c.get('preset')})" for f, c in auto_quantization.items()))
            t0 = time.perf_counter()
        cands = build_candidates(t, spec.task, files, exp.onnx_path, ev, cfg.bounds, work, input_chw=(3, pre.size, pre.size),
                                 batch=cfg.batch_size, seconds=cfg.candidate_seconds, not_built=not_built, say=say)
        g, fp32_metrics = cands.worst, cands.fp32_metrics
        step("gate", t0, f"{len(cands.shipped)} of {len(t.auto_candidates)} candidates pass: "
             + ", ".join(f"{c['name']} {c['build_p50_ms']:.1f} ms" for c in cands.shipped)
             + "".join(f"; {c['name']} left out ({c['reason']})" for c in cands.left_out))
        if g is None:
            failed = [c["gate"] for c in cands.left_out if c.get("gate")]
            first = GateResult(**failed[0]) if failed else check_gate(spec.task, fp32_metrics, {}, cfg.bounds, candidate_name="no candidate")
            result = replace(first, passed=False, reason="no precision candidate passed the gate: "
                             + "; ".join(f"{c['name']}: {c['reason']}" for c in cands.left_out))
            summary = BuildSummary(t.name, cfg.precision, None, None, None, result, fp32_metrics, {}, None, steps, work,
                                   left_out=cands.left_out)
            err = GateFailed(result)
            err.summary = summary
            raise err
        gate, cand_metrics = g.result, g.candidate_metrics
    elif ev is not None:
        t0 = time.perf_counter()
        say("gate: evaluating FP32 and the candidate")
        g = run_gate(spec.task, exp.onnx_path, candidate_path, candidate_format, cfg.precision, ev, cfg.bounds,
                     inference_precision=cfg.inference_precision, batch=cfg.batch_size)
        gate, fp32_metrics, cand_metrics = g.result, g.fp32_metrics, g.candidate_metrics
        step("gate", t0, gate.reason)
    summary = BuildSummary(t.name, cfg.precision, None, None, None, gate, fp32_metrics, cand_metrics, None, steps, work,
                           candidates=cands.shipped if cands else [], left_out=cands.left_out if cands else [])
    if gate is not None and not auto:
        try:
            enforce(gate)  # nothing is bundled past a failed gate
        except GateFailed as e:
            e.summary = summary  # the CLI prints the steps so far
            raise

    # 4. compile ------------------------------------------------------------------------------
    if cands is not None:
        compiled = cands.compiled  # compiled per file (EdgeTarget.auto_files) in build_candidates
    else:
        t0 = time.perf_counter()
        say(f"compile: {t.name}")
        compiled = compile_model(t, candidate_path, work / t.name, CompileOptions(
            graph_precision=cfg.precision, inference_precision=cfg.inference_precision,
            input_chw=(3, pre.size, pre.size), max_batch=cfg.tensorrt_max_batch))
        step("compile", t0, f"{compiled.format} {compiled.precision}" + (f", inference {compiled.inference_precision}" if compiled.inference_precision else ""))

    # 5. bundle ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say("bundle: manifest, self-test, signature")
    extra = {
        "quantization": q.config if q is not None else None,
        "calibration": calibration or ({"method": "local", "data": _public_spec(calib_spec)} if calib is not None else None),
        "source": {"model_dir": str(model_dir.resolve()), "run_dir": str(Path(run_dir).resolve())},
    }
    if cands is not None:
        # the acceptance record is the worst shipped candidate's gate: every candidate the scanner may run passed it
        # "fp32": the ONNX Runtime reference; each shipped candidate's metrics under its name (one is named fp32 too)
        extra["model_card_validation"] = {"data": _public_spec(val_spec), "samples": len(ev), "fp32": fp32_metrics,
                                          "candidates": {c["name"]: c["metrics"] for c in cands.shipped},
                                          "gate": {**gate.to_dict(), "reason": f"{gate.reason} (the largest drop of the "
                                                   f"{len(cands.shipped)} shipped candidates)"}, "gate_backend": g.backend}
        extra["candidates_left_out"] = cands.left_out
        # how each shipped INT8 file was quantized; "quantization" (what release_chain and `edge explain`
        # show) is the first of them in the target's order, None when only the FP32 file ships
        extra["quantization_files"] = {f: c for f, c in auto_quantization.items() if f in cands.compiled}
        extra["quantization"] = next(iter(extra["quantization_files"].values()), None)
    elif ev is not None:
        extra["model_card_validation"] = {"data": _public_spec(val_spec), "samples": len(ev), "fp32": fp32_metrics,
                                          cfg.precision: cand_metrics, "gate": gate.to_dict(), "gate_backend": g.backend}
    selftest_inputs = samples[: max(1, cfg.selftest_samples)]

    def bundle_into(folder: Path, more: dict) -> Path:
        return assemble_bundle(folder, key, info=exp.info, compiled=compiled, selftest_inputs=selftest_inputs, name=name,
                               version=version, work=work, device_class=cfg.device_class, extra={**extra, **more},
                               candidates=cands.shipped if cands else None)

    # with federated acceptance the signed candidate waits in the work folder until the sites accept it
    tarball = bundle_into(work / "candidate" if accept is not None else out, {})
    step("bundle", t0, f"{tarball.name} ({tarball.stat().st_size / 1e6:.1f} MB)" + (" (candidate)" if accept is not None else ""))
    signed, selftest, backend = _verify(tarball, key, say, step)

    # 7. federated acceptance -----------------------------------------------------------------------
    if accept is not None:
        from edge.federated.accept import AcceptanceRequest, decide_acceptance, reference_bundle

        t0 = time.perf_counter()
        say("accept at the sites: the signed candidate and its FP32 reference on each site's validation split")
        reference = reference_bundle(exp.onnx_path, exp.info, key, work / "reference", name=f"{name}-fp32-reference",
                                     version=version, selftest_inputs=selftest_inputs)
        run = (exp.info.get("run_report") or {}).get("config") or {}
        request = AcceptanceRequest(reference=reference, run_key=f"release-{sha256_file(tarball)[:16]}",
                                    val_fraction=float(run.get("val-fraction", 0.2)), seed=int(run.get("seed", 0)))
        replies = accept(tarball, request)
        record = decide_acceptance(replies, cfg.bounds, cfg.quorum)
        ok, why = record.verdict()
        step("accept", t0, why)
        write_json_atomic(work / "acceptance.json", {"record": record.to_dict(), "replies": [r.fields() for r in replies]})
        if not ok:
            raise AcceptanceRefused(f"federated acceptance refused the candidate: {record.reason or why}", record, summary)
        t0 = time.perf_counter()
        tarball = bundle_into(out, {"acceptance": record.to_dict()})
        step("bundle", t0, f"{tarball.name} signed with the sites' acceptance record")
        signed, selftest, backend = _verify(tarball, key, say, step)
    write_json_atomic(work / "build-summary.json", {"steps": [s.__dict__ for s in steps], "gate": gate.to_dict() if gate else None,
                                                     "fp32": fp32_metrics, "candidate": cand_metrics, "backend": backend})
    return replace(summary, tarball=tarball, bundle_dir=out / f"{name}-{version}", manifest=signed, selftest=selftest)


def _verify(tarball: Path, key: str | Path, say: Callable[[str], None], step: Callable[[str, float, str], None]):
    """Step 6: the tarball checked with the public key, loaded by the torch-free runtime, self-tested."""
    from cryptography.hazmat.primitives import serialization

    from echocare.bundle import candidates_of
    from edge.device.runtime import BundleRuntime, load_bundle

    t0 = time.perf_counter()
    say("verify: signature, hashes, self-test")
    public_pem = load_private_key(key).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed = verify_bundle(tarball, public_pem)
    names = [c.name for c in candidates_of(signed)]
    with load_bundle(tarball, public_key=public_pem, candidate=names[0] if names else None) as rt:
        selftest = rt.self_test()
        backend = rt.backend
        for other in names[1:]:  # an auto bundle: each candidate's own self-test, as a scanner would run it
            if not selftest[0]:
                break
            with BundleRuntime(rt.bundle_dir, rt.manifest, candidate=other) as each:
                selftest = each.self_test()
        if names and selftest[0]:
            selftest = (True, f"self-test passed for every candidate ({', '.join(names)})")
    step("verify", t0, f"signature + {len(signed['artifacts'])} hashes ok; {selftest[1]}")
    return signed, selftest, backend


def _public_spec(spec: str) -> str:
    """The data kind only (a hospital's local paths do not go into a shipped manifest)."""
    return spec.split(":", 1)[0] if ":" in spec else spec
