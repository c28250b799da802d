"""Federation benchmarks (issue: hospitals fine-tune EchoCare heads with DP in Flower).

Prints ratios measured side by side in one run (this machine is noisy), never asserts timings:

  cache    round time at a site with the feature cache vs recomputing features every round
  dp       DP-SGD epoch time vs non-DP on the same head and features (target <= 1.5x)
  bytes    bytes a site sends per round vs the bytes of the full encoder + head
  scale    N simulated hospitals x R rounds (default 100 x 10), DP on, cached: wall time, peak memory
           (target <= 5 min and 4 GB on 2 cores)
  quality  BUSI 3-class, 3 sites, Dirichlet 0.5, epsilon 8: macro AUROC of the federated DP head vs a
           centralised non-DP head on the same features and encoder

  sweep    what helps under DP: the quality protocol (128-dim projection) under each configuration of
           SWEEP (projection size, rounds, local epochs, batch, lr, DP-Adam, releasing the mean of the
           last K global heads, per-example feature scaling, last-stage pooling, public pre-training of
           the head on phantoms, FedAvg weighted by the sites' public size classes, the clipping
           bound C with lr re-scaled, local epochs at 10 rounds), the federation emulated in-process
           over the sites' real train_round, scored against a like-for-like centralised non-DP
           reference; configurations alternate, each paired with the protocol's run of the same
           partition and repeat (paired difference: mean +- standard error)
  gradnorms  how much clipping binds: per-example gradient norms at the protocol's starting head and
           after rounds 1, 5, 10 on one partition, and the fraction each clipping bound C clips

Usage: python bench/bench_fed.py [cache|dp|bytes|scale|quality|sweep|gradnorms|all] [--encoder echocare-tiny] [--quick]
       python bench/bench_fed.py quality --projection 128 --average-last 3,5 --cache-dir DIR --json out.json
       python bench/bench_fed.py sweep --configs protocol,avg-last3 --seeds 3 --repeats 3 --cache-dir DIR
       python bench/bench_fed.py gradnorms --partition 0 --cache-dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
import logging  # noqa: E402

logging.disable(logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
BUSI = Path(os.environ.get("ECHOFLEET_SHARED_DATA", REPO.parent / "shared" / "data")) / "busi" / "Dataset_BUSI_with_GT"


def _policy(tmp: Path, data: str, **kw):
    from fed.policy import SitePolicy

    return SitePolicy(data=data, site_name="bench-site", state_dir=str(tmp / "state"), **kw)


def bench_cache(encoder: str, n: int) -> dict:
    """One site, one round: (features + DP training) recomputing features vs reading the cache."""
    from fed import task
    from fed.task import train_round
    from fed.config import RunConfig
    from server.coordinator.server_app import initial_head

    tmp = Path(tempfile.mkdtemp())
    data = f"phantom:{n}?seed=3"
    cfg = RunConfig(encoder_config=encoder, run_dir=str(tmp / "run"), labels="benign,malignant,normal",
                       public_cache_dir=str(tmp / "public"))
    rc = cfg.round_config("bench")
    weights = initial_head(rc, cfg)

    rounds = iter(range(1, 1000))

    def one_round(fresh_cache: bool) -> float:
        if fresh_cache:
            shutil.rmtree(tmp / "state" / "features", ignore_errors=True)
        task.feature_memo.cache_clear()  # no in-process memo: measure the disk cache itself
        t = time.perf_counter()
        # a new round number each time: an identical request would get the site's stored reply
        # (docs/privacy.md), and a lifetime budget large enough for the repeated releases
        rep = train_round(_policy(tmp, data, target_epsilon=1e6), dataclasses.replace(rc, server_round=next(rounds)), weights)
        assert rep.status == "ok", rep.reason
        return time.perf_counter() - t

    one_round(True)  # warm imports and the split
    recompute = [one_round(True) for _ in range(2)]
    cached = [one_round(False) for _ in range(3)]
    r = {"images": int(n * 0.8), "encoder": encoder, "recompute_s": min(recompute), "cached_s": min(cached)}
    r["speedup"] = r["recompute_s"] / r["cached_s"]
    shutil.rmtree(tmp, ignore_errors=True)
    return r


def bench_dp(dim: int, n: int, proj: int) -> dict:
    """Same head, same features, one epoch: Opacus DP-SGD (ghost clipping) vs plain SGD."""
    import torch

    from echocare.models.heads import ClassifyHead
    from fed.dp import DPConfig, train_head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    out = {}
    modes = {"plain": dict(noise_multiplier=0.0), "dp_default": dict(noise_multiplier=1.0),
             "dp_opacus_ghost": dict(noise_multiplier=1.0, fast_linear=False),
             "dp_opacus_hooks": dict(noise_multiplier=1.0, fast_linear=False, grad_sample_mode="hooks")}
    times = {m: [] for m in modes}
    for rep in range(4):  # interleaved, so machine noise hits every mode alike
        for mode, kw in modes.items():
            head = ClassifyHead(dim, 3, proj_dim=proj)
            t = time.perf_counter()
            train_head(head, x, y, DPConfig(epochs=1, batch_size=64, **kw))
            times[mode].append(time.perf_counter() - t)
    out = {m: min(v[1:]) for m, v in times.items()}
    return {"n": n, "dim": dim, "proj_dim": proj, **{f"{m}_s": v for m, v in out.items()},
            **{f"ratio_{m}": out[m] / out["plain"] for m in modes if m != "plain"}}


def bench_bytes(encoder: str) -> dict:
    """What leaves a site per round (the reply's arrays + metrics) vs shipping encoder + head."""
    from echocare.models.encoder import build_encoder, get_config
    from echocare.models.heads import build_head

    enc = build_encoder(encoder)
    head = build_head("classify", get_config(encoder), 3, proj_dim=64)
    sent = sum(p.numel() * p.element_size() for p in head.parameters()) + 12 * 8  # + ~12 float metrics
    full = sum(t.numel() * t.element_size() for t in enc.state_dict().values()) + \
        sum(t.numel() * t.element_size() for t in head.state_dict().values())
    return {"encoder": encoder, "sent_bytes": sent, "encoder_plus_head_bytes": full, "fraction": sent / full}


def _peak_rss(stop: threading.Event, out: dict) -> None:
    import psutil

    me = psutil.Process()
    peak = 0
    while not stop.is_set():
        total = 0
        procs = [me] + me.children(recursive=True)
        seen = {p.pid for p in procs}
        for p in psutil.process_iter(["pid", "cmdline"]):  # Ray workers are not always our children
            try:
                if p.pid not in seen and any("ray" in c for c in (p.info["cmdline"] or [])[:2]):
                    procs.append(p)
            except psutil.Error:
                pass
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.5)
    out["peak_rss_gb"] = peak / 2**30


def bench_scale(sites: int, rounds: int, encoder: str, per_site: int, cache_dir: str | None = None) -> dict:
    from echofleet.simulation import SimulationConfig, simulate

    tmp = Path(tempfile.mkdtemp())
    cache = Path(cache_dir) if cache_dir else tmp / "cache"
    data = f"phantom:{sites * per_site}?seed=5"
    warm = SimulationConfig(data=data, sites=sites, rounds=1, encoder=encoder, out=str(tmp / "warm"), cache_dir=str(cache),
                            batch_size=8, local_epochs=1)
    t = time.perf_counter()
    simulate(warm)  # fills every site's feature cache (first round of a real run; kept with --cache-dir)
    warm_s = time.perf_counter() - t
    stop, mem = threading.Event(), {}
    th = threading.Thread(target=_peak_rss, args=(stop, mem), daemon=True)
    th.start()
    t = time.perf_counter()
    report = simulate(SimulationConfig(**{**warm.__dict__, "rounds": rounds, "out": str(tmp / "run")}))
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    shutil.rmtree(tmp, ignore_errors=True)
    # what the run really did: every site trained (status ok) every round, with DP noise
    trained = [sum(e["status"] == "ok" for e in r["sites"].values()) for r in report["rounds"] if r["round"] > 0]
    sigmas = [e["privacy"]["noise_multiplier"] for r in report["rounds"] for e in r["sites"].values() if "privacy" in e]
    last_eps = [e["privacy"]["epsilon"] for e in report["rounds"][-1]["sites"].values() if "privacy" in e]
    return {"sites": sites, "rounds": rounds, "images_per_site": per_site, "feature_warmup_s": warm_s,
            "wall_s_cached": wall, "peak_rss_gb": mem.get("peak_rss_gb"), "rounds_completed": report["rounds_completed"],
            "sites_trained_per_round_min": min(trained), "min_noise_multiplier": min(sigmas),
            "final_epsilon_max": max(last_eps),
            "target": "<= 300 s and <= 4 GB"}


def bench_quality(encoder: str, limit: int | None, seeds: int = 3, rounds: int = 10, local_epochs: int = 2,
                  lr: float = 0.2, batch_size: int = 32, projection: int = 64, cache_dir: str | None = None,
                  average_last: tuple[int, ...] = ()) -> dict:
    """Federated DP (3 sites, Dirichlet 0.5, eps 8 per site) vs centralised heads, on the same features.

    Every head is scored on ONE pooled held-out set (the union of the sites' validation splits), so
    small sites whose own split lacks a class do not make the comparison noisy or undefined:

    - federated DP: the run's final global head;
    - centralised DP (eps 8, same delta rule): the union of the sites' training splits in one place,
      same head, DP-SGD, same number of passes over the data — the price of privacy alone;
    - centralised non-DP: L2 logistic regression on the same features through the protocol's 64-dim
      public projection, with C chosen by 5-fold cross-validation on the training union — a tuned
      baseline, not a strawman, and the same reference whatever ``projection`` the federation uses
      (the run's own projection is scored too when it differs).
    Repeated over ``seeds`` Dirichlet partitions (the split of BUSI between sites changes with it).

    ``average_last`` (K, ...): the federated head is also scored as the mean of the global heads the
    coordinator checkpointed after the last K rounds (post-processing of released heads: no privacy
    cost), reported as ``federated_dp_eps8_avg_lastK_auroc``.
    """
    import torch
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegressionCV

    from echocare.metrics import auroc_macro_ovr
    from fed import task
    from fed.dp import DPConfig, sample_rate, steps_per_epoch, train_head
    from fed.ledger import calibrate_noise
    from fed.policy import load_policy
    from echofleet.simulation import SimulationConfig, simulate
    from fed.config import RunConfig
    from fed.task import RoundConfig, site_features
    from server.coordinator.server_app import initial_head

    if not BUSI.exists():
        return {"skipped": f"BUSI not found at {BUSI}"}
    tmp = Path(tempfile.mkdtemp())
    cache = cache_dir or str(tmp / "cache")
    data = f"busi:{BUSI}" + (f"?limit={limit}&seed=0" if limit else "")
    per_seed = []
    for seed in range(seeds):
        run = tmp / f"fed-{seed}"
        cfg = SimulationConfig(data=data, sites=3, partition="dirichlet:0.5", rounds=rounds, epsilon=8.0, encoder=encoder,
                               out=str(run), cache_dir=cache, local_epochs=local_epochs,
                               batch_size=batch_size, lr=lr, seed=seed, quiet=True,
                               extra={"feature-projection": projection})
        report = simulate(cfg)
        rc = RoundConfig.from_record(json.loads(json.dumps(
            RunConfig(encoder_config=encoder, run_dir=str(run), public_cache_dir=cache, seed=seed,
                      num_server_rounds=rounds, feature_projection=projection).round_config("q").to_record())))
        xs, ys, xv, yv, sizes = [], [], [], [], []
        for k in range(3):
            pol = load_policy(run / "sites" / f"site-{k}" / "policy.toml")
            a, b = site_features(pol, rc, "train")
            c, d = site_features(pol, rc, "val")
            xs.append(a), ys.append(b), xv.append(c), yv.append(d), sizes.append(len(b) + len(d))
        x_tr, y_tr, x_va, y_va = map(np.concatenate, (xs, ys, xv, yv))

        def score(head) -> float:
            with torch.no_grad():
                return float(auroc_macro_ovr(y_va, torch.softmax(head(torch.from_numpy(x_va)), 1).numpy(), 3))

        start = initial_head(rc, RunConfig(run_dir=str(run), public_cache_dir=cache))  # with the projection
        fed_head = task.round_head(rc)
        task.load_head_arrays(fed_head, {**start, **load_file(str(run / "global" / "head.safetensors"))})
        fed_auroc = score(fed_head)
        avg_auroc = {}
        for last in average_last:  # the coordinator's own round checkpoints of the released global heads
            rounds_kept = [load_file(str(run / "checkpoints" / f"round-{r:04d}" / "weights.safetensors"))
                           for r in range(rounds - last + 1, rounds + 1)]
            avg = {k: np.mean([w[k] for w in rounds_kept], axis=0).astype(rounds_kept[-1][k].dtype) for k in rounds_kept[-1]}
            avg_head = task.round_head(rc)
            task.load_head_arrays(avg_head, {**start, **avg})
            avg_auroc[f"federated_dp_eps8_avg_last{last}_auroc"] = score(avg_head)

        head = task.round_head(rc)
        task.load_head_arrays(head, start)
        n, epochs = len(y_tr), rounds * local_epochs
        delta = min(1e-5, 1.0 / (10 * n))
        sigma = calibrate_noise(8.0, delta, sample_rate(n, batch_size), epochs * steps_per_epoch(n, batch_size))
        train_head(head, torch.from_numpy(x_tr), torch.from_numpy(y_tr),
                   DPConfig(epochs=epochs, batch_size=batch_size, lr=lr, noise_multiplier=sigma, seed=seed))
        central_dp = score(head)

        def central_non_dp(dim: int) -> float:
            """L2 logistic regression (C cross-validated) on the features through a ``dim``-dim public projection."""
            ref_rc = dataclasses.replace(rc, head={**rc.head, "proj_dim": dim})
            ref_head = task.round_head(ref_rc)
            task.load_head_arrays(ref_head, initial_head(ref_rc, RunConfig(run_dir=str(run), public_cache_dir=cache)))
            with torch.no_grad():
                proj = lambda x: ((torch.from_numpy(x) - ref_head.proj_mean) @ ref_head.proj_matrix).numpy()  # noqa: E731
            lr_cv = LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, scoring="roc_auc_ovr", max_iter=5000).fit(proj(x_tr), y_tr)
            return float(auroc_macro_ovr(y_va, lr_cv.predict_proba(proj(x_va)), 3))

        central = central_non_dp(64)
        central_same = central if projection == 64 else central_non_dp(projection)
        per_seed.append({"seed": seed, "site_sizes": sizes, "train_images": int(n), "pooled_val_images": int(len(y_va)),
                         "federated_dp_eps8_auroc": fed_auroc, **avg_auroc,
                         "centralised_dp_eps8_auroc": central_dp,
                         "centralised_non_dp_auroc": central, "centralised_non_dp_auroc_run_projection": central_same,
                         "federated_reported_auroc_last_round": report["rounds"][-1]["aggregated"]["evaluate"].get("auroc")})
        print(f"  partition {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[-1].items()
                                                  if k.endswith("auroc") or k.endswith("projection") if v is not None), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    keys = ["federated_dp_eps8_auroc", "centralised_dp_eps8_auroc", "centralised_non_dp_auroc",
            "centralised_non_dp_auroc_run_projection"] + [f"federated_dp_eps8_avg_last{k}_auroc" for k in average_last]
    mean = lambda k: float(np.mean([r[k] for r in per_seed]))  # noqa: E731
    sd = lambda k: float(np.std([r[k] for r in per_seed]))  # noqa: E731
    return {"encoder": encoder, "encoder_weights": "seeded random init (no released EchoCare weights offline)",
            "images": per_seed[0]["train_images"] + per_seed[0]["pooled_val_images"],
            "protocol": {"sites": 3, "partition": "dirichlet:0.5", "epsilon_per_site": 8.0, "rounds": rounds,
                         "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size, "projection": projection,
                         "average_last": list(average_last), "seeds": seeds},
            "per_seed": per_seed,
            **{f"{k}_{f}": fn(k) for k in keys for f, fn in (("mean", mean), ("sd", sd))},
            "cost_of_federation_and_privacy": mean("centralised_non_dp_auroc") - mean("federated_dp_eps8_auroc")}


# -- what helps under DP: an in-process sweep over the sites' real train_round -------------------------
#: The quality protocol the sweep starts from: 10 rounds x 2 local epochs, lr 0.2, expected batch 32,
#: epsilon 8 per site, and the run-config default public projection (128 since issue 12's first sweep;
#: that sweep's 64-dim rows are recorded in docs/federation.md).
SWEEP_BASE = dict(num_server_rounds=10, local_epochs=2, lr=0.2, batch_size=32, target_epsilon=8.0, feature_projection=128)
SWEEP = {  # name -> changes from SWEEP_BASE. Keys that are not run-config fields (measured here only):
    #   optimizer: "adam" = DP-Adam (fed.dp.DPConfig.optimizer; noise before Adam's update, post-processing)
    #   average_last: K = the coordinator releases the mean of the last K rounds' global heads
    #                 (post-processing of released heads: no privacy cost)
    #   unit_norm: True = each example's projected features scaled to norm sqrt(proj_dim) before the
    #              linear layer (a per-example, data-independent transform: no privacy cost)
    #   pooling: "last", pretrain: True (head pre-trained on 300 labelled public phantoms)
    #   weight: "size_class" = FedAvg weights each site by its public size class (fed.policy.size_class
    #           of its whole dataset, as its DP-SGD samples with), capped like SiteGuard at
    #           MAX_WEIGHT_RATIO x the median of the other sites' weights; default: equal weights
    "protocol": {},
    "size-weight": {"weight": "size_class"},
    "proj64": {"feature_projection": 64},
    "adam-lr0.01": {"optimizer": "adam", "lr": 0.01},
    "adam-lr0.03": {"optimizer": "adam", "lr": 0.03},
    "adam-lr0.1": {"optimizer": "adam", "lr": 0.1},
    "adam-lr0.03-avg-last5": {"optimizer": "adam", "lr": 0.03, "average_last": 5},
    "adam-lr0.01-avg-last5": {"optimizer": "adam", "lr": 0.01, "average_last": 5},
    "adam-lr0.01-rounds20-avg-last10": {"optimizer": "adam", "lr": 0.01, "num_server_rounds": 20, "average_last": 10},
    "avg-last3": {"average_last": 3},
    "avg-last10": {"average_last": 10},
    "lr0.1-avg-last5": {"lr": 0.1, "average_last": 5},
    "avg-last5": {"average_last": 5},
    "rounds20-lr0.1": {"num_server_rounds": 20, "lr": 0.1},
    "rounds20-lr0.1-avg-last10": {"num_server_rounds": 20, "lr": 0.1, "average_last": 10},
    "rounds40-epochs1-lr0.1": {"num_server_rounds": 40, "local_epochs": 1, "lr": 0.1},
    "batch256-lr1": {"batch_size": 256, "lr": 1.0},  # q = 1 at every site: DP-GD, 20 full steps
    "batch256-lr2-avg-last5": {"batch_size": 256, "lr": 2.0, "average_last": 5},
    "lr0.1": {"lr": 0.1},
    "lr0.05": {"lr": 0.05},
    "unit-norm": {"unit_norm": True},
    "unit-norm-lr0.1": {"unit_norm": True, "lr": 0.1},
    # the clipping bound C with lr re-scaled so that lr * C = 0.2, the protocol's step when C clips
    # every example (it does: `gradnorms`, docs/federation.md fourth pass)
    "clip0.1-lr2": {"max_grad_norm": 0.1, "lr": 2.0},
    "clip0.3-lr0.67": {"max_grad_norm": 0.3, "lr": 0.2 / 0.3},
    "clip3-lr0.067": {"max_grad_norm": 3.0, "lr": 0.2 / 3.0},
    "lr0.4": {"lr": 0.4},  # lr * C = 0.4 at C = 1
    # local epochs at 10 rounds, lr re-scaled so that lr x epochs (the distance a round can move) is the protocol's
    "epochs1-lr0.4": {"local_epochs": 1, "lr": 0.4},
    "epochs4-lr0.1": {"local_epochs": 4, "lr": 0.1},
    "epochs1-lr0.2": {"local_epochs": 1, "lr": 0.2},
    "epochs1-lr0.6": {"local_epochs": 1, "lr": 0.6},
    "clip0.3-lr1": {"max_grad_norm": 0.3, "lr": 1.0},  # lr * C = 0.3
    "pooling-last": {"pooling": "last"},
    "phantom-pretrain": {"pretrain": True},
    "proj256": {"feature_projection": 256},
}
#: Sweep keys measured outside the run config (see SWEEP).
SWEEP_ONLY = ("optimizer", "average_last", "unit_norm", "pooling", "pretrain", "weight")
#: SiteGuard's default cap on a claimed weight (server.coordinator.strategy.SiteGuard.max_weight_ratio).
MAX_WEIGHT_RATIO = 5.0


def _fedavg(replies: list, weights: dict[str, np.ndarray], site_weight: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """FedAvg over the answering sites: equal weights (what SiteGuard's fedavg does with every site's
    fixed weight 1), or ``site_weight[site]`` each, capped as SiteGuard caps a claim (at most
    MAX_WEIGHT_RATIO x the median of the other answering sites' weights)."""
    ok = [r for r in replies if r.status == "ok" and r.arrays]
    if not ok:
        return weights
    claimed = [float(site_weight[r.site]) if site_weight else 1.0 for r in ok]
    used = []
    for i, w in enumerate(claimed):
        others = claimed[:i] + claimed[i + 1:]
        used.append(min(w, MAX_WEIGHT_RATIO * float(np.median(others))) if others else w)
    return {**weights, **{k: np.average([r.arrays[k] for r in ok], axis=0, weights=used).astype(weights[k].dtype)
                          for k in ok[0].arrays}}


def _phantom_pretrained(rc, cfg, weights: dict[str, np.ndarray], n: int = 300) -> dict[str, np.ndarray]:
    """The initial head fitted (non-DP: public data, no privacy cost) on labelled PUBLIC phantoms of the
    three classes, through the head's fixed public projection; the sites start from it."""
    import torch

    from echocare.data import open_data
    from fed import task
    from fed.dp import DPConfig, train_head
    from fed.features import pooled_features, select_pooled

    data = open_data(f"phantom:{n}?profiles=linear-a,convex-b,linear-c&seed=4242")
    x, kept = pooled_features(data, rc.encoder, _spec(rc), Path(cfg.public_cache_dir))
    head = task.round_head(rc)
    task.load_head_arrays(head, weights)
    x = select_pooled(x, rc.encoder.config, head.stages)
    y = np.array([rc.labels.index(s.label) for s in kept], np.int64)
    train_head(head, torch.from_numpy(x), torch.from_numpy(y), DPConfig(epochs=20, batch_size=32, lr=0.2, noise_multiplier=0.0))
    return {k: v.detach().cpu().numpy().copy() for k, v in head.state_dict().items()}


def _spec(rc):
    from echocare.preprocess import PreprocessSpec

    return PreprocessSpec.from_dict(rc.preprocess) if rc.preprocess else PreprocessSpec()


def _memoised_pooled_features():
    """``fed.features.pooled_features`` memoised in memory by (data, samples, encoder, spec, dtype):
    each sweep configuration has fresh site state (its own lifetime ledger) but the same images, so
    re-reading and re-hashing every image per configuration (what a cached site round spends its
    time on) is skipped. Returns (install, remove)."""
    from fed import features, task

    original = features.pooled_features
    memo: dict = {}

    def pooled(data, ref, spec, cache_root, *args, **kwargs):
        device = kwargs.get("device")
        key = (data.spec, tuple(s.key for s in data.samples), ref, spec.digest(), getattr(device, "autocast", None))
        if key not in memo:
            memo[key] = original(data, ref, spec, cache_root, *args, **kwargs)
        x, kept = memo[key]
        return x.copy(), list(kept)

    def install() -> None:
        features.pooled_features = task.pooled_features = pooled

    def remove() -> None:
        features.pooled_features = task.pooled_features = original

    return install, remove


class _SweepPatches:
    """The sweep's measured-only changes, installed for one configuration and removed after it:
    ``optimizer`` (fed.task builds its DPConfig with it) and ``unit_norm`` (ClassifyHead scales each
    example's projected features to norm sqrt(proj_dim) before its linear layer; the closed-form DP
    path reads the linear layer's input, so training and scoring both see it)."""

    def __init__(self, optimizer: str | None, unit_norm: bool):
        self.optimizer, self.unit_norm = optimizer, unit_norm

    def __enter__(self):
        import functools

        from echocare.models.heads import ClassifyHead
        from fed import task

        self._dp, self._forward = task.DPConfig, ClassifyHead.forward
        if self.optimizer:
            task.DPConfig = functools.partial(task.DPConfig, optimizer=self.optimizer)
        if self.unit_norm:
            def forward(head, pooled):
                if head.proj_dim > 0:
                    pooled = (pooled - head.proj_mean) @ head.proj_matrix
                pooled = pooled * (pooled.shape[1] ** 0.5 / pooled.norm(dim=1, keepdim=True).clamp_min(1e-6))
                return head.net(pooled)

            ClassifyHead.forward = forward
        return self

    def __exit__(self, *exc):
        from echocare.models.heads import ClassifyHead
        from fed import task

        task.DPConfig, ClassifyHead.forward = self._dp, self._forward
        return False


def _sweep_federation(encoder: str, data: str, cache: str, tmp: Path, seed: int, name: str):
    """A fresh emulated federation for SWEEP configuration ``name`` on Dirichlet partition ``seed``:
    (run config, round config, the three sites' policies, the configuration's sweep-only keys).
    Every call has new site state (its own lifetime ledgers)."""
    from echofleet.simulation import SimulationConfig, check, layout_sites
    from fed.policy import load_policy

    change = dict(SWEEP[name])
    extra = {k: change.pop(k) for k in SWEEP_ONLY if k in change}
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"s{seed}-{name}-"))
    rounds = change.get("num_server_rounds", SWEEP_BASE["num_server_rounds"])
    sim = SimulationConfig(data=data, sites=3, partition="dirichlet:0.5", rounds=rounds,
                           epsilon=8.0, encoder=encoder, out=str(run_dir), cache_dir=cache, seed=seed,
                           local_epochs=change.get("local_epochs", SWEEP_BASE["local_epochs"]), quiet=True, device="cpu")
    run = check(sim).replace(**{**SWEEP_BASE, **change}, encoder_config=encoder, seed=seed, run_dir=str(run_dir),
                             public_cache_dir=cache)
    rc = run.round_config(f"sweep-{seed}-{name}-{run_dir.name}")
    if extra.get("pooling"):
        rc.head = {**rc.head, "pooling": extra["pooling"]}
    sites = layout_sites(sim, run_dir)
    policies = [load_policy(sites / f"site-{k}" / "policy.toml") for k in range(3)]
    return run, rc, policies, extra


def _emulate(run, rc, policies: list, weights: dict[str, np.ndarray],
             site_weight: dict[str, float] | None = None) -> tuple[list[dict[str, np.ndarray]], int]:
    """``run.num_server_rounds`` rounds from ``weights``: every site runs its real ``train_round``,
    the coordinator averages the replies (:func:`_fedavg`). Returns (the global head after each
    round, the number of site-rounds that trained)."""
    from fed.task import train_round

    trained, history = 0, []
    for rnd in range(1, run.num_server_rounds + 1):
        replies = [train_round(p, dataclasses.replace(rc, server_round=rnd), weights) for p in policies]
        trained += sum(r.status == "ok" for r in replies)
        weights = _fedavg(replies, weights, site_weight)
        history.append(weights)
    return history, trained


def _per_example_grad_norms(rc, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example norms of the head's softmax cross-entropy gradient at ``weights``, exactly as the
    sites' DP-SGD computes them before clipping (fed.dp.linear_clipped_sum: ``|p - y| * sqrt(|x|^2 + 1)``
    with x the linear layer's input, after the public projection)."""
    import torch

    from fed import task
    from fed.dp import linear_input_factor

    head = task.round_head(rc)
    task.load_head_arrays(head, weights)
    lin = head.net[-1]
    inputs: list = []
    hook = lin.register_forward_hook(lambda _m, inp, _out: inputs.append(inp[0].detach()))
    with torch.no_grad():
        z = head(torch.from_numpy(x))
    hook.remove()
    d = torch.softmax(z, 1) - torch.nn.functional.one_hot(torch.from_numpy(y), z.shape[1]).to(z.dtype)
    factor = linear_input_factor(inputs[0])
    return {"input_norm": inputs[0].norm(dim=1).numpy(), "residual_norm": d.norm(dim=1).numpy(),
            "grad_norm": (d.norm(dim=1) * factor).numpy()}


def bench_grad_norms(encoder: str, partition: int, cache_dir: str | None, clips: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
                     at_rounds: tuple[int, ...] = (1, 5, 10)) -> dict:
    """How much clipping binds: the distribution of per-example gradient norms over the three sites'
    training splits of Dirichlet partition ``partition``, at the protocol's starting head (zero linear
    layer: every |p - y| = sqrt(2/3)) and at the global heads after ``at_rounds`` rounds of one
    emulated protocol run, with the fraction of examples each clipping bound C clips. If C clips
    every example, DP-SGD's step is ``lr * C / B`` times a sum of unit vectors plus noise of std
    ``lr * sigma * C / B``: only ``lr * C`` matters. If C clips almost none, the noise sigma * C is
    larger than the gradients need."""
    from fed.task import site_features
    from server.coordinator.server_app import initial_head

    if not BUSI.exists():
        return {"skipped": f"BUSI not found at {BUSI}"}
    tmp = Path(tempfile.mkdtemp())
    cache = cache_dir or str(tmp / "cache")
    install, remove = _memoised_pooled_features()
    install()
    try:
        run, rc, policies, _ = _sweep_federation(encoder, f"busi:{BUSI}", cache, tmp, partition, "protocol")
        parts = [site_features(p, rc, "train") for p in policies]
        x, y = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        start = initial_head(rc, run)
        history, _ = _emulate(run, rc, policies, dict(start))
        heads = {"start (round 0)": start, **{f"after round {r}": history[r - 1] for r in at_rounds if r <= len(history)}}
        qs = (0.0, 0.1, 0.5, 0.9, 1.0)
        out = {"partition": partition, "train_images": len(y), "site_train_images": [len(b) for _, b in parts],
               "quantiles": list(qs), "heads": {}}
        for label, w in heads.items():
            norms = _per_example_grad_norms(rc, w, x, y)
            row = {k: [float(v) for v in np.quantile(a, qs)] for k, a in norms.items()}
            row["fraction_clipped"] = {f"{c:g}": float(np.mean(norms["grad_norm"] > c)) for c in clips}
            out["heads"][label] = row
            g = row["grad_norm"]
            print(f"  {label:16s} |x| median {row['input_norm'][2]:.1f}  |p-y| median {row['residual_norm'][2]:.3f}  "
                  f"grad norm min/10%/median/90%/max {g[0]:.2f} / {g[1]:.2f} / {g[2]:.2f} / {g[3]:.2f} / {g[4]:.2f}  clipped: "
                  + ", ".join(f"C={c} {100 * f:.0f}%" for c, f in row["fraction_clipped"].items()), flush=True)
    finally:
        remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_quality_sweep(encoder: str, names: list[str], seeds: int, cache_dir: str | None, limit: int | None = None,
                        repeats: int = 1) -> dict:
    """Federated DP (3 sites, Dirichlet 0.5, epsilon 8 per site) under each SWEEP configuration,
    scored like ``quality`` on the pooled held-out splits, against centralised non-DP references:
    L2 logistic regression (C cross-validated) on the training union, **like for like** (the same
    head input as the configuration: its projection size, pooling, per-example scaling), and the
    protocol's (128-dim projection).

    The federation is emulated in one process: each round every site runs its real ``train_round``
    (its policy, lifetime ledger, noise calibration, DP-SGD), and the coordinator averages the
    replies with equal weights (FedAvg as SiteGuard runs it; its outlier screening is left out).
    Flower's transport and the per-round evaluations (disclosed, so without privacy cost in a
    simulation) are skipped: that is what makes a sweep affordable on two cores.

    Configurations run alternately (partition by partition, repeat by repeat, the protocol first in
    each repeat), so each run of a configuration is **paired** with the protocol's run of the same
    partition and repeat; the summary gives the paired difference to the protocol (mean and
    standard error over the pairs)."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV

    from echocare.metrics import auroc_macro_ovr
    from fed import task
    from fed.policy import size_class
    from fed.task import site_features
    from server.coordinator.server_app import initial_head

    if not BUSI.exists():
        return {"skipped": f"BUSI not found at {BUSI}"}
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise SystemExit(f"--configs: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(SWEEP)}")
    tmp = Path(tempfile.mkdtemp())
    cache = cache_dir or str(tmp / "cache")
    data = f"busi:{BUSI}" + (f"?limit={limit}&seed=0" if limit else "")
    rows = []
    install, remove = _memoised_pooled_features()
    install()
    order = ["protocol"] + [n for n in names if n != "protocol"]
    for seed in range(seeds):
        references: dict[tuple, float] = {}  # (proj_dim, pooling, unit_norm) -> centralised non-DP AUROC
        for repeat in range(repeats):  # DP noise differs run to run: repeat
            for name in order:
                run, rc, policies, extra = _sweep_federation(encoder, data, cache, tmp, seed, name)
                site_weight = None
                if extra.get("weight") == "size_class":  # the class each site's DP-SGD samples with (whole dataset)
                    site_weight = {p.site_name: size_class(task.site_size(p, rc, task.unit_or_none(p, rc)),
                                                           p.size_classes_per_doubling) for p in policies}
                t = time.perf_counter()
                with _SweepPatches(extra.get("optimizer"), bool(extra.get("unit_norm"))):
                    weights = initial_head(rc, run)
                    if extra.get("pretrain"):
                        weights = _phantom_pretrained(rc, run, weights)
                    start = dict(weights)
                    history, trained = _emulate(run, rc, policies, weights, site_weight)
                    weights = history[-1]
                    k = int(extra.get("average_last", 1))
                    released = {key: np.mean([h[key] for h in history[-k:]], axis=0).astype(weights[key].dtype) for key in weights}
                    xs, ys, xv, yv = [], [], [], []
                    for p in policies:
                        a, b = site_features(p, rc, "train")
                        c, d = site_features(p, rc, "val")
                        xs.append(a), ys.append(b), xv.append(c), yv.append(d)
                    x_tr, y_tr, x_va, y_va = map(np.concatenate, (xs, ys, xv, yv))
                    head = task.round_head(rc)
                    task.load_head_arrays(head, released)
                    with torch.no_grad():
                        auroc = float(auroc_macro_ovr(y_va, torch.softmax(head(torch.from_numpy(x_va)), 1).numpy(), 3))
                    ref_key = (run.feature_projection, extra.get("pooling"), bool(extra.get("unit_norm")))
                    if ref_key not in references:  # L2 logistic regression on the same head input, C cross-validated
                        task.load_head_arrays(head, start)
                        lin = head.net[-1]
                        inputs: list = []
                        hook = lin.register_forward_hook(lambda _m, inp, _out, acc=inputs: acc.append(inp[0].detach().numpy()))
                        with torch.no_grad():
                            head(torch.from_numpy(x_tr)), head(torch.from_numpy(x_va))
                        hook.remove()
                        lr_cv = LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, scoring="roc_auc_ovr",
                                                     max_iter=5000).fit(inputs[0], y_tr)
                        references[ref_key] = float(auroc_macro_ovr(y_va, lr_cv.predict_proba(inputs[1]), 3))
                reference = references[ref_key]
                protocol_ref = references[(SWEEP_BASE["feature_projection"], None, False)]
                rows.append({"seed": seed, "repeat": repeat, "config": name, "change": SWEEP[name], "federated_dp_eps8_auroc": auroc,
                             "centralised_non_dp_auroc": reference, "gap": reference - auroc,
                             "centralised_non_dp_auroc_protocol": protocol_ref, "gap_to_protocol_reference": protocol_ref - auroc,
                             "site_weights": site_weight, "site_rounds_trained": trained, "seconds": round(time.perf_counter() - t, 1)})
                print(f"  seed {seed} rep {repeat} {name:28s} fed DP {auroc:.3f}  central non-DP same input {reference:.3f}  "
                      f"gap {reference - auroc:+.3f}  (protocol ref {protocol_ref:.3f}: {protocol_ref - auroc:+.3f}; "
                      f"{trained} site-rounds trained, {rows[-1]['seconds']} s)" + (f" weights {site_weight}" if site_weight else ""),
                      flush=True)
    remove()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"encoder": encoder, "protocol": SWEEP_BASE, "rows": rows, "summary": sweep_summary(rows)}


def sweep_summary(rows: list[dict]) -> dict:
    """Per configuration: mean and sd of the federated AUROC and of the like-for-like gap over its
    runs, and the paired difference to the protocol's run of the same partition and repeat (mean
    and standard error over the pairs: sd with ddof 1 / sqrt(pairs))."""
    protocol = {(r["seed"], r.get("repeat", 0)): r["federated_dp_eps8_auroc"] for r in rows if r["config"] == "protocol"}
    summary = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        got = [r for r in rows if r["config"] == name]
        s = {"federated_dp_eps8_auroc_mean": float(np.mean([r["federated_dp_eps8_auroc"] for r in got])),
             "federated_dp_eps8_auroc_sd": float(np.std([r["federated_dp_eps8_auroc"] for r in got])),
             "gap_mean": float(np.mean([r["gap"] for r in got])),
             "gap_sd": float(np.std([r["gap"] for r in got])),
             "gap_to_protocol_reference_mean": float(np.mean([r["gap_to_protocol_reference"] for r in got])),
             "runs": len(got)}
        diffs = [r["federated_dp_eps8_auroc"] - protocol[(r["seed"], r.get("repeat", 0))] for r in got
                 if name != "protocol" and (r["seed"], r.get("repeat", 0)) in protocol]
        if diffs:
            s["paired_difference_to_protocol_mean"] = float(np.mean(diffs))
            s["paired_difference_to_protocol_se"] = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
            s["pairs"] = len(diffs)
        summary[name] = s
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="?", default="all", choices=["cache", "dp", "bytes", "scale", "quality", "sweep", "gradnorms", "all"])
    ap.add_argument("--encoder", default="echocare-tiny")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (scale: 20 sites x 3 rounds; quality: 150 images)")
    ap.add_argument("--sites", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="scale, sweep, gradnorms, quality: keep the sites' feature caches here between runs")
    ap.add_argument("--configs", default=",".join(SWEEP), help=f"sweep: which of {', '.join(SWEEP)}")
    ap.add_argument("--seeds", type=int, default=3, help="sweep: Dirichlet partitions")
    ap.add_argument("--repeats", type=int, default=1, help="sweep: runs of each configuration per partition")
    ap.add_argument("--partition", type=int, default=0, help="gradnorms: which Dirichlet partition (the sweep's seed)")
    ap.add_argument("--projection", type=int, default=64, help="quality: public projection size of the head")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--batch-size", type=int, default=32, help="quality: expected batch size of the sites' DP-SGD")
    ap.add_argument("--lr", type=float, default=0.2, help="quality: local learning rate")
    ap.add_argument("--local-epochs", type=int, default=2, help="quality: local epochs per round")
    ap.add_argument("--average-last", default="",
                    help="quality: also score the mean of the last K rounds' global heads (post-processing), e.g. 3,5")
    a = ap.parse_args()
    todo = ["cache", "dp", "bytes", "scale", "quality"] if a.which == "all" else [a.which]
    results = {}
    for name in todo:
        t = time.perf_counter()
        if name == "cache":
            r = bench_cache(a.encoder, 60 if a.quick else 150)
            line = f"round with cache vs recompute: {r['recompute_s']:.2f}s -> {r['cached_s']:.2f}s  ({r['speedup']:.1f}x faster)"
        elif name == "dp":
            r = bench_dp(744, 2000, 64)
            line = (f"DP-SGD / plain SGD epoch time on the same head+features: echofleet default (closed-form linear "
                    f"clipping) {r['ratio_dp_default']:.2f}x, Opacus ghost {r['ratio_dp_opacus_ghost']:.2f}x, "
                    f"Opacus hooks {r['ratio_dp_opacus_hooks']:.2f}x (target <= 1.5x)")
        elif name == "bytes":
            r = bench_bytes(a.encoder)
            r2 = bench_bytes("echocare")
            results["bytes_echocare"] = r2
            line = (f"bytes sent per site per round / encoder+head: {a.encoder} {r['fraction']:.2e} "
                    f"({r['sent_bytes']} B), echocare {r2['fraction']:.2e} ({r2['sent_bytes']} B of {r2['encoder_plus_head_bytes'] / 1e6:.0f} MB)")
        elif name == "scale":
            sites = a.sites or (20 if a.quick else 100)
            rounds = a.rounds or (3 if a.quick else 10)
            r = bench_scale(sites, rounds, a.encoder, 20, a.cache_dir)
            line = (f"{sites} hospitals x {rounds} rounds, DP on, cached: {r['wall_s_cached']:.0f}s wall "
                    f"(+{r['feature_warmup_s']:.0f}s warm-up run: Ray start, feature extraction unless cached, noise calibration), peak RSS {r['peak_rss_gb']:.2f} GB "
                    f"(target <= 300 s, <= 4 GB); >= {r['sites_trained_per_round_min']} sites trained every round, "
                    f"sigma >= {r['min_noise_multiplier']:.2f}, final epsilon <= {r['final_epsilon_max']:.2f}")
        elif name == "sweep":
            r = bench_quality_sweep(a.encoder, a.configs.split(","), a.seeds, a.cache_dir, 150 if a.quick else None,
                                    repeats=a.repeats)
            line = "skipped: " + r["skipped"] if "skipped" in r else "; ".join(
                f"{k} {v['federated_dp_eps8_auroc_mean']:.3f} +- {v['federated_dp_eps8_auroc_sd']:.3f} (gap like for like "
                f"{v['gap_mean']:+.3f} +- {v['gap_sd']:.3f}, to the protocol's reference {v['gap_to_protocol_reference_mean']:+.3f}"
                + (f"; paired difference to the protocol {v['paired_difference_to_protocol_mean']:+.3f} +- "
                   f"{v['paired_difference_to_protocol_se']:.3f} over {v['pairs']} pairs" if "pairs" in v else "") + ")"
                for k, v in r["summary"].items())
        elif name == "gradnorms":
            r = bench_grad_norms(a.encoder, a.partition, a.cache_dir)
            line = "skipped: " + r["skipped"] if "skipped" in r else (
                f"partition {r['partition']}: {r['train_images']} training images; per-example gradient norm "
                f"quantiles {r['quantiles']} and fraction clipped per C, by head: "
                + "; ".join(f"{h}: {[round(v, 2) for v in row['grad_norm']]} {row['fraction_clipped']}" for h, row in r["heads"].items()))
        else:
            r = bench_quality(a.encoder, 150 if a.quick else None, seeds=1 if a.quick else 3, rounds=a.rounds or 10,
                              local_epochs=a.local_epochs, lr=a.lr, batch_size=a.batch_size, projection=a.projection,
                              cache_dir=a.cache_dir, average_last=tuple(int(k) for k in a.average_last.split(",") if k))
            line = ("skipped: " + r["skipped"]) if "skipped" in r else (
                f"BUSI ({r['images']} images) macro AUROC on the pooled held-out splits, mean +- sd over "
                f"{r['protocol']['seeds']} partitions: federated DP eps=8 {r['federated_dp_eps8_auroc_mean']:.3f} "
                f"+- {r['federated_dp_eps8_auroc_sd']:.3f}, centralised DP eps=8 {r['centralised_dp_eps8_auroc_mean']:.3f} "
                f"+- {r['centralised_dp_eps8_auroc_sd']:.3f}, centralised non-DP {r['centralised_non_dp_auroc_mean']:.3f} "
                f"+- {r['centralised_non_dp_auroc_sd']:.3f} (64-dim projection), "
                f"{r['centralised_non_dp_auroc_run_projection_mean']:.3f} +- {r['centralised_non_dp_auroc_run_projection_sd']:.3f} "
                f"(the run's {a.projection}-dim projection)"
                + "".join(f", federated DP mean of the last {k} rounds' heads {r[f'federated_dp_eps8_avg_last{k}_auroc_mean']:.3f} "
                          f"+- {r[f'federated_dp_eps8_avg_last{k}_auroc_sd']:.3f}" for k in r["protocol"]["average_last"])
                + f" (encoder {r['encoder']}, {r['encoder_weights']})")
        results[name] = r
        print(f"[{name}] {line}   ({time.perf_counter() - t:.0f}s)", flush=True)
    print(json.dumps(results, indent=1, default=float))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
