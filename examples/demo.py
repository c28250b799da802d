"""`make demo`: a 3-hospital DP federation on phantoms, its run report, then a signed edge build.

No data needed: the embedded default is echofleet's own phantom generator (synthetic B-mode images
from three emulated device vendors, one per hospital). Everything lands in ./demo-run/.
Real BUSI works the same way: DEMO_DATA=busi:../shared/data/busi/Dataset_BUSI_with_GT make demo
"""

from __future__ import annotations

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
                  "encoder echocare-tiny (seeded random init: no released weights offline)")

    console.print(Rule("1. federation (Flower simulation engine)"))
    cfg = SimulationConfig(data=DATA, task="classify", sites=3, partition=partition, rounds=ROUNDS, epsilon=8.0,
                           encoder="echocare-tiny", out=str(OUT / "federation"), local_epochs=2, batch_size=32,
                           lr=0.5, cache_dir=str(OUT / "feature-cache"), quiet=True)
    from rich.progress import Progress

    with Progress(console=console) as bar:
        t = bar.add_task("rounds", total=ROUNDS)
        report = simulate(cfg, progress=lambda rnd, rl: bar.update(t, completed=rnd))
    print_report(report, OUT / "federation")

    console.print(Rule("2. edge build (export → INT8 → accuracy gate → OpenVINO → signed bundle → verify)"))
    try:
        from edge.build.pipeline import build
        from echocare.bundle import generate_keypair
    except ImportError as e:  # pragma: no cover - edge extra missing
        console.print(f"[yellow]edge build skipped: {e}[/yellow]")
        return 0
    from edge.build.gate import GateFailed
    from edge.build.pipeline import BuildConfig
    from edge.report import print_build

    key, pub = OUT / "keys" / "release", OUT / "keys" / "release.pub"
    if not key.exists():
        generate_keypair(key)
    if DATA.startswith("phantom"):
        # fresh phantoms, never seen in training: calibration and acceptance are held out
        calib = "phantom:32?profiles=linear-a,convex-b,linear-c&seed=101"
        val = "phantom:150?profiles=linear-a,convex-b,linear-c&seed=202"
    else:
        calib, val = DATA + ("&" if "?" in DATA else "?") + "limit=32", DATA
    say = lambda msg: console.print(f"  {msg}")  # noqa: E731
    try:
        summary = build(OUT / "federation", "openvino-cpu", calib, val, key, OUT / "edge", progress=say)
    except GateFailed as e:
        # An honest outcome: INT8 lost too much accuracy for this head. Ship the FP32 build instead.
        console.print(f"[yellow]INT8 refused by the accuracy gate: {e}[/yellow]\nbuilding FP32 instead")
        summary = build(OUT / "federation", "openvino-cpu", None, val, key, OUT / "edge",
                        config=BuildConfig(precision="fp32", inference_precision="f32"), progress=say)
    print_build(console, summary)
    console.print(f"\npublic key for scanners: {pub}")
    console.print(f"try: .venv/bin/echofleet edge infer {summary.bundle_dir} IMAGE.png --pubkey {pub}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
