"""A simulated federation (3 virtual hospitals on phantoms, echocare-tiny) calibrates and accepts an INT8
edge build with no local data (``edge build RUN --calib sites --accept sites``, no ``--val``): every
site's lifetime ledger shows the calibration release; the signed manifest records the calibration and
the sites' acceptance. One shared build (two short simulations: one query round each); the deployment
variant (TLS SuperLink, driven by `edge build ... --federation NAME`) is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sim_helpers import SITE_CPUS
from typer.testing import CliRunner

from echofleet.cli import app

pytestmark = pytest.mark.xdist_group("flower")  # starts a Flower federation: one worker runs them all (tests/conftest.py)

SITE_DATA = "phantom:18?profiles=linear-a,convex-b,linear-c&seed=2"
PUBLIC_VAL = "phantom:9?seed=9"  # public labelled phantoms for the central gate of this test


def _run_dir(root: Path) -> Path:
    """A run directory as `echofleet simulate` leaves it: global model, report.json (its run config),
    sites/site-K/policy.toml. The head is freshly initialised: this test is about the calibration path."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_helpers import fresh_model

    from echofleet.simulation import SimulationConfig, layout_sites
    from fed.config import RunConfig

    run = root / "run"
    fresh_model(run / "global", "classify")
    layout_sites(SimulationConfig(data=SITE_DATA, sites=3, out=str(run)), run)
    config = RunConfig(labels="benign,malignant,normal", run_dir=str(run), sim_sites_dir=str(run / "sites"))
    (run / "report.json").write_text(json.dumps({"config": config.as_run_config()}))
    return run


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    from echocare.bundle import generate_keypair
    from echofleet.apps import SimulatedSites
    from edge.build.gate import GateBounds
    from edge.build.pipeline import BuildConfig, build

    root = tmp_path_factory.mktemp("release")
    run = _run_dir(root)
    key, pub = generate_keypair(root / "keys" / "release")
    sites = SimulatedSites(run, cpus_per_site=SITE_CPUS)
    sites.pin_release_key(pub.read_bytes())  # simulation only: the virtual hospitals pin the release key
    # a fresh head: the bound is wide on purpose (this is the path, not the accuracy: bench/bench_release.py)
    cfg = BuildConfig(public_limit=4, bounds=GateBounds(auroc_points=100.0), selftest_samples=1)
    summary = sites.session(lambda calibrate, accept: build(run, "onnxruntime-cpu", "sites", None, key, root / "dist",
                                                            config=cfg, sites=calibrate, accept=accept))
    return {"run": run, "summary": summary, "root": root}


def test_sites_calibrate_and_accept_an_int8_bundle_with_no_local_data(release):
    s = release["summary"]
    assert s.ok and s.tarball.is_file() and s.precision == "int8" and s.gate is None  # no central gate
    names = [st.name for st in s.steps]
    assert names.index("calibrate") < names.index("quantize") < names.index("accept")
    acc = s.manifest["acceptance"]
    assert acc["method"] == "federated" and acc["passed"]
    assert sorted(site["site"] for site in acc["sites"]) == ["site-0", "site-1", "site-2"]
    assert not list((release["root"] / "dist").glob("*reference*"))  # the FP32 reference stays in the work folder
    cal = s.manifest["calibration"]
    assert cal["method"] == "federated" and cal["release"] == "scale" and cal["ranges"] == "scale"
    assert sorted(cal["contributing_sites"]) == ["site-0", "site-1", "site-2"]
    assert cal["noise_std_of_sum"] > 0 and cal["public_edges"]["data"] == "phantom"
    assert all(a["status"] == "ok" and a["epsilon"] > 0 for a in cal["sites"])
    import onnx

    q = next((s.work_dir / "quantized").glob("model.int8-*.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)


def test_every_sites_ledger_shows_the_calibration_and_acceptance(release):
    from fed.ledger import PrivacyLedger
    from fed.policy import load_policy

    for k in range(3):
        policy = load_policy(release["run"] / "sites" / f"site-{k}" / "policy.toml")
        ledger = PrivacyLedger.load(policy.ledger_path)
        assert [r.kind for r in ledger.releases] == ["calibrate"], policy.site_name
        assert ledger.releases[0].noise_multiplier == policy.evaluation_noise_multiplier and ledger.releases[0].private
        # the simulation's hospitals disclose exact evaluations (layout_sites): acceptance is a logged disclosure
        assert [d.kind for d in ledger.disclosures] == ["accept"], policy.site_name


def test_release_options_are_checked_with_one_error_line(release, tmp_path):
    from echocare.bundle import generate_keypair

    key, _ = generate_keypair(tmp_path / "k")
    model = release["run"] / "global"  # a task-model directory: no sites to ask
    base = ["edge", "build", str(model), "--target", "onnxruntime-cpu", "--key", str(key), "--out", str(tmp_path / "d")]
    for extra, expected in ((["--calib", "sites", "--val", PUBLIC_VAL], "--calib sites: "),
                            (["--calib", PUBLIC_VAL, "--accept", "sites"], "--accept sites: "),
                            (["--calib", PUBLIC_VAL, "--accept", "everyone"], "--accept 'everyone'"),
                            (["--calib", PUBLIC_VAL], "--val DATA_SPEC, or --accept sites")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2 and expected in r.output, (extra, r.output)
        assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_calibrates_and_accepts_over_the_tls_superlink(tmp_path, monkeypatch):
    """`echofleet edge build RUN --calib sites --accept sites --federation NAME` against the deploy-localhost
    SuperLink (echofleet.deploy): TLS with SuperNode authentication, 3 registered SuperNodes whose policies
    pin the release key; the CLI's calibration and acceptance are two `flwr run`s in mode "release" over
    the connection the coordinator's FLWR_HOME names; each hospital's ledger shows both releases (real
    hospitals keep the accounted default). The training run is skipped: a fresh global model and the
    report.json a training run writes (its run config) stand in for it."""
    import functools
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_helpers import fresh_model
    from test_deploy_localhost import _alive_leftovers, _kill_leftovers

    from echocare.bundle import generate_keypair
    from echofleet.deploy import CONNECTION, DeployConfig, Deployment
    from edge.build.pipeline import BuildConfig
    from fed.config import RunConfig
    from fed.ledger import PrivacyLedger
    from fed.policy import load_policy

    # the CLI's build with fewer public phantoms and self-test samples (this is the path, not the accuracy)
    monkeypatch.setattr(BuildConfig, "__init__", functools.partialmethod(BuildConfig.__init__, public_limit=4,
                                                                         selftest_samples=1))
    key, pub = generate_keypair(tmp_path / "keys" / "release")
    cfg = DeployConfig(run_dir=tmp_path / "dl", sites=3, data=SITE_DATA, startup_timeout=120, timeout=600, release_pubkey=pub)
    cfg.run_dir.mkdir()
    try:
        with Deployment(cfg) as d:
            d.bring_up()
            fresh_model(d.federation_dir / "global", "classify")
            config = RunConfig.from_run_config(d.run_config())  # what the training run would have recorded
            (d.federation_dir / "report.json").write_text(json.dumps({"config": config.as_run_config()}))
            r = CliRunner().invoke(app, ["edge", "build", str(d.federation_dir), "--target", "onnxruntime-cpu",
                                         "--calib", "sites", "--accept", "sites", "--key", str(key),
                                         "--out", str(tmp_path / "dist"), "--max-auroc-drop", "100",
                                         "--federation", CONNECTION, "--flwr-home", str(d.flwr_home)])
            hospitals = [(h.name, load_policy(h.policy)) for h in d.hospitals]
    finally:
        _kill_leftovers(cfg.run_dir)
    assert _alive_leftovers(cfg.run_dir) == []
    assert r.exit_code == 0, r.output
    for step in ("calibrate", "accept"):  # a progress line per step, and the summary table
        assert f"[federation {CONNECTION}] release step '{step}': run " in r.output, r.output
        assert f"release step '{step}': 3 site(s)" in r.output, r.output
    assert "edge build · onnxruntime-cpu · int8" in r.output and "bundle:" in r.output, r.output
    bundle = next((tmp_path / "dist").glob("*/manifest.json"))
    manifest = json.loads(bundle.read_text())
    cal = manifest["calibration"]
    assert cal["method"] == "federated" and sorted(cal["contributing_sites"]) == ["site-0", "site-1", "site-2"]
    assert manifest["acceptance"]["method"] == "federated" and manifest["acceptance"]["passed"]
    assert sorted(site["site"] for site in manifest["acceptance"]["sites"]) == ["site-0", "site-1", "site-2"]
    for name, policy in hospitals:
        assert policy.release_pubkey and policy.evaluation == "accounted"
        assert [r.kind for r in PrivacyLedger.load(policy.ledger_path).releases] == ["calibrate", "accept"], name
    assert (d.federation_dir / "release" / "plan.npz").is_file()
