#!/usr/bin/env python
"""A real Flower deployment of echofleet on one machine: one coordinator, three hospitals.

The command line around :func:`echofleet.deploy.deploy`, which does on 127.0.0.1 what
``docs/deploy.md`` tells a coordinator and its hospitals to do (TLS SuperLink with SuperNode
authentication, registered SuperNodes with site policies, one ``flwr run``), then stops every
process it started. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from echofleet.deploy import (
    DEFAULT_DATA,
    PROJECT_ROOT,
    DeployConfig,
    DeployError,
    deploy,
    parse_overrides,
    print_summary,
)


def parse_args(argv: list[str] | None = None) -> DeployConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " See docs/deploy.md.")
    p.add_argument("--run-dir", type=Path, default=PROJECT_ROOT / "runs" / "deploy-localhost",
                   help="empty folder for keys, policies, Flower homes, the SuperLink database, logs and the run "
                        "report (default: runs/deploy-localhost in the repository, which git ignores)")
    p.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"data spec every hospital partitions iid (default: {DEFAULT_DATA})")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument("--encoder", default="echocare-tiny", help="encoder config (default echocare-tiny)")
    p.add_argument("--epsilon", type=float, default=8.0, help="privacy budget per hospital (default 8)")
    p.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="further run-config override (a key of pyproject's [tool.flwr.app.config]; TOML value), "
                        "repeatable, e.g. -c local-epochs=2 -c lr=0.3")
    p.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the Flower app to run (default: this repository)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the federation may take (default 900)")
    p.add_argument("--release-target", default=None, metavar="TARGET",
                   help="then build a signed INT8 edge bundle for TARGET (e.g. onnxruntime-cpu) calibrated at the "
                        "hospitals: a second `flwr run` with mode=\"release\" over the same TLS SuperLink")
    p.add_argument("--release-val", default=None, metavar="DATA_SPEC",
                   help="with --release-target: a central accuracy gate on these labelled (public) images instead of "
                        "the hospitals' federated acceptance (whose accounted answers on small validation splits are "
                        "inconclusive, docs/edge.md)")
    a = p.parse_args(argv)
    if a.sites < 1 or a.rounds < 1:
        p.error("--sites and --rounds must be >= 1")
    try:
        overrides = parse_overrides(a.run_config)
    except ValueError as e:
        p.error(str(e))
    return DeployConfig(run_dir=a.run_dir, sites=a.sites, data=a.data, rounds=a.rounds, encoder=a.encoder,
                        epsilon=a.epsilon, app=a.app.resolve(), run_config=overrides, timeout=a.timeout,
                        release_target=a.release_target, release_val=a.release_val)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through deploy()'s finally: processes are stopped


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = deploy(cfg)
    except DeployError as e:
        print(f"deployment failed: {e}", file=sys.stderr)
        if e.detail:  # the last lines of the log the message names
            print(e.detail, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        return 130
    print_summary(report, Path(cfg.run_dir).resolve())
    if "release" in report:
        r = report["release"]
        sites = ", ".join(f"{a['site']} {a['status']} (epsilon {a['epsilon']})" for a in r.get("calibration", {}).get("sites", []))
        print(f"edge release {'ok' if r['ok'] else 'refused'}: {r.get('tarball') or r.get('reason')}"
              + (f"; calibrated at {sites}" if sites else ""))
        if not r["ok"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
