"""Step 5 of an edge build: a compiled model -> a signed bundle (manifest, model card, self-test).

:func:`assemble_bundle` is the one implementation, used by :func:`edge.build.pipeline.build` and by
``echofleet edge bundle`` (a model compiled step by step). It writes

- the manifest: task, labels, input and preprocessing spec, encoder identity, the model card
  (:func:`model_card`: sites, rounds, epsilon per site, FP32 vs candidate metrics), the artifacts
  laid out by :func:`edge.build.compiled.bundle_artifacts`, and the target's manifest sections;
- a self-test sample with the outputs this machine computes for it, and the target's tolerance
  (:data:`edge.targets.TARGETS`), which the scanner checks after every install;
- the Ed25519 signature (:func:`echocare.bundle.write_bundle`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from echocare.bundle import CANDIDATES, FORMAT_CANDIDATES, safe_name, write_bundle
from edge.build.compiled import CompiledModel, bundle_artifacts
from edge.build.provenance import central_acceptance, not_private_sites, run_provenance
from edge.device import postprocess as post
from edge.device.backends import backend_installed, open_session
from edge.targets import AUTO, FORMAT_BACKENDS, get_target

GATE_RECORD_KEYS = ("metric", "fp32", "candidate", "drop", "bound", "passed", "reason")


def bundle_identity(task: str, encoder_config: str, target: str, name: str | None = None,
                    version: str | None = None) -> tuple[str, str]:
    """(name, version) of a bundle: ``TASK-ENCODER-TARGET`` and a UTC timestamp unless given."""
    return (safe_name(name or f"{task}-{encoder_config}-{target}"),
            safe_name(version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")))


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
                privacy[site]["unit"] = p.get("unit") or "image"  # what epsilon protects: one patient or one image
    card.update({
        "sites": sites,
        "rounds": len(rounds),
        "privacy": privacy,
        "excluded_sites": sorted({s for r in rounds for s in r.get("excluded", [])}),
        "federated_metrics": rounds[-1].get("aggregated", {}).get("evaluate", {}) if rounds else {},
    })
    if isinstance(report.get("dp"), dict):
        card["dp"] = report["dp"]
    not_private = not_private_sites(report)
    if not_private:  # the insecure deterministic-noise test switch: say it wherever the card is read
        card["privacy_warning"] = (f"NOT PRIVATE: {', '.join(not_private)} trained with insecure deterministic noise "
                                   "(a test switch); no privacy guarantee holds for this model")
    return card


def validation_from_gate_record(path: Path, precision: str) -> dict:
    """The model card's ``validation`` from a ``gate.json`` written by ``echofleet edge quantize``."""
    try:
        g = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable gate record ({e})") from None
    return {"fp32": g.get("fp32_metrics"), precision: g.get("candidate_metrics"),
            "gate": {k: g[k] for k in GATE_RECORD_KEYS if k in g}, "samples": g.get("validation_samples")}


def _selftest_expectations(files: dict[str, Path], desc: list[dict], x: np.ndarray, task: str, size: int,
                           work: Path, candidates: list[dict] | None = None) -> tuple[dict, dict[str, Path]]:
    """Expected self-test outputs of each model artifact, computed here with the backend the runtime
    would pick; for an auto bundle, of each precision candidate (keyed by its name, at its own
    inference precision: what the scanner compares once it has chosen it)."""
    outputs, extra = {}, {}
    if candidates:
        by_path = {d["path"]: d for d in desc}
        runs = [(c["name"], {**by_path[c["path"]], "inference_precision": c["inference_precision"]}) for c in candidates]
    else:
        runs = [(d["path"], d) for d in desc if d.get("role") == "model"]
    for key, d in runs:
        backend = next(b for b in FORMAT_BACKENDS[d["format"]] if backend_installed(b))
        sess = open_session(files[d["path"]], backend, inference_precision=d.get("inference_precision") or "f32",
                            graph_precision=d["precision"])
        out = sess.run(x)
        if task == "classify":
            outputs[key] = {"probabilities": post.softmax(out).tolist(), "backend": backend}
        else:
            masks = post.foreground(post.masks_from_logits(out, size))
            stem = safe_name(key) if candidates else safe_name(Path(d["path"]).stem)
            name = f"selftest/expected-{stem}.npy"
            p = work / "selftest" / Path(name).name
            np.save(p, masks)
            extra[name] = p
            outputs[key] = {"masks": name, "foreground_fraction": [float(m.mean()) for m in masks], "backend": backend}
    return outputs, extra


def candidate_artifacts(compiled: dict[str, CompiledModel]) -> tuple[dict[str, Path], list[dict]]:
    """The layout of an auto bundle: each compiled file under ``model/<file>/`` (``EdgeTarget.auto_files``:
    the INT8 IRs and the FP32 IR); its candidates (which inference precision runs which file) are listed in
    ``manifest["candidates"]``, not on the artifact."""
    files: dict[str, Path] = {}
    descs: list[dict] = []
    for key, c in compiled.items():
        f, d = bundle_artifacts(c)
        rename = {rel: rel.replace("model/", f"model/{key}/", 1) if rel.startswith("model/") else f"{key}-{rel}" for rel in f}
        for entry in d:
            entry = {**entry, "path": rename[entry["path"]]}
            entry.pop("inference_precision", None)
            if "weights" in entry:
                entry["weights"] = rename[entry["weights"]]
            descs.append(entry)
        files.update({rename[rel]: path for rel, path in f.items()})
    return files, descs


def assemble_bundle(out: Path, key: str | Path, *, info: dict, compiled: CompiledModel | dict[str, CompiledModel],
                    selftest_inputs: np.ndarray, name: str, version: str, work: Path, device_class: str | None = None,
                    extra: dict | None = None, candidates: list[dict] | None = None) -> Path:
    """Write the signed bundle: manifest from the export info, self-test sample + expected outputs, artifacts.

    ``info`` is the export's ``export.json``; ``extra`` may carry ``quantization``, ``source`` and
    ``model_card_validation`` (FP32 vs candidate metrics and the gate result). Returns the tarball path.

    ``candidates`` (``--precision auto``): ``compiled`` maps each file (``EdgeTarget.auto_files``) to its compiled
    model, laid out by :func:`candidate_artifacts`; each candidate dict (name, path, precision,
    inference_precision, gate, metrics, build_p50_ms: :class:`echocare.bundle.ModelCandidate`) names
    one of those files by its bundle path; the manifest is format ``echofleet-bundle/2``.
    """
    extra = dict(extra or {})
    if candidates:
        assert isinstance(compiled, dict), "candidates need one compiled model per file"
        first = next(iter(compiled.values()))
        target = get_target(first.target)
        files, desc = candidate_artifacts(compiled)
        extra.update({"format": FORMAT_CANDIDATES, CANDIDATES: candidates})
        compiled_manifest: dict = {}
        for c in compiled.values():
            compiled_manifest.update(c.manifest)
    else:
        assert isinstance(compiled, CompiledModel)
        target = get_target(compiled.target)
        files, desc = bundle_artifacts(compiled)
        compiled_manifest = compiled.manifest
    task, size = info["task"], int(info["input"]["shape"][-1])
    (work / "selftest").mkdir(parents=True, exist_ok=True)
    np.save(work / "selftest" / "input.npy", np.asarray(selftest_inputs, np.float32))
    expected, expected_files = _selftest_expectations(files, desc, selftest_inputs, task, size, work, candidates)
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
        "target": target.name,
        "precision": AUTO if candidates else compiled.precision,
        "input": info["input"],
        "output": info["output"],
        "preprocess": info["preprocess"],
        "encoder": info["encoder"],
        "head": info.get("head"),
        "flops_per_image": info.get("flops_per_image"),
        "export": {"opset": info.get("opset"), "parity": info.get("parity")},
        "source": {"model_dir": info.get("source")},  # for `edge bench`'s PyTorch baseline on the build machine
        "model_card": card,
        "selftest": {"input": "selftest/input.npy", "outputs": expected, "tolerance": target.selftest.to_dict()},
        "artifacts": desc,
        **compiled_manifest,
        **extra,
    }
    if device_class:
        manifest["device_class"] = device_class
    provenance = run_provenance(info)  # run id, app hash, encoder, rounds, disclosed epsilon (edge.build.provenance)
    if provenance is not None:
        manifest["provenance"] = provenance
    if manifest.get("acceptance") is None:  # no federated record given: the central gate's, if there was one
        central = central_acceptance(card.get("validation"))
        if central is not None:
            manifest["acceptance"] = central
    return write_bundle(out, manifest, files, key)
