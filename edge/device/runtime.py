"""The on-device runtime: load a bundle, preprocess, run, post-process, self-test. No torch.

Dependencies: numpy, Pillow, cryptography (bundle checks) and OpenVINO and/or ONNX Runtime
(TensorRT bundles on an NVIDIA device: TensorRT and cuda-python).
The preprocessing is :func:`echocare.preprocess.preprocess_image` with the bundle's own
:class:`~echocare.preprocess.PreprocessSpec`: byte for byte what training and calibration used.

Typical use (what the scanner agent does after installing a release)::

    rt = load_bundle(bundle_dir, public_key="release.pub")   # verifies signature + hashes
    ok, why = rt.self_test()                                  # roll back when not ok
    results = rt.predict([image_array])                        # [{"probabilities": {...}}, ...]

Backend choice (``backend="auto"``): the bundle lists its model artifacts best first; the first
one that a locally installed backend can run wins (OpenVINO IR -> OpenVINO; ONNX -> ONNX Runtime,
then OpenVINO). ``backend="openvino"`` / ``"onnxruntime"`` forces one.

Precision candidates (a ``--precision auto`` bundle, format ``echofleet-bundle/2``): the manifest
lists several gated ways to run the model (INT8 with f32 or bf16 for the rest, bf16, fp32). On
load the runtime times each on this CPU by duration (:func:`time_p50_ms`: warm-up, then at least
``min_runs`` runs and ``duration`` seconds, as ``edge bench`` does), skips one this CPU would run at
another inference precision than the candidate names (a CPU without bf16 runs "bf16" as f32: the
same as the f32 candidate), and runs the fastest. :attr:`BundleRuntime.choice` says which and why;
with ``choice_file`` the choice is written there as JSON, and a later load on the same CPU of the
same bundle reuses it without timing again (the scanner agent times at install).

A ``tensorrt`` bundle ships the ONNX model; the engine is built on the device (``echofleet edge
compile model/model.onnx --target tensorrt --config tensorrt.json``, into the engine cache
:func:`~edge.device.backends.engine_cache_dir`). Where TensorRT is installed, ``auto`` (and
``backend="tensorrt"``) runs that engine, and refuses to start when it is missing or was built
from another model, by another TensorRT version or for another GPU; where it is not (the build
machine's self-test), the ONNX model runs on ONNX Runtime / OpenVINO like any other ONNX.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echocare.preprocess import Geometry, PreprocessSpec, preprocess_image
from edge.device import postprocess as post
from edge.device.backends import TensorRTSession, backend_installed, default_engine_path, open_session
from edge.device.timing import median_seconds
from echocare.atomic import atomic_write_bytes
from echocare.bundle import (FORMAT, FORMATS, BundleError, ModelCandidate, artifact_for, candidates_of,
                             read_manifest_unverified, safe_extract, verify_bundle)
from edge.targets import FORMAT_BACKENDS  # which backends run which artifact format, best first


@dataclass
class ModelChoice:
    """The model artifact and backend a runtime settled on."""

    artifact: dict
    backend: str


def choose_model(manifest: dict, backend: str = "auto") -> ModelChoice:
    """Pick the first model artifact (manifest order = preference) runnable by an installed backend.

    A ``tensorrt`` target's ONNX runs as its engine wherever TensorRT is installed."""
    models = [a for a in manifest.get("artifacts", []) if a.get("role") == "model"]
    if not models:
        raise BundleError(f"bundle {manifest.get('name')}-{manifest.get('version')}: no model artifact in the manifest")
    tried = []
    for a in models:
        engine = ("tensorrt",) if a.get("target") == "tensorrt" else ()
        for b in engine + tuple(FORMAT_BACKENDS.get(a.get("format", ""), ())):
            if backend not in ("auto", b):
                continue
            if backend_installed(b):
                return ModelChoice(a, b)
            tried.append(f"{a['path']} needs {b}")
    formats = sorted({a.get("format", "?") for a in models})
    want = "any installed backend" if backend == "auto" else f"backend {backend!r}"
    raise BundleError(
        f"bundle {manifest.get('name')}-{manifest.get('version')}: no model artifact ({', '.join(formats)}) runs on {want}"
        + (f" ({'; '.join(tried)}, not installed)" if tried else "")
    )


#: (candidate name, a session's run function, one preprocessed batch-1 input) -> p50 latency in ms.
#: The default is :func:`time_p50_ms`; tests inject a fake one.
CandidateTimer = Callable[[str, Callable[[np.ndarray], np.ndarray], np.ndarray], float]
CHOICE_FORMAT = "echofleet-precision-choice/1"


def time_p50_ms(run: Callable[[np.ndarray], Any], x: np.ndarray, *, duration: float = 1.0, min_runs: int = 5,
                warmup: int = 2) -> float:
    """Batch-1 p50 latency in ms, timed by duration (as ``benchmark_app -t`` and ``edge bench`` do):
    ``warmup`` untimed runs, then runs until both ``min_runs`` runs and ``duration`` seconds are done
    (:func:`edge.device.timing.median_seconds`)."""
    return median_seconds(run, x, duration=duration, min_runs=min_runs, warmup=warmup) * 1e3


def cpu_model_name() -> str | None:
    """The CPU model name ``/proc/cpuinfo`` gives, or None (not Linux, or unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """This CPU's model name (the choice is only valid on the CPU that timed it)."""
    name = cpu_model_name()
    return name if name is not None else platform.processor() or platform.machine()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON: names one exact signed bundle in a choice record."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@dataclass
class PrecisionChoice:
    """Which precision candidate of an auto bundle runs here, and why (``choice_file`` holds it as JSON)."""

    bundle: str  # name-version
    manifest_sha256: str
    cpu: str
    candidate: str
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # p50 on this CPU, per timed candidate
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed here
    chosen_at: str = ""

    def to_dict(self) -> dict:
        return {"format": CHOICE_FORMAT, **asdict(self)}

    def with_reason(self, reason: str) -> "PrecisionChoice":
        return PrecisionChoice(**{**asdict(self), "reason": reason})

    def summary(self) -> str:
        """One line for logs, ``edge infer`` and the agent's status report."""
        return f"precision candidate {self.candidate}: {self.reason}"


def _read_choice(path: Path | None, manifest: dict, names: set[str]) -> PrecisionChoice | None:
    """The recorded choice when it is for this very bundle on this CPU and names one of its candidates."""
    if path is None or not Path(path).is_file():
        return None
    try:
        d = json.loads(Path(path).read_text())
        if d.pop("format", None) != CHOICE_FORMAT:
            return None
        rec = PrecisionChoice(**d)
    except (OSError, ValueError, TypeError):
        return None  # unreadable or from another version: time again
    if rec.manifest_sha256 != manifest_digest(manifest) or rec.cpu != cpu_name() or rec.candidate not in names:
        return None
    return rec


class BundleRuntime:
    """A loaded bundle: ``predict`` images, ``predict_arrays`` preprocessed batches, ``self_test``.

    For an auto bundle (precision candidates) see the module docstring: ``timer`` times a candidate
    (default :func:`time_p50_ms` over ``choose_seconds``), ``choice_file`` records (and reuses) the choice."""

    def __init__(self, bundle_dir: Path, manifest: dict, backend: str = "auto", *, num_threads: int | None = None,
                 engine: Path | None = None, _owned_tmp: Path | None = None, timer: CandidateTimer | None = None,
                 choice_file: Path | None = None, choose_seconds: float = 1.0, candidate: str | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self._owned_tmp = _owned_tmp
        fmt = manifest.get("format", FORMAT)
        if fmt not in FORMATS:
            raise BundleError(f"{self.bundle_dir}: bundle format {fmt!r} is newer than this runtime reads "
                              f"({', '.join(FORMATS)}); update echofleet on this device")
        self.task: str = manifest["task"]
        if self.task not in post.TASKS:
            raise BundleError(f"{self.bundle_dir}: unknown task {self.task!r} in the manifest")
        self.labels: list[str] = list(manifest.get("labels") or [])
        self.preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
        self.candidate: ModelCandidate | None = None
        self.choice: PrecisionChoice | None = None
        candidates = candidates_of(manifest, str(self.bundle_dir))
        if candidate is not None and candidate not in {c.name for c in candidates}:
            raise BundleError(f"{self.bundle_dir}: no precision candidate {candidate!r} "
                              f"(the bundle has: {', '.join(c.name for c in candidates) or 'none'})")
        if candidates and backend in ("auto", "openvino"):
            self._choose_candidate(candidates, num_threads, timer, choice_file, choose_seconds, candidate)
        else:
            choice = choose_model(manifest, backend)
            self.artifact, self.backend = choice.artifact, choice.backend
            if self.backend == "tensorrt":
                self.session = self._open_engine(engine)
            else:
                self.session = open_session(
                    self.bundle_dir / self.artifact["path"], self.backend,
                    inference_precision=self.artifact.get("inference_precision", "f32"),
                    graph_precision=self.artifact.get("precision", "fp32"), num_threads=num_threads,
                )
        self.precision: str = self.artifact.get("precision", "fp32")

    # ------------------------------------------------------------ precision candidates
    def _open_candidate(self, c: ModelCandidate, num_threads: int | None):
        """(session, why it cannot run here as named or None)."""
        artifact = artifact_for(self.manifest, role="model", path=c.path)
        # an inference precision is OpenVINO's notion: OpenVINO first wherever it runs the format
        order = sorted(FORMAT_BACKENDS.get(artifact.get("format", ""), ()), key=lambda b: b != "openvino")
        backend = next((b for b in order if backend_installed(b)), None)
        if backend is None:
            return None, f"no installed backend runs {artifact.get('format')}"
        sess = open_session(self.bundle_dir / c.path, backend, inference_precision=c.inference_precision,
                            graph_precision=c.precision, num_threads=num_threads)
        effective = sess.info.details.get("inference_precision", c.inference_precision)
        if backend == "openvino" and effective != c.inference_precision:
            return None, f"this CPU runs {effective} when asked for {c.inference_precision} (no such kernels here)"
        return sess, None

    def _choose_candidate(self, candidates: tuple[ModelCandidate, ...], num_threads: int | None,
                          timer: CandidateTimer | None, choice_file: Path | None, seconds: float,
                          forced: str | None = None) -> None:
        """Time every candidate that runs here as named; keep the fastest open; record why.
        ``forced``: run that candidate, untimed and unrecorded (the build's self-test of each)."""
        by_name = {c.name: c for c in candidates}
        bundle = f"{self.manifest.get('name')}-{self.manifest.get('version')}"
        if forced is not None:
            c = by_name[forced]
            sess, problem = self._open_candidate(c, num_threads)
            if sess is None:
                raise BundleError(f"{self.bundle_dir}: candidate {forced} cannot run here: {problem}")
            self._use(c, sess, PrecisionChoice(bundle, manifest_digest(self.manifest), cpu_name(), c.name, "asked for by name"))
            return
        recorded = _read_choice(choice_file, self.manifest, set(by_name))
        if recorded is not None:
            c = by_name[recorded.candidate]
            sess, problem = self._open_candidate(c, num_threads)
            if sess is not None:
                self._use(c, sess, recorded.with_reason(f"{recorded.reason} (recorded in {choice_file})"))
                return
        time_one = timer or (lambda _name, run, x: time_p50_ms(run, x, duration=seconds))
        x = self._timing_input()
        timings: dict[str, float] = {}
        skipped: dict[str, str] = {}
        best: tuple[float, ModelCandidate, Any] | None = None
        for c in candidates:
            try:
                sess, problem = self._open_candidate(c, num_threads)
            except Exception as e:  # a candidate that cannot load here is skipped, with the reason
                sess, problem = None, f"cannot load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if sess is None:
                skipped[c.name] = problem
                continue
            p50 = float(time_one(c.name, sess.run, x))
            timings[c.name] = round(p50, 3)
            if best is None or p50 < best[0]:
                best = (p50, c, sess)  # the slower session is dropped (garbage-collected) here
        if best is None:
            raise BundleError(f"{self.bundle_dir}: no precision candidate runs on this device: "
                              + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        p50, c, sess = best
        others = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1]) if k != c.name)
        reason = (f"fastest on this CPU: p50 {p50:.2f} ms at batch 1" + (f" (vs {others})" if others else " (the only one that runs here)")
                  + (f"; skipped {', '.join(skipped)}" if skipped else ""))
        choice = PrecisionChoice(bundle, manifest_digest(self.manifest), cpu_name(), c.name, reason, timings, skipped,
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if choice_file is not None:
            Path(choice_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(choice_file), (json.dumps(choice.to_dict(), indent=2) + "\n").encode())
        self._use(c, sess, choice)

    def _use(self, c: ModelCandidate, sess, choice: PrecisionChoice) -> None:
        self.candidate, self.choice, self.session = c, choice, sess
        self.artifact = artifact_for(self.manifest, role="model", path=c.path)
        self.backend = sess.info.backend

    def _timing_input(self) -> np.ndarray:
        """One preprocessed image to time with: the bundle's self-test sample, else zeros."""
        st = self.manifest.get("selftest") or {}
        try:
            return np.ascontiguousarray(np.load(self.bundle_dir / st["input"], allow_pickle=False)[:1], np.float32)
        except (KeyError, OSError, ValueError):
            size = self.preprocess.size
            return np.zeros((1, 3, size, size), np.float32)

    def _open_engine(self, engine: Path | None) -> TensorRTSession:
        """The engine built on this device from the bundle's ONNX (default: the engine cache)."""
        sha = self.artifact["sha256"]
        engine = Path(engine) if engine is not None else default_engine_path(sha)
        onnx = self.bundle_dir / self.artifact["path"]
        config = self.bundle_dir / "tensorrt.json"
        rebuild = (f"build it on this device: echofleet edge compile {onnx} --target tensorrt"
                   + (f" --config {config}" if config.is_file() else "") + f" --engine {engine}")
        return TensorRTSession(engine, model_sha256=sha, graph_precision=self.artifact.get("precision", "fp32"), rebuild=rebuild)

    # ------------------------------------------------------------------ running
    def predict_arrays(self, x: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Raw model outputs for preprocessed inputs ``(N, 3, size, size)`` float32."""
        x = np.asarray(x, np.float32)
        size = self.preprocess.size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"inputs must be (N, 3, {size}, {size}) float32, got {x.shape}")
        if len(x) <= batch_size:  # one call: no concatenation (a copy) of a single chunk
            return self.session.run(x)
        return np.concatenate([self.session.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def predict(self, images: list[np.ndarray], *, pixel_mm: list[float | None] | None = None, batch_size: int = 8) -> list[dict]:
        """One result dict per image (any size, gray or RGB).

        - classify: ``probabilities`` (label -> p), ``label``, ``score``;
        - segment: ``mask`` (uint8 {0,1} at the image's own size, ready for a Dice against a
          hand-drawn mask), ``foreground_fraction``;
        - hc: as segment, plus ``hc_mm`` when ``pixel_mm`` (the source pixel size) is known.
        """
        if not images:
            return []
        prepared = [preprocess_image(im, self.preprocess) for im in images]
        x = np.stack([p[0] for p in prepared])
        out = self.predict_arrays(x, batch_size)
        geoms = [p[1] for p in prepared]
        return self.postprocess(out, geoms, pixel_mm)

    def postprocess(self, out: np.ndarray, geoms: list[Geometry], pixel_mm: list[float | None] | None = None) -> list[dict]:
        results: list[dict] = []
        if self.task == "classify":
            probs = post.softmax(out)
            for p in probs:
                k = int(p.argmax())
                names = self.labels or [str(i) for i in range(len(p))]
                results.append({"probabilities": {n: float(v) for n, v in zip(names, p)}, "label": names[k], "score": float(p[k])})
            return results
        masks = post.masks_from_logits(out, self.preprocess.size)
        for i, (m, g) in enumerate(zip(masks, geoms)):
            src = post.mask_to_source(m, g)
            r: dict[str, Any] = {"mask": src, "foreground_fraction": float((src > 0).mean())}
            if self.task == "hc":
                mm = pixel_mm[i] if pixel_mm else None
                r["hc_mm"] = None if mm is None else post.hc_from_mask(m, g.output_pixel_mm(mm))
            results.append(r)
        return results

    # ---------------------------------------------------------------- self test
    def self_test(self) -> tuple[bool, str]:
        """Run the bundle's own sample and compare with the output recorded at build time."""
        st = self.manifest.get("selftest")
        if not st:
            return False, "bundle has no selftest entry"
        try:
            x = np.load(self.bundle_dir / st["input"], allow_pickle=False)
            out = self.predict_arrays(x)
        except Exception as e:  # any failure to run is a failed self-test, with the reason
            return False, f"self-test could not run on {self.backend}: {type(e).__name__}: {e}"
        key = self.candidate.name if self.candidate is not None else self.artifact["path"]
        expected = st.get("outputs", {}).get(key)
        if expected is None:
            return False, f"no expected self-test output recorded for {key}"
        tol = st.get("tolerance", {})
        where = (f"candidate {key}, " if self.candidate is not None else "") + f"{self.artifact['path']} on {self.backend}"
        if self.task == "classify":
            got = post.softmax(out)
            want = np.asarray(expected["probabilities"], np.float32)
            if got.shape != want.shape:
                return False, f"self-test output shape {got.shape} != expected {want.shape} ({where})"
            err = float(np.abs(got - want).max())
            atol = float(tol.get("probability_atol", 0.05))
            if err > atol:
                return False, f"self-test probabilities differ by {err:.4f} > {atol} ({where})"
            return True, f"self-test passed: max probability difference {err:.4f} <= {atol} ({where})"
        got = post.foreground(post.masks_from_logits(out, self.preprocess.size))
        want = np.load(self.bundle_dir / expected["masks"], allow_pickle=False)
        if got.shape != want.shape:
            return False, f"self-test mask shape {got.shape} != expected {want.shape} ({where})"
        agree = float((got == want).mean())
        dices = [post.dice_binary(g, w) for g, w in zip(got, want)]
        min_agree = float(tol.get("mask_min_agreement", 0.98))
        min_dice = float(tol.get("mask_min_dice", 0.9))
        small = [w.mean() < 0.01 for w in want]  # Dice is unstable on (almost) empty masks
        bad_dice = [d for d, s in zip(dices, small) if not s and d < min_dice]
        if agree < min_agree or bad_dice:
            return False, f"self-test masks disagree: pixel agreement {agree:.4f} (min {min_agree}), Dice {[round(d, 4) for d in dices]} (min {min_dice}) ({where})"
        return True, f"self-test passed: pixel agreement {agree:.4f}, Dice {[round(d, 4) for d in dices]} ({where})"

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        if isinstance(self.session, TensorRTSession):
            self.session.close()
        self.session = None
        if self._owned_tmp is not None:
            shutil.rmtree(self._owned_tmp, ignore_errors=True)
            self._owned_tmp = None

    def __enter__(self) -> "BundleRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """Name, version, task, chosen artifact/backend and effective precision (for logs and --json)."""
        return {
            "bundle": f"{self.manifest.get('name')}-{self.manifest.get('version')}",
            "task": self.task,
            "artifact": self.artifact["path"],
            "backend": self.backend,
            "precision": self.precision,
            "session": {"device": self.session.info.device, **self.session.info.details} if self.session else {},
            **({"candidate": self.candidate.name, "choice": self.choice.to_dict()} if self.candidate is not None else {}),
        }


def load_bundle(path: Path | str, backend: str = "auto", *, public_key: Any = None, num_threads: int | None = None,
                engine: Path | None = None, timer: CandidateTimer | None = None, choice_file: Path | None = None,
                choose_seconds: float = 1.0, candidate: str | None = None) -> BundleRuntime:
    """Open a bundle directory or ``.tar.gz``.

    With ``public_key`` the signature and every artifact hash are verified first (raises
    :class:`~echocare.bundle.BundleError` on any mismatch). Without it the manifest is read as is:
    only do that for a bundle that was verified when it was installed (the agent does).
    A tarball is unpacked (safely) into a temporary directory that :meth:`BundleRuntime.close` removes.
    ``engine``: a TensorRT bundle's engine, when not in the engine cache. ``timer``, ``choice_file``,
    ``choose_seconds``: an auto bundle's precision choice (:class:`BundleRuntime`); ``candidate``: run
    that precision candidate by name, untimed.
    """
    path = Path(path)
    tmp = None
    if path.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="echofleet-bundle-"))
        try:
            path = safe_extract(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        manifest = verify_bundle(path, public_key) if public_key is not None else read_manifest_unverified(path)
        return BundleRuntime(path, manifest, backend, num_threads=num_threads, engine=engine, _owned_tmp=tmp,
                             timer=timer, choice_file=choice_file, choose_seconds=choose_seconds, candidate=candidate)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

