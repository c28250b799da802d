"""``echofleet edge verify --explain``: a verified bundle's provenance chain, for a hospital's IT or a
regulator. Reads :func:`echocare.bundle.release_chain` (data only) and prints it as a rich tree:
the bundle, the run and the app it came from, what each site disclosed of its privacy spend, how
the model was calibrated, and how (and where) it was accepted. Everything shown was signed."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree


def _fmt(v: object, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return escape(str(v))


def print_release_chain(console: Console, chain: dict) -> None:
    """The chain as a tree; unknown or missing links are said to be missing, never left out."""
    b = chain["bundle"]
    root = Tree(f"[bold]{_fmt(b.get('name'))}-{_fmt(b.get('version'))}[/]  signature OK, every artifact hash OK")
    root.add(f"{_fmt(b.get('task'))} model for {_fmt(b.get('target'))} ({_fmt(b.get('precision'))}), "
             f"device class {_fmt(b.get('device_class'))}, built {_fmt(b.get('created'))}")

    prov = chain.get("provenance")
    run = root.add("[bold]federated training run[/]")
    if prov is None:
        run.add("[yellow]no provenance: not built from a federation run (or built before provenance was recorded)[/]")
    else:
        run.add(f"run id {_fmt(prov['run_id']) if prov['run_id'] else '[yellow]not recorded (report without run config)[/]'}"
                f" · {prov['rounds']} round(s) · strategy {_fmt(prov.get('strategy') or '-')}")
        enc = prov.get("encoder") or {}
        run.add(f"encoder {_fmt(enc.get('config'))}, sha256 "
                + (_fmt(enc.get("sha256")) if enc.get("sha256") else "none (seeded random initialisation, no released weights)"))
        apps = prov.get("apps")
        if not apps:
            run.add("[yellow]app: not recorded by this run[/]")
        for a in apps or []:
            if a["kind"] == "fab":
                run.add(f"app: FAB {_fmt(a.get('fab_id'))} {_fmt(a.get('fab_version'))}, FAB hash {_fmt(a['sha256'])} "
                        f"(the app `flwr run` shipped to every site; Flower run {_fmt(a.get('flower_run_id'), 'd')})")
            else:
                run.add(f"app: simulation, source sha256 {_fmt(a['sha256'])} of {', '.join(a.get('packages') or [])} "
                        "(no FAB is built in simulation; every virtual hospital ran these files)")
        if len(apps or []) > 1:
            run.add(f"[yellow]the run was resumed with {len(apps)} different apps[/]")
        sites = prov.get("epsilon") or {}
        t = Table(title="privacy spent per site (as each site disclosed it: lifetime total on its dataset)")
        for col in ("site", "epsilon", "delta", "unit"):
            t.add_column(col)
        for site, p in sites.items():
            t.add_row(escape(site), _fmt(p.get("epsilon"), ".3f"), _fmt(p.get("delta"), ".2g"), _fmt(p.get("unit")))
        run.add(t if sites else "no site disclosed its epsilon")
        if prov.get("not_private"):  # the insecure deterministic-noise test switch (docs/privacy.md)
            run.add(f"[bold red]NOT PRIVATE: {escape(', '.join(prov['not_private']))} trained with insecure deterministic "
                    "noise (a test switch): the coordinator could remove it; no privacy guarantee holds for this model[/]")

    cal = root.add("[bold]calibration[/]")
    calibration, quantization = chain.get("calibration"), chain.get("quantization")
    if calibration is None and quantization is None:
        cal.add(f"none recorded ({_fmt(b.get('precision'))} build)")
    if isinstance(calibration, dict):
        _add_calibration(cal, calibration)
    elif calibration is not None:
        cal.add(f"calibration: {_json(calibration)}")
    if quantization is not None:
        cal.add(f"quantization: {_json(quantization)}")

    acc = chain.get("acceptance")
    node = root.add("[bold]acceptance[/]")
    if acc is None:
        node.add("[red]no acceptance record: the registry will not promote it to stable without --force --reason[/]")
    else:
        node.add(f"{acc['method']} · metric {_fmt(acc['metric'])} · bound {_fmt(acc['bound'])} · quorum {acc['quorum']} "
                 f"of {len(acc['sites'])} site(s)")
        t = Table()
        for col in ("site", "metric", "drop (fp32 - candidate)", "bound", "p50 ms", "passed", "reason"):
            t.add_column(col, overflow="fold")
        for s in acc["sites"]:
            t.add_row(escape(s["site"]), escape(s["metric"]), _fmt(s["delta"]), _fmt(s["bound"]), _fmt(s["p50_ms"], ".2f"),
                      "[green]yes[/]" if s["passed"] else "[red]no[/]", escape(s.get("reason") or ""))
        node.add(t)
    v = chain["verdict"]
    root.add(f"[bold]verdict:[/] " + (f"[green]accepted[/] ({escape(v['why'])})" if v["accepted"] else f"[red]not accepted[/] ({escape(v['why'])})"))
    for problem in chain.get("problems") or []:
        root.add(f"[red]malformed section: {escape(problem)}[/]")
    console.print(root)


def _json(record: object, limit: int = 600) -> str:
    text = json.dumps(record, sort_keys=True, default=str)
    return escape(text if len(text) <= limit else text[:limit] + " ...")


def _add_calibration(node: Tree, cal: dict) -> None:
    """A calibration record: its scalar fields on one line, the per-site answers as a table."""
    sites = cal.get("sites")
    scalars = {k: v for k, v in cal.items() if k != "sites" and not isinstance(v, (dict, list))}
    node.add(" · ".join(f"{escape(str(k))} {_fmt(v)}" for k, v in scalars.items()) or "calibration")
    for k, v in cal.items():
        if k != "sites" and isinstance(v, (dict, list)):
            node.add(f"{escape(str(k))}: {_json(v)}")
    if isinstance(sites, list) and sites and all(isinstance(x, dict) for x in sites):
        cols = list(dict.fromkeys(k for x in sites for k in x))
        t = Table(title="per site (what each site released for the calibration)")
        for col in cols:
            t.add_column(escape(str(col)), overflow="fold")
        for x in sites:
            t.add_row(*[_fmt(x.get(c)) for c in cols])
        node.add(t)
    elif sites is not None:
        node.add(f"sites: {_json(sites)}")
