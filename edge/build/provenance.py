"""The provenance section of a bundle's signed manifest, from the federation run it was built from.

Sources, all in the run directory the export read (``export.json`` keeps ``run_report`` and the
task model's path ``source`` = ``RUN/global``):

- ``report.json`` (:mod:`server.coordinator.report`): encoder identity, strategy, rounds completed,
  the run config (its hash and run folder give the run id: the run key every site's ledger records
  for this run's releases, :func:`server.coordinator.checkpoint.config_hash`), and each site's
  privacy figures, of which only what the site disclosed (epsilon, delta, unit) is copied;
- ``app.json`` (:mod:`server.coordinator.provenance`): the FAB hash (``flwr run``) or the app's
  source hash (simulation) of every start of the run.

A task model that did not come from a run has no provenance section (None).

:func:`central_acceptance` turns the build machine's own gate (``--val SPEC``, central data) into
the manifest's acceptance record (``method="central"``, one entry named ``central``) when no
federated acceptance record was given, so the registry's stable gate sees how the build was
accepted either way.
"""

from __future__ import annotations

from pathlib import Path

from echocare.bundle import AcceptanceRecord, BundleError, Provenance
from server.coordinator.checkpoint import config_hash
from server.coordinator.provenance import APP_FILE, read_apps


def run_id_of(report: dict) -> str:
    """The run key of a run report: ``<run folder name>-<run-config hash>`` (as the sites' ledgers
    record it); empty when the report carries no run config (then there is no id to give)."""
    config = report.get("config")
    if not isinstance(config, dict) or not config:
        return ""
    return f"{Path(str(config.get('run-dir') or 'run')).name}-{config_hash(config)}"


def disclosed_epsilon(report: dict) -> dict[str, dict]:
    """Each site's latest privacy figures that it disclosed in the run (epsilon, delta, unit)."""
    out: dict[str, dict] = {}
    for r in report.get("rounds") or []:
        for site, entry in (r.get("sites") or {}).items():
            p = entry.get("privacy") or {}
            if p.get("epsilon") is not None:
                out[site] = {"epsilon": p["epsilon"], "delta": p.get("delta"), "unit": p.get("unit") or "image"}
    return dict(sorted(out.items()))


def not_private_sites(report: dict) -> list[str]:
    """The sites that trained with the insecure deterministic-noise test switch in this run (their
    replies say ``not-private``): the coordinator could remove their noise, so nothing they sent is
    private and no privacy guarantee holds for a model built from the run (docs/privacy.md)."""
    return sorted({site for r in report.get("rounds") or [] for site, e in (r.get("sites") or {}).items()
                   if (e.get("train") or {}).get("not-private")})


def run_provenance(info: dict) -> dict | None:
    """``manifest["provenance"]`` for an export ``info`` (None when the model is not from a run)."""
    report = info.get("run_report")
    if not isinstance(report, dict):
        return None
    run_dir = Path(str(info.get("source") or "")).parent if info.get("source") else None
    apps = read_apps(run_dir / APP_FILE) if run_dir is not None else None
    enc = report.get("encoder") or info.get("encoder") or {}
    prov = Provenance.from_dict({
        "run_id": run_id_of(report),
        "apps": apps,
        "encoder": {"config": enc.get("config"), "sha256": enc.get("sha256")},
        "rounds": int(report.get("rounds_completed") or len([r for r in report.get("rounds") or [] if r.get("round", 1) > 0])),
        "strategy": str(report.get("strategy") or ""),
        "epsilon": disclosed_epsilon(report),
        "not_private": not_private_sites(report),
    }, where=str(run_dir or "run report"))
    return prov.to_dict()


def central_acceptance(validation: dict | None) -> dict | None:
    """The acceptance record of a central gate (``model_card["validation"]["gate"]``), or None.

    ``delta`` is the gate's drop (FP32 minus candidate, in the gate's unit, e.g. AUROC points) and
    ``bound`` its bound; a gate that cannot be read as a record gives None (no record, which the
    registry refuses to promote), never a made-up pass."""
    gate = (validation or {}).get("gate") if isinstance(validation, dict) else None
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        return None
    reason = "" if gate["passed"] else str(gate.get("reason") or "")
    try:
        site = {"site": "central", "metric": gate.get("metric"), "delta": gate.get("drop"), "bound": gate.get("bound"),
                "p50_ms": None, "passed": gate["passed"], "reason": reason}
        record = AcceptanceRecord.from_dict({"passed": gate["passed"], "method": "central", "metric": gate.get("metric"),
                                             "bound": gate.get("bound"), "quorum": 1, "sites": [site], "reason": reason})
    except BundleError:
        return None
    return record.to_dict()
