"""`make demo`: a 3-hospital DP federation on phantoms, its run report, then a signed edge build
calibrated and accepted by the hospitals themselves (`edge build RUN --calib sites --accept sites`).

No data needed: the embedded default is echofleet's own phantom generator (synthetic B-mode images
from three emulated device vendors, one per hospital). Everything lands in ./demo-run/.
Real BUSI works the same way: DEMO_DATA=busi:../shared/data/busi/Dataset_BUSI_with_GT make demo
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

# No blanket warning filter: the notices a demo used to show (the legacy ONNX exporter's, Flower's
# run_simulation deprecation) are silenced where they arise, by category and message, and anything
# else that warns should be seen.
console = Console()
OUT = Path(os.environ.get("DEMO_OUT", "demo-run")).resolve()
DATA = os.environ.get("DEMO_DATA", "phantom:240?profiles=linear-a,convex-b,linear-c&seed=0")
ROUNDS = int(os.environ.get("DEMO_ROUNDS", "3"))
# Each hospital's lifetime privacy budget: the training run targets epsilon 8, and the federated
# calibration of the edge build is one more charged release (about 0.5 at the default noise), which
# a hospital whose whole budget went into training refuses ("budget exhausted").
SITE_BUDGET = 9.0


def main() -> int:
    from echofleet.cli.fed import print_report
    from echofleet.simulation import SimulationConfig, simulate

    console.print(Rule("echofleet demo"))
    console.print(f"data: [bold]{DATA}[/bold]" + ("  (synthetic phantoms — not patient data)" if DATA.startswith("phantom") else ""))
    if OUT.exists() and not os.environ.get("DEMO_KEEP"):
        shutil.rmtree(OUT / "federation", ignore_errors=True)
        shutil.rmtree(OUT / "edge", ignore_errors=True)
    partition = "by-device" if DATA.startswith("phantom") else "dirichlet:0.5"
    console.print(f"3 hospitals ({partition}), classification, DP-SGD at epsilon 8 per hospital, {ROUNDS} rounds, "
                  "encoder echocare-tiny (seeded random init: no released weights offline); each hospital's "
                  f"lifetime budget is {SITE_BUDGET:g}: the run spends up to 8, the edge release's calibration about 0.5 more")

    console.print(Rule("1. federation (Flower simulation engine)"))
    cfg = SimulationConfig(data=DATA, task="classify", sites=3, partition=partition, rounds=ROUNDS, epsilon=8.0,
                           encoder="echocare-tiny", out=str(OUT / "federation"), local_epochs=2, batch_size=32,
                           site_epsilons=[SITE_BUDGET] * 3,
                           lr=0.5, cache_dir=str(OUT / "feature-cache"), quiet=True)
    from rich.progress import Progress

    with Progress(console=console) as bar:
        t = bar.add_task("rounds", total=ROUNDS)
        report = simulate(cfg, progress=lambda rnd, rl: bar.update(t, completed=rnd))
    print_report(report, OUT / "federation")

    console.print(Rule("2. federated edge release (the hospitals calibrate and accept: no image on this machine)"))
    try:
        from echocare.bundle import generate_keypair
        from edge.build.pipeline import build
    except ImportError as e:  # pragma: no cover - edge extra missing
        console.print(f"[yellow]edge build skipped: {e}[/yellow]")
        return 0
    from echofleet.apps import SimulatedSites
    from edge.build.pipeline import AcceptanceRefused, BuildConfig
    from edge.report import print_build

    key, pub = OUT / "keys" / "release", OUT / "keys" / "release.pub"
    if not key.exists():
        generate_keypair(key)
    run = OUT / "federation"
    hospitals = SimulatedSites(run)
    # A real hospital's IT pins the release key in its own policy (release_pubkey); here the
    # researcher holds the three virtual hospitals, so the demo pins it for them.
    hospitals.pin_release_key(pub.read_bytes())
    _disclose_acceptance(hospitals)
    console.print("the hospitals pin the release key; each runs the calibration on its own training split "
                  "(noisy activation scales, charged to its ledger) and the acceptance on its own validation split "
                  "(the demo hospitals disclose exact acceptance metrics, policy evaluation = \"disclosed\": "
                  "on their ~16 validation images an accounted answer would be too noisy to decide)")
    say = lambda msg: console.print(f"  {msg}")

    def release(precision: str):
        cfg = BuildConfig(precision=precision, inference_precision="f32")
        return hospitals.session(lambda calibrate, accept: build(
            run, "openvino-cpu", "sites" if precision == "int8" else None, None, key, OUT / "edge", config=cfg,
            progress=say, sites=calibrate if precision == "int8" else None, accept=accept))

    try:
        summary = release("int8")
    except AcceptanceRefused as e:
        # An honest outcome: a hospital found that INT8 lost too much accuracy on its own images.
        # the refused candidate's calibration record waits in the build's work folder
        work = e.summary.work_dir if e.summary is not None else None
        record = work / "calibration.json" if work is not None else None
        calibration = json.loads(record.read_text()) if record is not None and record.is_file() else None
        _print_sites(calibration, e.record.to_dict() if e.record is not None else None, "INT8 candidate")
        console.print(f"[yellow]{e}[/yellow]\nbuilding FP32 instead (the hospitals accept it the same way)")
        summary = release("fp32")
    manifest = summary.manifest or {}
    _print_sites(manifest.get("calibration"), manifest.get("acceptance"), f"{summary.precision.upper()} bundle")
    print_build(console, summary)
    console.print(f"\npublic key for scanners: {pub}")
    console.print(f"try: .venv/bin/echofleet edge infer {summary.bundle_dir} IMAGE.png --pubkey {pub}")
    return 0 if summary.ok else 1


def _disclose_acceptance(hospitals) -> None:
    """Demo only: the virtual hospitals answer acceptance with exact metrics (a disclosure their
    policy names and counts), see the message printed in step 2."""
    from dataclasses import replace

    from fed.policy import load_policy, write_policy

    for site in hospitals.sites:
        policy = load_policy(site / "policy.toml")
        if policy.evaluation != "disclosed":
            write_policy(replace(policy, evaluation="disclosed"), site / "policy.toml")


def _print_sites(calibration: dict | None, acceptance: dict | None, what: str) -> None:
    """Each hospital's calibration and acceptance answer (the manifest's sections)."""
    from rich.table import Table

    cal = {a["site"]: a for a in (calibration or {}).get("sites", [])}
    acc = {a["site"]: a for a in (acceptance or {}).get("sites", [])}
    t = Table(title=f"{what}: the hospitals' answers")
    for col in ("hospital", "calibration", "lifetime epsilon", "acceptance", "drop (AUROC points)", "p50 ms"):
        t.add_column(col)
    for site in sorted(set(cal) | set(acc)):
        c, a = cal.get(site, {}), acc.get(site, {})
        eps = c.get("epsilon")
        t.add_row(site, c.get("status", "-") + (f" (noise std {c['noise_std']:g})" if c.get("noise_std") else ""),
                  f"{eps:.2f}" if isinstance(eps, (int, float)) else "-",
                  ("passed" if a.get("passed") else f"refused: {a.get('reason', '')}") if a else "-",
                  f"{a['delta']:+.2f}" if isinstance(a.get("delta"), (int, float)) else "-",
                  f"{a['p50_ms']:.1f}" if isinstance(a.get("p50_ms"), (int, float)) else "-")
    console.print(t)


if __name__ == "__main__":
    sys.exit(main())
