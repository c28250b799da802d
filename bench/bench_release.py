"""Federated vs central INT8 calibration on BUSI: 3 sites, Dirichlet(0.5) label skew.

The same images two ways: **central** calibration (ONNX Runtime's QDQ ``quantize_static`` reading the
pooled images of the three sites' training splits, as ``edge build --calib SPEC`` would) and
**federated** calibration (each site's noisy, clipped activation histograms of its own training
split, charged to its ledger, merged at the coordinator: ``edge build --calib sites``, run here
in-process without Flower so that the figures are the calibration's own). ``--release`` picks what
the sites release: ``scale`` (default: one bounded log-scale number per group of points and a DP
count, :class:`edge.federated.plan.ScalePlan`) or ``histogram`` (per-point activation histograms).
Further rows calibrate from the sites' exact sums (no noise: NOT private, the release's own effect)
and from the public phantoms alone (what the coordinator holds without asking any site).

The noise is random at every run, so one draw says little: ``--draws K --sigmas 8,4,2`` re-noises
the sites' exact sums K times per noise multiplier (the noise a site would add; a measurement, not
a release) and reports the drop's mean and spread with the epsilon each multiplier costs a site
(the trade-off curve). Besides the AUROC drop (on the held-out images: a few hundred images make it
noisy), ``logit RMSE`` measures fidelity to the FP32 model on the same images (lower is closer).

Model: echocare-tiny (seeded random encoder) with a linear head fitted (logistic regression) on the
pooled training splits' features. Metric: macro AUROC on the sites' pooled validation splits (held
out from the fit and from calibration), ONNX Runtime CPU, U8S8 QDQ (the ``onnxruntime-cpu`` target).
Reported per calibration: AUROC drop vs FP32 in points, epsilon each site spent, wall time (sites run
one after the other here), bytes per site (down: the plan; up: the reply's histograms).

    .venv/bin/python bench/bench_release.py [--limit 240] [--release scale] [--draws 3 --sigmas 8,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

SHARED = Path(os.environ.get("ECHOFLEET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LABELS = ["benign", "malignant", "normal"]


def _policies(pool: str, root: Path, sites: int, partition: str):
    from fed.policy import SitePolicy

    return [SitePolicy(data=pool, site_name=f"site-{k}", state_dir=str(root / f"site-{k}"), partition=partition,
                       partition_index=k, partition_count=sites, partition_seed=0) for k in range(sites)]


def _images(policy, cfg, which: str):
    from echocare.preprocess import PreprocessSpec, preprocess_image
    from fed.task import site_split

    xs, ys = [], []
    for s, im in site_split(policy, cfg, which).iter_images():
        xs.append(preprocess_image(im, PreprocessSpec())[0])
        ys.append(LABELS.index(s.label))
    return np.stack(xs), np.array(ys)


def _fit_model(x: np.ndarray, y: np.ndarray, out: Path) -> Path:
    import torch
    from sklearn.linear_model import LogisticRegression

    from echocare.models.encoder import encode, load_encoder, pooled_features
    from echocare.models.heads import build_head, head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model

    encoder, _ = load_encoder("echocare-tiny", None, seed=0)
    with torch.no_grad():
        f = np.concatenate([pooled_features(encode(encoder, torch.from_numpy(x[i:i + 16]))).numpy()
                            for i in range(0, len(x), 16)]).astype(np.float64)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=2000).fit((f - mu) / sd, y)
    head = build_head("classify", "echocare-tiny", len(LABELS))
    head.net[-1].weight.data = torch.tensor(clf.coef_ / sd, dtype=torch.float32)
    head.net[-1].bias.data = torch.tensor(clf.intercept_ - (clf.coef_ * mu / sd).sum(1), dtype=torch.float32)
    save_task_model(out, TaskModelSpec("echocare-tiny", None, None, 0, "classify", LABELS, head_kwargs_of(head)), head.state_dict())
    return out


def _logits(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def _scores(model: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray | None = None) -> dict:
    """AUROC (macro, one-vs-rest) and, given the FP32 logits, the RMSE of the logits against them."""
    from echocare.metrics import auroc_macro_ovr

    logits = _logits(model, x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    out = {"auroc": float(auroc_macro_ovr(y, p / p.sum(1, keepdims=True), len(LABELS)))}
    if reference is not None:
        out["logit_rmse"] = float(np.sqrt(np.mean((logits - reference) ** 2)))
    return out


def _auroc(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    return _scores(model, x, y)["auroc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=240, help="BUSI images in the pool (shared out to the sites)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--release", choices=("scale", "histogram"), default="scale", help="what the sites release")
    ap.add_argument("--grouping", default="sides", help="scale release: 'sides' (one scale for lows, one for highs) or 'points'")
    ap.add_argument("--draws", type=int, default=0, help="re-noise the sites' exact sums this many times per --sigmas value")
    ap.add_argument("--sigmas", default="8", help="noise multipliers for --draws (comma-separated)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    busi = SHARED / "busi" / "Dataset_BUSI_with_GT"
    if not busi.is_dir():
        raise SystemExit(f"error: BUSI not found at {busi} (set ECHOFLEET_SHARED_DATA)")
    from echocare.preprocess import PreprocessSpec
    from edge.build.evaluate import load_calibration
    from edge.build.export import export_task_model
    from edge.build.quantize import QuantizeConfig, prepare_for_qdq, quantize
    from edge.federated.coordinator import PUBLIC_IMAGES, SiteAnswer, derive_ranges, make_plan, merge
    from edge.federated.site import calibrate_round, histogram_sums
    from fed.ledger import PrivacyLedger, epsilon_of
    from fed.task import RoundConfig

    pool = f"busi:{busi}?limit={args.limit}&seed=0"
    root = Path(tempfile.mkdtemp(prefix="bench-release-"))
    cfg = RoundConfig(run_key="bench-release", server_round=0)
    policies = _policies(pool, root / "sites", args.sites, args.partition)
    train = [_images(p, cfg, "train") for p in policies]
    val = [_images(p, cfg, "val") for p in policies]
    xt, yt = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    xv, yv = np.concatenate([v[0] for v in val]), np.concatenate([v[1] for v in val])
    console.print(f"sites' training images {[len(t[1]) for t in train]}, validation {len(yv)} (held out)")
    exp = export_task_model(_fit_model(xt, yt, root / "model"), root / "export", samples=xv[:4])
    prepared = prepare_for_qdq(exp.onnx_path, root / "prepared.onnx")
    qcfg = QuantizeConfig(method="qdq", activations="asymmetric", calibrate_method="minmax")
    reference = _logits(exp.onnx_path, xv)
    rows: dict[str, dict] = {"fp32": _scores(exp.onnx_path, xv, yv, reference)}

    t0 = time.perf_counter()
    central = quantize(prepared, xt, root / "central", QuantizeConfig(**{**qcfg.to_dict(), "calib_size": len(xt)}), prepared=True)
    rows["central"] = {"seconds": time.perf_counter() - t0, "model": central.model_path}

    t0 = time.perf_counter()
    plan = make_plan(prepared, qcfg.op_types, load_calibration(PUBLIC_IMAGES, PreprocessSpec(), limit=24),
                     kind=args.release, grouping=args.grouping)
    plan_s = time.perf_counter() - t0
    down = sum(a.nbytes for a in plan.to_arrays().values())
    answers, site_s = [], []
    for p in policies:
        t1 = time.perf_counter()
        r = calibrate_round(p, cfg, plan.to_arrays())
        site_s.append(time.perf_counter() - t1)
        answers.append(SiteAnswer(r.site, r.status, r.reason, r.arrays["histograms"] if r.arrays else None,
                                  float(r.metrics.get("noise-std", 0.0))))
    merged = merge(answers, plan)
    ranges = derive_ranges(merged, plan, "minmax")
    fed_q = quantize(prepared, None, root / "federated", qcfg, ranges=ranges.ranges, prepared=True)
    rows[f"federated ({args.release}, sigma {policies[0].evaluation_noise_multiplier:g})"] = {"seconds": time.perf_counter() - t0, "model": fed_q.model_path, "plan_seconds": plan_s,
                         "site_seconds": site_s, "bytes_down_per_site": down,
                         "bytes_up_per_site": int(np.mean([a.histograms.nbytes for a in answers if a.histograms is not None])),
                         "epsilon_per_site": [round(PrivacyLedger.load(p.ledger_path).epsilon(), 3) for p in policies],
                         "notes": ranges.notes}
    public_only = {p: (float(lo), float(hi)) for p, (lo, hi) in zip(plan.points, plan.public_ranges)}
    rows["public phantoms only (no site data)"] = {
        "model": quantize(prepared, None, root / "public", qcfg, ranges=public_only, prepared=True).model_path}
    exact_sums = [histogram_sums(plan, t[0])[0] for t in train]
    exact = merge([SiteAnswer(p.site_name, "ok", histograms=e) for p, e in zip(policies, exact_sums)], plan)
    rows["federated, no noise (NOT private)"] = {
        "model": quantize(prepared, None, root / "exact", qcfg, ranges=derive_ranges(exact, plan, "minmax").ranges,
                          prepared=True).model_path}
    rng = np.random.default_rng()
    for sigma in ([float(v) for v in args.sigmas.split(",")] if args.draws > 0 else []):
        draws = []
        for d in range(args.draws):
            noisy = [SiteAnswer(p.site_name, "ok", histograms=e + rng.normal(0.0, sigma * plan.sensitivity, e.shape),
                                noise_std=sigma * plan.sensitivity) for p, e in zip(policies, exact_sums)]
            r = derive_ranges(merge(noisy, plan), plan, "minmax")
            draws.append(_scores(quantize(prepared, None, root / f"draw-{sigma:g}-{d}", qcfg, ranges=r.ranges,
                                          prepared=True).model_path, xv, yv, reference))
        rows[f"federated ({args.release}), sigma {sigma:g}, {args.draws} noise draws"] = {
            "auroc": float(np.mean([d["auroc"] for d in draws])), "draws": draws,
            "drop_sd_points": round(100 * float(np.std([d["auroc"] for d in draws])), 2),
            "logit_rmse": float(np.mean([d["logit_rmse"] for d in draws])),
            "epsilon_per_site": round(epsilon_of([(sigma, 1.0, 1)], 1e-5), 3)}
    table = Table("calibration", "AUROC", "drop vs FP32 (points)", "logit RMSE", "epsilon per site", "wall s", "bytes down / up per site")
    fp32 = rows["fp32"]["auroc"]
    for name, row in rows.items():
        if "model" in row:
            row.update(_scores(row.pop("model"), xv, yv, reference))
        row["drop_points"] = round(100 * (fp32 - row["auroc"]), 2)
        drop = f"{row['drop_points']:+.2f}" + (f" +- {row['drop_sd_points']:.2f}" if "drop_sd_points" in row else "")
        table.add_row(name, f"{row['auroc']:.4f}", drop, f"{row.get('logit_rmse', 0.0):.3f}", str(row.get("epsilon_per_site", "-")),
                      f"{row['seconds']:.0f}" if "seconds" in row else "-",
                      f"{row['bytes_down_per_site'] / 1e6:.1f} MB / {row['bytes_up_per_site']:,} B" if "bytes_down_per_site" in row else "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"limit": args.limit, "sites": args.sites, "partition": args.partition,
                                         "release": args.release, "grouping": args.grouping,
                                         "train_images": [len(t[1]) for t in train], "val_images": len(yv), "rows": rows},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
