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

**Paired over independent splits** (``--splits K``): one draw of one split cannot tell federated
from central within 0.5 AUROC points (the INT8 AUROC moves by about a point when a range moves by
1 %). K independent splits of the pool (split k: Dirichlet partition seed k, train/validation seed
k, ``--val-fraction`` of each site held out) each get their own FP32 model (head fitted on the
split's training union), central calibration (ONNX Runtime on the pooled training images) and
federated calibration (the sites' real charged ``calibrate_round``, the policy's noise), both
quantized the same way and scored on **the same validation images**; per split the paired
difference ``d = drop_federated - drop_central`` (also for logit RMSE vs FP32 and top-1 agreement
with FP32), and over splits its mean, standard error and the t-based one-sided 95 % bounds (the
two together: a 90 % interval, i.e. two one-sided tests). Results are written after every split
(``--json``), so an interrupted run keeps what finished.

    .venv/bin/python bench/bench_release.py [--limit 240] [--release scale] [--draws 3 --sigmas 8,2] [--json out.json]
    .venv/bin/python bench/bench_release.py --limit 780 --val-fraction 0.5 --splits 8 --json splits.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
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


def _policies(pool: str, root: Path, sites: int, partition: str, seed: int = 0):
    from fed.policy import SitePolicy

    return [SitePolicy(data=pool, site_name=f"site-{k}", state_dir=str(root / f"site-{k}"), partition=partition,
                       partition_index=k, partition_count=sites, partition_seed=seed) for k in range(sites)]


class ArrayCache(dict):
    """Sample key -> array, in memory and, given a folder, on disk (one ``.npy`` a key, written
    atomically) so that a resumed ``--splits`` run neither preprocesses nor encodes an image again."""

    def __init__(self, folder: Path | None = None):
        super().__init__()
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        if self.folder is None or not isinstance(key, str) or not self._file(key).is_file():
            return False
        super().__setitem__(key, np.load(self._file(key), allow_pickle=False))
        return True

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        super().__setitem__(key, value)
        if self.folder is not None:
            from echocare.atomic import atomic_write_bytes

            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            atomic_write_bytes(self._file(key), buf.getvalue())


def _images(policy, cfg, which: str, cache: dict[str, np.ndarray] | None = None):
    """(preprocessed images, labels, sample keys) of the site's split; ``cache`` (key -> image) is
    shared between splits of the same pool so that an image is preprocessed once."""
    from echocare.preprocess import PreprocessSpec, preprocess_image
    from fed.task import site_split

    cache = {} if cache is None else cache
    data = site_split(policy, cfg, which)
    for s, im in data.iter_images() if any(s.key not in cache for s in data.samples) else ():
        if s.key not in cache:
            cache[s.key] = preprocess_image(im, PreprocessSpec())[0]
    keys = [s.key for s in data.samples if s.key in cache]
    labels = {s.key: s.label for s in data.samples}
    return np.stack([cache[k] for k in keys]), np.array([LABELS.index(labels[k]) for k in keys]), keys


def _features(x: np.ndarray, keys: list[str] | None = None, cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """echocare-tiny's (seeded random encoder) pooled features of ``x``; ``cache`` by sample key."""
    import torch

    from echocare.models.encoder import encode, load_encoder, pooled_features

    cache = {} if cache is None else cache
    keys = keys if keys is not None else [str(i) for i in range(len(x))]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        encoder, _ = load_encoder("echocare-tiny", None, seed=0)
        with torch.no_grad():
            for j in range(0, len(todo), 16):
                idx = todo[j:j + 16]
                f = pooled_features(encode(encoder, torch.from_numpy(x[idx]))).numpy().astype(np.float64)
                for i, row in zip(idx, f):
                    cache[keys[i]] = row
    return np.stack([cache[k] for k in keys])


def _fit_model(f: np.ndarray, y: np.ndarray, out: Path) -> Path:
    """A task model: echocare-tiny with a linear head fitted (logistic regression) on features ``f``."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from echocare.models.heads import build_head, head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model

    mu, sd = f.mean(0), f.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=2000).fit((f - mu) / sd, y)
    head = build_head("classify", "echocare-tiny", len(LABELS))
    head.net[-1].weight.data = torch.tensor(clf.coef_ / sd, dtype=torch.float32)
    head.net[-1].bias.data = torch.tensor(clf.intercept_ - (clf.coef_ * mu / sd).sum(1), dtype=torch.float32)
    save_task_model(out, TaskModelSpec("echocare-tiny", None, None, 0, "classify", LABELS, head_kwargs_of(head)), head.state_dict())
    return out


def _logits(model: Path, x: np.ndarray, threads: int = 0) -> np.ndarray:
    """The model's logits on ``x`` (ONNX Runtime CPU); ``threads`` 0: ONNX Runtime's default."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:  # a busy shared machine: one thread that sleeps when idle wastes no core on spinning
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def _scores(model: Path | np.ndarray, x: np.ndarray, y: np.ndarray, reference: np.ndarray | None = None,
            threads: int = 0) -> dict:
    """AUROC (macro, one-vs-rest) of ``model`` (or of logits already computed) and, given the FP32
    logits, the RMSE of the logits against them and the share of images whose top-1 class is FP32's
    (``top1_agreement``)."""
    from echocare.metrics import auroc_macro_ovr

    logits = model if isinstance(model, np.ndarray) else _logits(model, x, threads)
    p = np.exp(logits - logits.max(1, keepdims=True))
    out = {"auroc": float(auroc_macro_ovr(y, p / p.sum(1, keepdims=True), len(LABELS)))}
    if reference is not None:
        out["logit_rmse"] = float(np.sqrt(np.mean((logits - reference) ** 2)))
        out["top1_agreement"] = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    return out


def _auroc(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    return _scores(model, x, y)["auroc"]


def _qdq_config():
    from edge.build.quantize import QuantizeConfig

    return QuantizeConfig(method="qdq", activations="asymmetric", calibrate_method="minmax")


def _central(prepared: Path, xt: np.ndarray, out: Path) -> tuple[Path, float]:
    """ONNX Runtime's own calibration on the pooled training images (``edge build --calib SPEC``)."""
    from edge.build.quantize import QuantizeConfig, quantize

    t0 = time.perf_counter()
    qcfg = _qdq_config()
    central = quantize(prepared, xt, out, QuantizeConfig(**{**qcfg.to_dict(), "calib_size": len(xt)}), prepared=True)
    return central.model_path, time.perf_counter() - t0


def _federated(prepared: Path, policies, cfg, public_images: np.ndarray, release: str, grouping: str, out: Path):
    """The sites' real charged release (``calibrate_round``, one after the other, in-process), merged and
    turned into ranges by the coordinator's code, quantized like central. Returns (model, row, plan, ranges)."""
    from edge.build.quantize import quantize
    from edge.federated.coordinator import SiteAnswer, derive_ranges, make_plan, merge
    from edge.federated.site import calibrate_round
    from fed.ledger import PrivacyLedger

    t0 = time.perf_counter()
    qcfg = _qdq_config()
    plan = make_plan(prepared, qcfg.op_types, public_images, kind=release, grouping=grouping)
    plan_s = time.perf_counter() - t0
    down = sum(a.nbytes for a in plan.to_arrays().values())
    answers, site_s = [], []
    for p in policies:
        t1 = time.perf_counter()
        r = calibrate_round(p, cfg, plan.to_arrays())
        site_s.append(time.perf_counter() - t1)
        answers.append(SiteAnswer(r.site, r.status, r.reason, r.arrays["histograms"] if r.arrays else None,
                                  float(r.metrics.get("noise-std", 0.0))))
    ranges = derive_ranges(merge(answers, plan), plan, "minmax")
    model = quantize(prepared, None, out, qcfg, ranges=ranges.ranges, prepared=True).model_path
    row = {"seconds": time.perf_counter() - t0, "plan_seconds": plan_s, "site_seconds": site_s,
           "bytes_down_per_site": down,
           "bytes_up_per_site": int(np.mean([a.histograms.nbytes for a in answers if a.histograms is not None])),
           "epsilon_per_site": [round(PrivacyLedger.load(p.ledger_path).epsilon(), 3) for p in policies],
           "scales_applied": [float(v) for v in ranges.scales],
           "notes": ranges.notes}
    return model, row, plan, ranges


def _public_images() -> np.ndarray:
    from echocare.preprocess import PreprocessSpec
    from edge.build.evaluate import load_calibration
    from edge.federated.coordinator import PUBLIC_IMAGES

    return load_calibration(PUBLIC_IMAGES, PreprocessSpec(), limit=24)


def _public_only(prepared: Path, plan, out: Path) -> Path:
    """The public phantoms' ranges alone (what the coordinator holds without asking any site)."""
    from edge.build.quantize import quantize

    ranges = {p: (float(lo), float(hi)) for p, (lo, hi) in zip(plan.points, plan.public_ranges)}
    return quantize(prepared, None, out, _qdq_config(), ranges=ranges, prepared=True).model_path


def _split_data(policies, cfg, images: dict[str, np.ndarray], features: dict[str, np.ndarray]):
    """The sites' training and validation images, pooled: (xt, yt, ft, xv, yv, train sizes)."""
    train = [_images(p, cfg, "train", images) for p in policies]
    val = [_images(p, cfg, "val", images) for p in policies]
    xt, yt = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    xv, yv = np.concatenate([v[0] for v in val]), np.concatenate([v[1] for v in val])
    ft = _features(xt, [k for t in train for k in t[2]], features)
    return xt, yt, ft, xv, yv, [len(t[1]) for t in train]


def _model(xt_features: np.ndarray, yt: np.ndarray, xv: np.ndarray, root: Path) -> tuple[Path, Path]:
    """(FP32 ONNX, the same pre-processed for QDQ: the model both calibrations quantize)."""
    from edge.build.export import export_task_model
    from edge.build.quantize import prepare_for_qdq

    exp = export_task_model(_fit_model(xt_features, yt, root / "model"), root / "export", samples=xv[:4])
    return exp.onnx_path, prepare_for_qdq(exp.onnx_path, root / "prepared.onnx")


# ------------------------------------------------------------------ paired over independent splits
def paired_summary(d: np.ndarray, bound: float) -> dict:
    """Mean +- standard error of the per-split paired differences ``d`` and Student-t one-sided 95 %
    bounds (lower, upper: together a 90 % interval, two one-sided tests). ``within``: the interval lies
    inside [-bound, +bound] (equivalence); ``not_worse``: the upper bound is at most ``bound``."""
    from scipy.stats import t

    d = np.asarray(d, np.float64)
    k = len(d)
    mean = float(d.mean())
    if k < 2:
        return {"splits": k, "mean": mean}
    sd = float(d.std(ddof=1))
    se = sd / np.sqrt(k)
    q = float(t.ppf(0.95, k - 1))
    lo, hi = mean - q * se, mean + q * se
    return {"splits": k, "mean": mean, "sd": sd, "se": float(se), "t95": q, "lower95": float(lo), "upper95": float(hi),
            "within": bool(-bound < lo and hi < bound), "not_worse": bool(hi <= bound)}


def paired_split(k: int, pool: str, args, root: Path, images: dict, features: dict, public: np.ndarray) -> dict:
    """Split ``k`` (partition seed k, train/val seed k): FP32, central and federated INT8 (and the
    public phantoms' ranges) scored on the same validation images; the paired differences."""
    from edge.federated.plan import ScalePlan
    from fed.task import RoundConfig

    t0 = time.perf_counter()
    cfg = RoundConfig(run_key=f"bench-release-split-{k}", server_round=0, seed=k, val_fraction=args.val_fraction)
    policies = _policies(pool, root / "sites", args.sites, args.partition, seed=k)
    xt, yt, ft, xv, yv, sizes = _split_data(policies, cfg, images, features)
    fp32, prepared = _model(ft, yt, xv, root)
    reference = _logits(fp32, xv, threads=1)
    base = _scores(reference, xv, yv)["auroc"]
    central, central_s = _central(prepared, xt, root / "central")
    fed, fed_row, plan, ranges = _federated(prepared, policies, cfg, public, args.release, args.grouping, root / "federated")
    rows = {"central": {**_scores(central, xv, yv, reference, threads=1), "seconds": central_s},
            "federated": {**_scores(fed, xv, yv, reference, threads=1), **fed_row}}
    # the public phantoms' ranges: the federated model itself when the sites' release changed no range
    same = set(ranges.public_fallback) == set(plan.points) or not any(ranges.scales)
    rows["public"] = dict(rows["federated"]) if same and isinstance(plan, ScalePlan) else \
        _scores(_public_only(prepared, plan, root / "public"), xv, yv, reference, threads=1)
    rows["public"] = {k: rows["public"][k] for k in ("auroc", "logit_rmse", "top1_agreement")}
    for row in rows.values():
        row["drop_points"] = 100 * (base - row["auroc"])
    c, f = rows["central"], rows["federated"]
    return {"split": k, "train_images": sizes, "val_images": len(yv), "val_per_label": np.bincount(yv, minlength=len(LABELS)).tolist(),
            "fp32_auroc": base, **{name: row for name, row in rows.items()},
            "d_drop_points": f["drop_points"] - c["drop_points"], "d_logit_rmse": f["logit_rmse"] - c["logit_rmse"],
            "d_top1_agreement_points": 100 * (f["top1_agreement"] - c["top1_agreement"]),
            "seconds": time.perf_counter() - t0}


def _summaries(done: list[dict], bound: float) -> dict[str, dict]:
    """:func:`paired_summary` of the AUROC drop (against ``bound``), logit RMSE and top-1 agreement."""
    return {name: paired_summary([r[key] for r in done], b)
            for name, key, b in (("drop_points", "d_drop_points", bound), ("logit_rmse", "d_logit_rmse", float("inf")),
                                 ("top1_agreement_points", "d_top1_agreement_points", float("inf")))}


def run_splits(args, pool: str, console: Console) -> None:
    """``--splits K``: :func:`paired_split` for k = 0..K-1, a row each, then the paired summary."""
    from echocare.atomic import atomic_write_bytes

    settings = {"pool": pool, "sites": args.sites, "partition": args.partition, "release": args.release,
                "grouping": args.grouping, "val_fraction": args.val_fraction, "bound_points": args.bound}
    done: list[dict] = []
    earlier_s = 0.0
    if args.resume:
        if args.json is None or not args.json.is_file():
            raise SystemExit(f"error: --resume: no earlier results at --json {args.json}")
        old = json.loads(args.json.read_text())
        changed = [k for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise SystemExit(f"error: --resume: {args.json} was made with other settings ({', '.join(changed)})")
        done, earlier_s = old["splits"], float(old["wall_seconds"])
        console.print(f"resuming: splits {[r['split'] for r in done]} already in {args.json}")
    root = Path(tempfile.mkdtemp(prefix="bench-release-splits-"))
    images = ArrayCache(args.cache_dir / "images" if args.cache_dir else None)
    features = ArrayCache(args.cache_dir / "features" if args.cache_dir else None)
    public = _public_images()
    t0 = time.perf_counter() - earlier_s
    for k in range(args.first_split, args.first_split + args.splits):
        if any(r["split"] == k for r in done):
            continue
        r = paired_split(k, pool, args, root / f"split-{k}", images, features, public)
        done.append(r)
        f = r["federated"]
        console.print(f"split {k}: train {r['train_images']} val {r['val_images']} {r['val_per_label']}; FP32 {r['fp32_auroc']:.4f}; "
                      f"drop central {r['central']['drop_points']:+.2f} federated {f['drop_points']:+.2f} "
                      f"public {r['public']['drop_points']:+.2f} -> d {r['d_drop_points']:+.2f}; "
                      f"RMSE {r['central']['logit_rmse']:.3f} / {f['logit_rmse']:.3f}; "
                      f"agree {r['central']['top1_agreement']:.3f} / {f['top1_agreement']:.3f}; "
                      f"eps {f['epsilon_per_site']}; scales {f['scales_applied']}; {r['seconds']:.0f} s")
        summary = _summaries(done, args.bound)
        if args.json:
            atomic_write_bytes(args.json, json.dumps({**settings, "wall_seconds": time.perf_counter() - t0, "splits": done,
                                                      "paired": summary}, indent=1, default=str).encode())
    report_splits(done, args.bound, time.perf_counter() - t0, console)


def report_splits(done: list[dict], bound: float, wall_s: float, console: Console) -> None:
    """The table per split and the paired summary."""
    table = Table("split", "train (sites)", "val", "FP32 AUROC", "drop central", "drop federated", "d (fed - central)",
                  "RMSE central / fed", "top-1 agree central / fed", "scales applied")
    for r in sorted(done, key=lambda r: r["split"]):
        c, f = r["central"], r["federated"]
        table.add_row(str(r["split"]), "/".join(map(str, r["train_images"])), str(r["val_images"]), f"{r['fp32_auroc']:.4f}",
                      f"{c['drop_points']:+.2f}", f"{f['drop_points']:+.2f}", f"{r['d_drop_points']:+.2f}",
                      f"{c['logit_rmse']:.3f} / {f['logit_rmse']:.3f}", f"{c['top1_agreement']:.3f} / {f['top1_agreement']:.3f}",
                      str(f["scales_applied"]))
    console.print(table)
    summary = _summaries(done, bound)
    table = Table("paired difference (federated - central)", "mean", "SE", "one-sided 95 % lower", "one-sided 95 % upper")
    for name, s in summary.items():
        if "se" in s:
            table.add_row(name, f"{s['mean']:+.3f}", f"{s['se']:.3f}", f"{s['lower95']:+.3f}", f"{s['upper95']:+.3f}")
    console.print(table)
    s = summary["drop_points"]
    if "se" in s:
        console.print(f"AUROC drop, {s['splits']} splits: federated - central = {s['mean']:+.2f} +- {s['se']:.2f} points; "
                      f"90 % interval [{s['lower95']:+.2f}, {s['upper95']:+.2f}]: within +-{bound:g}: {s['within']}; "
                      f"not worse by more than {bound:g} (upper bound): {s['not_worse']}; wall {wall_s:.0f} s")


def merge_splits(files: list[Path], out: Path | None, console: Console) -> None:
    """``--merge``: the splits of several ``--splits`` results files made with the same settings (e.g.
    two processes over disjoint seeds), reported together and written to ``out``."""
    from echocare.atomic import atomic_write_bytes

    runs = []
    for f in files:
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --merge {f}: not a --splits results file ({e})") from None
    keys = ("pool", "sites", "partition", "release", "grouping", "val_fraction", "bound_points")
    for f, r in zip(files[1:], runs[1:]):
        changed = [k for k in keys if r.get(k) != runs[0].get(k)]
        if changed:
            raise SystemExit(f"error: --merge {f}: made with other settings than {files[0]} ({', '.join(changed)})")
    done = list({r["split"]: r for run in runs for r in run["splits"]}.values())
    wall = sum(float(r.get("wall_seconds", r.get("wall_seconds_summed", 0.0))) for r in runs)  # a merged file can be merged again
    report_splits(done, runs[0]["bound_points"], wall, console)
    if out:
        atomic_write_bytes(out, json.dumps({**{k: runs[0][k] for k in keys}, "merged_from": [str(f) for f in files],
                                            "wall_seconds_summed": wall, "splits": done,
                                            "paired": _summaries(done, runs[0]["bound_points"])}, indent=1, default=str).encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=240, help="BUSI images in the pool (shared out to the sites)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--release", choices=("scale", "histogram"), default="scale", help="what the sites release")
    ap.add_argument("--grouping", default="sides", help="scale release: 'sides' (one scale for lows, one for highs) or 'points'")
    ap.add_argument("--draws", type=int, default=0, help="re-noise the sites' exact sums this many times per --sigmas value")
    ap.add_argument("--sigmas", default="8", help="noise multipliers for --draws (comma-separated)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="share of each site's images held out for validation (default: the run config's, 0.2)")
    ap.add_argument("--splits", type=int, default=0, help="paired design over this many independent splits (module docstring)")
    ap.add_argument("--first-split", type=int, default=0, help="--splits: seed of the first split")
    ap.add_argument("--bound", type=float, default=0.5, help="--splits: the target bound on the paired AUROC difference, points")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="--splits: keep the preprocessed images and their features here (reused by a resumed run)")
    ap.add_argument("--resume", action="store_true", help="--splits: keep the splits already in --json (same settings) and run the rest")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="report the splits of these --splits results files together (written to --json)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    if args.merge:
        merge_splits(args.merge, args.json, console)
        return
    busi = SHARED / "busi" / "Dataset_BUSI_with_GT"
    if not busi.is_dir():
        raise SystemExit(f"error: BUSI not found at {busi} (set ECHOFLEET_SHARED_DATA)")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise SystemExit(f"error: --val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.splits < 0:
        raise SystemExit(f"error: --splits must be 0 (one run, no pairing) or a number of splits, got {args.splits}")
    if args.resume and not args.splits:
        raise SystemExit("error: --resume continues a --splits run: give --splits and --json")
    from edge.federated.coordinator import SiteAnswer, derive_ranges, merge
    from edge.federated.site import histogram_sums
    from fed.ledger import epsilon_of
    from fed.task import RoundConfig

    pool = f"busi:{busi}?limit={args.limit}&seed=0"
    if args.val_fraction is None:
        args.val_fraction = RoundConfig.val_fraction
    if args.splits:
        run_splits(args, pool, console)
        return
    from edge.build.quantize import quantize

    root = Path(tempfile.mkdtemp(prefix="bench-release-"))
    cfg = RoundConfig(run_key="bench-release", server_round=0, val_fraction=args.val_fraction)
    policies = _policies(pool, root / "sites", args.sites, args.partition)
    images: dict[str, np.ndarray] = {}
    xt, yt, ft, xv, yv, sizes = _split_data(policies, cfg, images, {})
    console.print(f"sites' training images {sizes}, validation {len(yv)} (held out)")
    fp32, prepared = _model(ft, yt, xv, root)
    qcfg = _qdq_config()
    reference = _logits(fp32, xv)
    rows: dict[str, dict] = {"fp32": _scores(fp32, xv, yv, reference)}
    central, central_s = _central(prepared, xt, root / "central")
    rows["central"] = {"seconds": central_s, "model": central}
    fed, fed_row, plan, _ = _federated(prepared, policies, cfg, _public_images(), args.release, args.grouping, root / "federated")
    rows[f"federated ({args.release}, sigma {policies[0].evaluation_noise_multiplier:g})"] = {"model": fed, **fed_row}
    rows["public phantoms only (no site data)"] = {"model": _public_only(prepared, plan, root / "public")}
    train_x = [_images(p, cfg, "train", images)[0] for p in policies]
    exact_sums = [histogram_sums(plan, x)[0] for x in train_x]
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
    fp32_auroc = rows["fp32"]["auroc"]
    for name, row in rows.items():
        if "model" in row:
            row.update(_scores(row.pop("model"), xv, yv, reference))
        row["drop_points"] = round(100 * (fp32_auroc - row["auroc"]), 2)
        drop = f"{row['drop_points']:+.2f}" + (f" +- {row['drop_sd_points']:.2f}" if "drop_sd_points" in row else "")
        table.add_row(name, f"{row['auroc']:.4f}", drop, f"{row.get('logit_rmse', 0.0):.3f}", str(row.get("epsilon_per_site", "-")),
                      f"{row['seconds']:.0f}" if "seconds" in row else "-",
                      f"{row['bytes_down_per_site'] / 1e6:.1f} MB / {row['bytes_up_per_site']:,} B" if "bytes_down_per_site" in row else "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"limit": args.limit, "sites": args.sites, "partition": args.partition,
                                         "release": args.release, "grouping": args.grouping, "val_fraction": args.val_fraction,
                                         "train_images": sizes, "val_images": len(yv), "rows": rows},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
