"""The run report: report.json, report.csv, PNG plots and MODEL_CARD.md in the run directory.

For every round and every site: the metrics and the privacy figures ``epsilon``, ``delta``,
``noise_multiplier``, ``sample_rate``, ``steps`` (cumulative DP-SGD steps), ``accountant`` and
``unit``: what the site's guarantee protects, ``"patient"`` (user-level DP: all of one patient's
images) or ``"image"`` (one image; a site that does not know its patients, or an older site that
does not say, is reported per image).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps")
UNIT_KEY = "privacy_unit"  # what the strategy records from a reply's "privacy-unit"


def build_report(run: dict, rounds: dict[int, dict]) -> dict:
    """``rounds``: round -> RoundLog as dict. Returns the JSON-able report."""
    out_rounds = []
    for rnd in sorted(rounds):
        rl = rounds[rnd]
        sites = {}
        for site in sorted(set(rl.get("train", {})) | set(rl.get("evaluate", {})) | set(rl.get("rejected", {}))):
            t = rl.get("train", {}).get(site, {})
            entry = {"status": t.get("status", "not-trained"),
                     "train": {k: v for k, v in t.items() if k not in PRIVACY_KEYS and k not in ("status", "dp-weight", "device", UNIT_KEY)},
                     "evaluate": rl.get("evaluate", {}).get(site, {})}
            if any(k in t for k in PRIVACY_KEYS):
                entry["privacy"] = {**{k: t.get(k) for k in PRIVACY_KEYS}, "accountant": "rdp", "unit": t.get(UNIT_KEY) or "image"}
                if entry["privacy"]["steps"] is not None:
                    entry["privacy"]["steps"] = int(entry["privacy"]["steps"])
            if "device" in t:  # the site's compute device class, e.g. "cuda:H200" or "cpu" (a capability)
                entry["device"] = t["device"]
            if site in rl.get("rejected", {}):
                entry["rejected"] = rl["rejected"][site]
            sites[site] = entry
        out_rounds.append({"round": rnd, "sites": sites, "excluded": rl.get("excluded", []),
                           "aggregated": {"train": rl.get("aggregated_train", {}), "evaluate": rl.get("aggregated_evaluate", {})},
                           **({"central_dp": rl["central_dp"]} if rl.get("central_dp") else {})})
    devices = {site: e["device"] for r in out_rounds for site, e in r["sites"].items() if "device" in e}
    return {**run, "site_devices": dict(sorted(devices.items())), "rounds": out_rounds}


def write_csv(report: dict, path: Path) -> None:
    rows = []
    for r in report["rounds"]:
        for site, e in r["sites"].items():
            row = {"round": r["round"], "site": site, "status": e["status"], "rejected": e.get("rejected", "")}
            row.update({f"train_{k}": v for k, v in e["train"].items()})
            row.update({f"eval_{k}": v for k, v in e["evaluate"].items()})
            row.update({k: v for k, v in e.get("privacy", {}).items()})
            rows.append(row)
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def write_plots(report: dict, out_dir: Path, metric: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds if metric in r["aggregated"]["evaluate"]]
    ax.plot(xs, [r["aggregated"]["evaluate"][metric] for r in rounds if metric in r["aggregated"]["evaluate"]],
            "k-o", label="federated (weighted)")
    for site in sorted({s for r in rounds for s in r["sites"]}):
        pts = [(r["round"], r["sites"][site]["evaluate"][metric]) for r in rounds
               if site in r["sites"] and metric in r["sites"][site]["evaluate"]]
        if pts:
            ax.plot(*zip(*pts), "--.", alpha=0.7, label=site)
    ax.set(xlabel="round", ylabel=metric, title=f"{metric} per round (site validation splits)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{metric}_per_round.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for site in sorted({s for r in rounds for s in r["sites"]}):
        pts = [(r["round"], r["sites"][site]["privacy"]["epsilon"]) for r in rounds
               if site in r["sites"] and "privacy" in r["sites"][site] and r["sites"][site]["privacy"]["epsilon"] is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", label=site)
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="Privacy spent per site (RDP accountant)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "epsilon_per_site.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def model_card(report: dict) -> str:
    last = report["rounds"][-1] if report["rounds"] else {"sites": {}, "aggregated": {"evaluate": {}}}
    final_eps = {}
    for r in report["rounds"]:
        for site, e in r["sites"].items():
            if e.get("privacy", {}).get("epsilon") is not None:
                final_eps[site] = e["privacy"]
    enc = report["encoder"]
    lines = [
        f"# Model card — {report['task']} head on EchoCare ({enc['config']})", "",
        f"Trained by federated learning with differential privacy (DP-SGD) at each site, {_unit_words(final_eps)}.", "",
        "## Model",
        f"- Encoder: `{enc['config']}` (frozen), checkpoint sha256: `{enc.get('sha256') or 'none — seeded random init (seed %s), no released weights used' % enc.get('seed')}`",
        f"- Task: `{report['task']}`; labels: {', '.join(report['labels'])}",
        f"- Head: {json.dumps(report.get('head', {}))}",
        f"- Strategy: {report['strategy']}; rounds: {report['rounds_completed']} of {report['num_rounds']}",
        "", "## Sites", "",
        "| site | privacy unit | final epsilon | delta | noise multiplier | sample rate | DP-SGD steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, p in sorted(final_eps.items()):
        shown = lambda k, fmt: "not disclosed" if p.get(k) is None else format(p[k], fmt)  # noqa: E731  (site policy: docs/privacy.md)
        lines.append(f"| {site} | per {p.get('unit') or 'image'} | {p['epsilon']:.3f} | {p['delta']:.2g} | "
                     f"{shown('noise_multiplier', '.3f')} | {shown('sample_rate', '.4f')} | {shown('steps', 'd')} |")
    not_private = sorted({s for r in report["rounds"] for s, e in r["sites"].items() if e.get("train", {}).get("not-private")})
    if not_private:  # a site's policy set insecure_deterministic_noise (tests only): docs/privacy.md
        lines += ["", f"**NOT PRIVATE: {', '.join(not_private)} trained with insecure deterministic noise (a test "
                      "switch); the coordinator could remove it. No privacy guarantee holds for this model.**"]
    if report.get("site_devices"):
        lines += ["", "Compute device of each site (as it reported it): " +
                  ", ".join(f"{s} {d}" for s, d in report["site_devices"].items())]
    excluded = sorted({s for r in report["rounds"] for s in r["excluded"]})
    if excluded:
        lines += ["", f"Sites excluded after exhausting their privacy budget: {', '.join(excluded)}"]
    lines += ["", "## Final metrics (federated evaluation on each site's held-out split)", ""]
    for k, v in sorted(last["aggregated"]["evaluate"].items()):
        lines.append(f"- {k}: {v:.4f}")
    lines += ["", "## DP parameters",
              f"- per-example clipping norm: {report['dp']['max_grad_norm']}; accountant: RDP; "
              f"target epsilon per site: {report['dp']['target_epsilon']}",
              f"- Guarantee: (epsilon, delta)-DP per site, {_unit_words(final_eps)}; epsilon is each site's lifetime total on its dataset (every run and every release, docs/privacy.md).",
              "", "Images, features, file names and patient fields never left the sites.", ""]
    return "\n".join(lines)


def _unit_words(final: dict[str, dict]) -> str:
    """What the guarantee protects, in words, from each site's reported unit ("image" when unsaid)."""
    units = {site: (p.get("unit") or "image") for site, p in final.items()}
    if units and set(units.values()) == {"patient"}:
        return "at the level of one patient (user-level DP: all of a patient's images together)"
    patients = sorted(s for s, u in units.items() if u == "patient")
    if patients:
        return (f"at the level of one patient at {', '.join(patients)} and of one training image at the other sites "
                "(a patient with k images there is protected roughly k times more weakly)")
    return ("at the level of one training image (per image: a patient with k images is protected roughly "
            "k times more weakly)")


def write_report(run_dir: Path, run: dict, rounds: dict[int, dict], metric: str) -> dict:
    report = build_report(run, rounds)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=float))
    write_csv(report, run_dir / "report.csv")
    write_plots(report, run_dir, metric)
    (run_dir / "MODEL_CARD.md").write_text(model_card(report))
    return report
