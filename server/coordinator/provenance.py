"""Which app a run ran: ``RUN_DIR/app.json``, written by the ServerApp when it starts.

With ``flwr run`` (a real deployment, or a local SuperLink) Flower ships the app as a FAB and
knows its hash: the coordinator records ``{"kind": "fab", "sha256": <FAB hash>, "fab_id",
"fab_version", "flower_run_id"}`` from ``grid.run``; every SuperNode ran that same FAB. In a
simulation (``flwr.simulation.run_simulation``) no FAB exists (``grid.run.fab_hash`` is empty):
the coordinator records ``{"kind": "source", "sha256": ...}``, a hash of the Python sources of
the packages the ServerApp and ClientApp import (:data:`APP_PACKAGES`), which every virtual
hospital imports from the same files. A resumed run appends its start when the app changed,
so ``app.json`` lists every app that worked on the run. The edge build copies it into the signed
manifest's provenance (:mod:`edge.build.provenance`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from echocare.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

APP_FILE = "app.json"
# What a site and the coordinator execute of this repository (the rest is the CLI and the edge side).
APP_PACKAGES = ("echocare", "fed", "server.coordinator")


def source_sha256(packages: tuple[str, ...] = APP_PACKAGES) -> str:
    """sha256 over (package-relative path, file sha256) of every ``.py`` file of ``packages``, sorted."""
    h = hashlib.sha256()
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"app package {pkg!r} is not importable")
        root = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(root.rglob("*.py")):
            rel = f"{pkg}/{f.relative_to(root).as_posix()}"
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def app_identity(grid: Any) -> dict:
    """This start's app identity from Flower's ``grid.run`` (see the module docstring)."""
    run = getattr(grid, "run", None)
    fab_hash = str(getattr(run, "fab_hash", "") or "")
    run_id = getattr(run, "run_id", None)
    ident: dict = {"flower_run_id": int(run_id) if isinstance(run_id, int) else None}
    if fab_hash:
        return {"kind": "fab", "sha256": fab_hash, "fab_id": str(getattr(run, "fab_id", "") or ""),
                "fab_version": str(getattr(run, "fab_version", "") or ""), **ident}
    return {"kind": "source", "sha256": source_sha256(), "packages": list(APP_PACKAGES), **ident}


def record_app(run_dir: Path, grid: Any) -> dict:
    """Append this start's app to ``RUN_DIR/app.json`` when it differs from the last one; return it.

    Never fails the run: a problem is logged and the run's provenance then says no app was recorded."""
    path = Path(run_dir) / APP_FILE
    try:
        ident = app_identity(grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        starts = read_apps(path) or []
        if not starts or {k: v for k, v in starts[-1].items() if k != "flower_run_id"} != \
                {k: v for k, v in ident.items() if k != "flower_run_id"}:
            starts.append(ident)
            atomic_write_bytes(path, (json.dumps({"apps": starts}, indent=1, sort_keys=True) + "\n").encode())
        return ident
    except Exception as e:  # provenance must not stop a federation; the build reports it as missing
        log.warning("could not record the app identity in %s: %s", path, e)
        return {}


def read_apps(path: Path) -> list[dict] | None:
    """The app identities recorded in ``app.json`` (None: the file is absent or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    apps = data.get("apps") if isinstance(data, dict) else None
    return [a for a in apps if isinstance(a, dict)] if isinstance(apps, list) else None
