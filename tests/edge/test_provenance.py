"""Provenance chain (issue 10, item 3): the run id, app hash (FAB, or source in simulation), encoder,
rounds and each site's disclosed epsilon go from the run directory into the signed manifest, and
``edge verify --explain`` prints them with the calibration and acceptance records. No federation
is run: the run directory is written by hand, as the coordinator writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from echocare.bundle import (AcceptanceRecord, BundleError, Provenance, SiteAcceptance, acceptance_of, generate_keypair,
                             provenance_of, release_chain, verify_bundle, write_bundle)
from edge.build.provenance import central_acceptance, run_id_of, run_provenance
from server.coordinator.checkpoint import config_hash
from server.coordinator.provenance import APP_FILE, read_apps, record_app, source_sha256

FAB = "f" * 64


def _grid(fab_hash: str = "", run_id: int = 77) -> SimpleNamespace:
    return SimpleNamespace(run=SimpleNamespace(run_id=run_id, fab_id="echofleet/echofleet" if fab_hash else "",
                                               fab_version="1.0.0" if fab_hash else "", fab_hash=fab_hash))


def _run_dir(root: Path) -> Path:
    """RUN/report.json as the coordinator writes it (two sites disclose epsilon, one does not), RUN/global."""
    run = root / "run-17"
    (run / "global").mkdir(parents=True)
    config = {"run-dir": str(run), "num-server-rounds": 2, "strategy": "fedavg", "target-epsilon": 8.0}
    site = lambda eps: {"status": "ok", "train": {}, "evaluate": {},  # noqa: E731
                        "privacy": {"epsilon": eps, "delta": 1e-5, "noise_multiplier": None, "steps": None, "unit": "image"}}
    report = {
        "format": "echofleet-run-report/1", "task": "classify", "strategy": "fedavg", "rounds_completed": 2,
        "encoder": {"config": "echocare-tiny", "sha256": "e" * 64, "seed": 0, "checkpoint": "/secret/path/enc.pt"},
        "config": config,
        "rounds": [{"round": r, "excluded": [], "aggregated": {"evaluate": {}},
                    "sites": {"hospital-a": site(1.1 * r), "hospital-b": site(0.9 * r),
                              "hospital-c": {"status": "ok", "train": {}, "evaluate": {}}}}  # disclosed nothing
                   for r in (1, 2)],
    }
    (run / "report.json").write_text(json.dumps(report))
    return run


def _info(run: Path) -> dict:
    """The part of an export's export.json that provenance reads."""
    return {"source": str(run / "global"), "run_report": json.loads((run / "report.json").read_text()),
            "encoder": {"config": "echocare-tiny", "sha256": "e" * 64}}


# ------------------------------------------------------------------------- the coordinator side
def test_record_app_fab_or_source_and_resumes(tmp_path):
    run = tmp_path / "run"
    sim = record_app(run, _grid())  # run_simulation: no FAB
    assert sim["kind"] == "source" and sim["sha256"] == source_sha256() and re.fullmatch(r"[0-9a-f]{64}", sim["sha256"])
    assert sim["packages"] == ["echocare", "fed", "server.coordinator"] and sim["flower_run_id"] == 77
    record_app(run, _grid(run_id=78))  # resumed with the same app: nothing new
    assert len(read_apps(run / APP_FILE)) == 1
    fab = record_app(run, _grid(FAB, run_id=79))  # resumed under `flwr run`: another app
    assert (fab["kind"], fab["sha256"], fab["fab_id"]) == ("fab", FAB, "echofleet/echofleet")
    assert [a["kind"] for a in read_apps(run / APP_FILE)] == ["source", "fab"]
    # a failure to record never stops the run (a file where the folder should be)
    (tmp_path / "blocked").write_text("")
    assert record_app(tmp_path / "blocked", _grid()) == {}


# ------------------------------------------------------------------------- the build side
def test_run_provenance_takes_only_what_the_run_recorded(tmp_path):
    run = _run_dir(tmp_path)
    assert run_provenance({"source": str(run / "global")}) is None  # a model that is not from a run
    record_app(run, _grid(FAB))
    prov = run_provenance(_info(run))
    report = json.loads((run / "report.json").read_text())
    assert prov["run_id"] == f"run-17-{config_hash(report['config'])}" == run_id_of(report)
    assert prov["apps"][0]["sha256"] == FAB and prov["apps"][0]["kind"] == "fab"
    assert prov["encoder"] == {"config": "echocare-tiny", "sha256": "e" * 64}  # no checkpoint path
    assert prov["rounds"] == 2 and prov["strategy"] == "fedavg"
    assert set(prov["epsilon"]) == {"hospital-a", "hospital-b"}  # hospital-c disclosed nothing: nothing made up
    assert prov["epsilon"]["hospital-a"] == {"epsilon": pytest.approx(2.2), "delta": 1e-5, "unit": "image"}
    assert "/secret" not in json.dumps(prov)
    # a run recorded without app.json says so (None), it does not invent one
    (run / APP_FILE).unlink()
    assert run_provenance(_info(run))["apps"] is None
    assert Provenance.from_dict(prov).to_dict() == prov


def test_assemble_bundle_signs_the_provenance(tmp_path):
    from edge.build.bundling import assemble_bundle
    from edge.build.compiled import CompiledModel
    from server.registry.sample_bundle import LABELS, SIZE, _onnx_linear

    run = _run_dir(tmp_path)
    record_app(run, _grid())
    rng = np.random.default_rng(0)
    onnx = tmp_path / "model.onnx"
    _onnx_linear((rng.standard_normal((3 * SIZE * SIZE, 3)) * 0.05).astype(np.float32), np.zeros(3, np.float32), onnx)
    info = {**_info(run), "task": "classify", "labels": LABELS, "input": {"name": "input", "shape": [-1, 3, SIZE, SIZE]},
            "output": {"name": "logits", "shape": [-1, 3]}, "preprocess": {}, "provenance": {}}
    priv, pub = generate_keypair(tmp_path / "k")
    compiled = CompiledModel(target="onnxruntime-cpu", model_path=onnx, files=[onnx], format="onnx", precision="fp32")
    tar = assemble_bundle(tmp_path / "dist", priv, info=info, compiled=compiled,
                          selftest_inputs=rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32),
                          name="busi-test", version="1", work=tmp_path / "work",
                          extra={"model_card_validation": {"gate": {"metric": "auroc", "fp32": 0.8, "candidate": 0.797,
                                                                    "drop": 0.3, "bound": 1.0, "passed": True, "reason": "ok"}}})
    manifest = verify_bundle(tar, pub)
    prov = provenance_of(manifest)
    assert prov is not None and prov.run_id.startswith("run-17-") and prov.apps[0].kind == "source"
    assert sorted(prov.epsilon) == ["hospital-a", "hospital-b"]
    # no federated acceptance given: the central gate becomes the signed acceptance record
    acc = acceptance_of(manifest)
    assert acc is not None and acc.method == "central" and acc.verdict()[0]
    assert (acc.sites[0].site, acc.sites[0].delta, acc.sites[0].bound) == ("central", 0.3, 1.0)


def test_central_acceptance_from_the_gate():
    gate = {"metric": "dice", "drop": 0.03, "bound": 0.01, "passed": False, "reason": "Dice dropped 0.03 > 0.01"}
    rec = central_acceptance({"gate": gate})
    assert rec["passed"] is False and rec["sites"][0]["reason"] == "Dice dropped 0.03 > 0.01"
    assert central_acceptance(None) is None and central_acceptance({"gate": {"metric": "dice"}}) is None
    assert central_acceptance({"gate": {**gate, "passed": True, "drop": float("nan")}}) is None  # never a made-up pass


# ------------------------------------------------------------------------- edge verify --explain
def _bundle(tmp: Path, run: Path | None, *, acceptance: bool = True) -> tuple[Path, Path]:
    priv, pub = generate_keypair(tmp / "keys" / "release")
    (tmp / "m.onnx").write_bytes(b"onnx bytes")
    manifest = {"name": "busi-classify", "version": "3", "task": "classify", "target": "onnxruntime-cpu",
                "precision": "int8", "device_class": "cart",
                "calibration": {"method": "federated", "ranges": "percentile", "points": 12, "noise_std_of_sum": 3.2,
                                "sites": [{"site": "hospital-a", "status": "ok", "epsilon": 0.3, "delta": 1e-6},
                                          {"site": "hospital-b", "status": "refused", "epsilon": None,
                                           "reason": "policy: calibration = false"}]}}
    if run is not None:
        manifest["provenance"] = run_provenance(_info(run))
    if acceptance:
        manifest["acceptance"] = AcceptanceRecord(
            passed=True, method="federated", metric="auroc", bound=0.02, quorum=2,
            sites=(SiteAcceptance("hospital-a", "auroc", 0.004, 0.02, 3.2, True),
                   SiteAcceptance("hospital-b", "auroc", -0.001, 0.02, 4.1, True))).to_dict()
    return write_bundle(tmp / "dist", manifest, {"model/model.onnx": tmp / "m.onnx"}, priv), pub


def test_verify_explain_prints_the_chain(tmp_path, monkeypatch):
    from echofleet.cli import app
    from echofleet.cli import edge as edge_cli

    monkeypatch.setattr(edge_cli, "_console", lambda as_json=False: __import__("rich.console").console.Console(
        stderr=as_json, width=250, highlight=False))
    run = _run_dir(tmp_path)
    record_app(run, _grid(FAB, run_id=4242))
    tar, pub = _bundle(tmp_path, run)
    runner = CliRunner()
    r = runner.invoke(app, ["edge", "verify", str(tar), "--pubkey", str(pub), "--explain"])
    assert r.exit_code == 0, r.output
    run_id = run_provenance(_info(run))["run_id"]
    for text in (run_id, f"FAB hash {FAB}", "Flower run 4242", "encoder echocare-tiny, sha256 " + "e" * 64,
                 "hospital-a", "2.200", "hospital-b", "1.800", "federated", "ranges percentile", "noise_std_of_sum 3.2",
                 "policy: calibration = false", "quorum 2 of 2",
                 "accepted", "federated acceptance passed at 2/2 sites"):
        assert text in r.output, (text, r.output)
    assert "hospital-c" not in r.output  # it disclosed no epsilon
    r = runner.invoke(app, ["edge", "verify", str(tar), "--pubkey", str(pub), "--explain", "--json"])
    chain = json.loads(r.output)
    assert chain["provenance"]["run_id"] == run_id and chain["verdict"]["accepted"] is True
    assert chain["acceptance"]["sites"][1]["p50_ms"] == 4.1 and chain["problems"] == []


def test_verify_explain_says_what_is_missing(tmp_path, monkeypatch):
    from echofleet.cli import app
    from echofleet.cli import edge as edge_cli

    monkeypatch.setattr(edge_cli, "_console", lambda as_json=False: __import__("rich.console").console.Console(
        stderr=as_json, width=250, highlight=False))
    tar, pub = _bundle(tmp_path, None, acceptance=False)
    r = CliRunner().invoke(app, ["edge", "verify", str(tar), "--pubkey", str(pub), "--explain"])
    assert r.exit_code == 0 and "no provenance" in r.output and "no acceptance record" in r.output, r.output
    assert "not accepted" in r.output


def test_the_chain_is_signed_and_malformed_sections_are_reported(tmp_path):
    run = _run_dir(tmp_path)
    tar, pub = _bundle(tmp_path, run)
    bundle_dir = tar.parent / "busi-classify-3"
    man = json.loads((bundle_dir / "manifest.json").read_text())
    man["provenance"]["epsilon"]["hospital-a"]["epsilon"] = 0.1  # a smaller privacy cost, after signing
    (bundle_dir / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match="does not match its signature"):
        verify_bundle(bundle_dir, pub)
    chain = release_chain({"name": "x", "version": "1", "provenance": {"run_id": 3}, "acceptance": {"passed": True}})
    assert chain["provenance"] is None and chain["acceptance"] is None and chain["verdict"]["accepted"] is False
    assert any("provenance.run_id" in p for p in chain["problems"]) and any("acceptance" in p for p in chain["problems"])


def test_a_bundle_from_an_insecure_noise_run_says_not_private_everywhere(tmp_path, monkeypatch):
    """Issue 9: a run in which a site used the insecure deterministic-noise test switch is marked "not
    private" in the report, and so in the bundle: its signed provenance, its model card and `--explain`."""
    from echofleet.cli import app
    from echofleet.cli import edge as edge_cli
    from edge.build.bundling import model_card

    monkeypatch.setattr(edge_cli, "_console", lambda as_json=False: __import__("rich.console").console.Console(
        stderr=as_json, width=250, highlight=False))
    honest = _run_dir(tmp_path / "honest")
    assert run_provenance(_info(honest))["not_private"] == [] and "privacy_warning" not in model_card({}, _info(honest)["run_report"])
    run = _run_dir(tmp_path / "insecure")
    report = json.loads((run / "report.json").read_text())
    report["rounds"][1]["sites"]["hospital-b"]["train"]["not-private"] = 1.0  # what fed.task sends under the switch
    (run / "report.json").write_text(json.dumps(report))
    assert run_provenance(_info(run))["not_private"] == ["hospital-b"]
    assert model_card({}, report)["privacy_warning"].startswith("NOT PRIVATE: hospital-b")
    tar, pub = _bundle(tmp_path, run)
    r = CliRunner().invoke(app, ["edge", "verify", str(tar), "--pubkey", str(pub), "--explain"])
    assert r.exit_code == 0, r.output
    assert "NOT PRIVATE: hospital-b trained with insecure deterministic noise" in r.output, r.output
