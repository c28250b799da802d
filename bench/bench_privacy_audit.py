"""Empirical privacy audit of one site's DP-SGD round, as the coordinator sees it (issue 9).

The accountant (``fed.ledger``, Opacus' RDP analysis) gives an *upper* bound on a site's privacy
loss. This audit gives a *lower* bound measured from one real training run, with the one-run
method of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):

1. ``m`` canaries are drawn; each is put into the site's training set independently with
   probability 1/2 (the auditor keeps the coin flips secret).
2. The site trains one round through the production path, ``fed.dp.train_head`` on a
   ``ClassifyHead`` (one trainable ``nn.Linear`` over features, as ``fed.task.train_round`` calls it).
3. The coordinator sees what it sees in reality: the weights it sent (``W0``) and the reply
   (``W1``). It scores every canary, guesses "in" for the ``k+`` highest scores, "out" for the
   ``k-`` lowest and abstains on the rest.
4. ``r = k+ + k-`` guesses with ``v`` correct give a p-value for "the round is (eps, delta)-DP"
   (the paper's Theorem 5.2 / Appendix D: a binomial tail at the accuracy ``e^eps / (1 + e^eps)``
   of eps-DP randomised response, plus a ``2 m delta`` term); the largest eps rejected at 95 %
   confidence is the empirical lower bound. The auditor picks ``(k+, k-)`` on a random half of
   the canaries and reports the bound of that one rule on the other half (``m_test = m / 2``), so
   no multiple-testing correction is needed.

Canaries (white-box, input space, fitted to the linear head): canary ``i`` is the feature vector
``A * e_(64+i)`` (a coordinate no other example uses) with a random label ``y_i``. Its clipped
gradient only ever touches column ``64+i`` of the Linear's weight, along ``e_y - 1/K`` (softmax
cross-entropy pushes the label's logit up), so canaries do not interfere with each other or with
the site's data; the score is the change of that column projected on ``e_y - 1/K``. The head is
``ClassifyHead(64 + m, 3)`` without the public projection (``feature_projection = 0``, a
configuration the coordinator may choose): the width only makes room for orthogonal canaries,
the DP guarantee does not depend on it. The site's own data (the 64 leading coordinates) are
synthetic whitened features of three classes; they cannot change a canary's column.

Cases, each printed beside the epsilon the ledger accounts for the same round
(``fed.ledger.epsilon_of`` for the sigma, sampling rate, steps and delta the site uses; sigma is
calibrated as ``train_round`` does, for the site's budget spread over the planned rounds):

  dp           DP on, as a site runs it: noise from the site's secret randomness.   lower bound must be <= accounted
  no-noise     a broken mechanism: noise scale cut 10^6 x, ledger unchanged.         should be far above
  predictable  the old behaviour of issue 9: noise seeded from values the coordinator knows; it re-runs
               ``train_head`` with that seed on all-zero features of the same size (its weight gradient is
               exactly 0, so the weight change is the noise alone) and subtracts it. should be far above
  regenerate-vs-secure  the same subtraction against a site that draws its noise from OS entropy
               (today's default): must fail, lower bound <= accounted
  per-patient  DP on at a site that knows its patients (user-level DP-SGD, ``train_head(units=...)``):
               every patient has two images (a canary patient: two copies of its canary), sampled,
               summed and clipped together, accounted per patient.    lower bound must be <= accounted

As a site does (``fed.task.train_round``, policy defaults), sampling rate and steps come from the
site's public size class (``fed.policy.size_class`` of its number of units, 4 classes per doubling):
``q = B / N_pub``, ``ceil(N_pub / B)`` steps, the delta from the class too.

The ceiling column is what a perfect attacker could certify with these canaries (all its guesses
right on the canaries that were sampled at least once): one run cannot certify more than about
``ln(r / 3)`` (``delta = 0``) nor about ``ln(0.05 r / (2 m delta))`` (the delta term), whatever the
mechanism, so a broken mechanism can only be shown to break an accounted epsilon below that
ceiling (the runs therefore also audit a site with a smaller budget, whose per-round epsilon is
below it). Verdicts: ``holds`` (DP on, bound <= accounted), ``detected`` (a broken case above the
accounted epsilon), ``out of reach`` (a broken case whose accounted epsilon is above the ceiling:
this audit cannot show it), ``VIOLATION`` / ``NOT DETECTED`` (exit status 1).

Usage::

    .venv/bin/python bench/bench_privacy_audit.py --quick      # < 60 s on 2 cores
    .venv/bin/python bench/bench_privacy_audit.py              # full: 10,000 canaries, two budgets
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from scipy import stats

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fed, echocare (run as a script)

console = Console(highlight=False, width=210)
CONFIDENCE = 0.95
DATA_DIM = 64  # the site's own (whitened) feature coordinates; canaries use the ones after them
CASES = ("dp", "no-noise", "predictable", "regenerate-vs-secure", "per-patient")
PER_PATIENT_IMAGES = 2  # per-patient case: every patient (canary or the site's own) has this many images


# --------------------------------------------------------------------------------------------
# Statistics: Steinke, Nasr, Jagielski 2023, Theorem 5.2 (as computed in their Appendix D)
# --------------------------------------------------------------------------------------------

def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ``>= v`` correct out of ``r`` guesses (abstentions excluded) on ``m`` canaries,
    each included with probability 1/2, if the mechanism is (eps, delta)-DP.

    ``P[Binomial(r, p) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Binomial(r, p) < v] / i`` with
    ``p = e^eps / (1 + e^eps)``, the accuracy of eps-DP randomised response.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    alpha = 0.0
    if delta > 0 and v > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float) -> float:
    """The largest eps that ``v`` correct of ``r`` guesses reject at significance ``level`` (0 if none):
    the mechanism is not (eps, delta)-DP for any smaller eps, with confidence ``1 - level``."""
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high + 1.0
        if high > 100:
            return low
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


def self_check(rng: np.random.Generator, trials: int = 100) -> list[str]:
    """Checks of the bound itself; returns the failures (empty: all good).

    - perfect guesses: the bound grows with the number of canaries (about ln m);
    - guesses no better than chance: the bound is 0;
    - randomised response at a known eps (a mechanism exactly eps-DP): the 95 % bound exceeds the
      true eps in at most ~5 % of trials, and is not vacuous (median above half the true eps).
    """
    failures = []
    perfect = [epsilon_lower_bound(m, m, m, 0.0, 0.05) for m in (10, 100, 1000, 10000)]
    if not all(a < b for a, b in itertools.pairwise(perfect)) or not perfect[-1] < math.log(10000):
        failures.append(f"perfect guesses: bounds {perfect} do not grow with m below ln m")
    chance = [epsilon_lower_bound(m, m, m // 2, 1e-5, 0.05) for m in (100, 1000, 10000)]
    if any(c != 0.0 for c in chance):
        failures.append(f"chance-level guesses: bounds {chance}, expected 0")
    m = 2000
    for eps in (0.5, 2.0):
        correct = rng.binomial(m, 1 / (1 + math.exp(-eps)), size=trials)
        bounds = np.array([epsilon_lower_bound(m, m, int(v), 0.0, 0.05) for v in correct])
        over = float(np.mean(bounds > eps))
        if over > 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials):
            failures.append(f"randomised response eps={eps}: bound above the truth in {over:.0%} of trials")
        if not np.median(bounds) > eps / 2:
            failures.append(f"randomised response eps={eps}: median bound {np.median(bounds):.2f} is vacuous")
    return failures


GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.3)


def guess_rules() -> list[tuple[float, float]]:
    """The (k+, k-) the auditor may use, as fractions of the canaries: "in" only, and symmetric."""
    return [(f, 0.0) for f in GUESS_FRACTIONS] + [(f, f) for f in GUESS_FRACTIONS]


def _correct(order: np.ndarray, member: np.ndarray, k_in: int, k_out: int) -> int:
    """Correct guesses: "in" for the k_in highest scores, "out" for the k_out lowest (``order``: ascending)."""
    m = len(order)
    return int(member[order[m - k_in:]].sum()) + int((~member[order[:k_out]]).sum())


def split_guess(scores: np.ndarray, member: np.ndarray, delta: float, rng: np.random.Generator,
                level: float = 1 - CONFIDENCE) -> dict:
    """Guess on half of the canaries with the rule that did best on the other half.

    The auditor splits the canaries at random: on the selection half it picks the (k+, k-) rule
    with the highest bound; on the test half it applies that rule once, and only that bound is
    reported (at significance ``level``, 5 % by default, with m = the test half; the rule is chosen for
    that level too: a stricter level favours more guesses). The test half's coin flips are independent of the
    selection half, so the rule is a fixed post-processing of the output given them: no multiple
    testing, and a 2 m delta term over half the canaries. Ties are broken at random."""
    m = len(scores)
    half = rng.permutation(m)
    sel, test = half[: m // 2], half[m // 2:]
    best, best_eps = (GUESS_FRACTIONS[0], 0.0), -1.0
    ms = len(sel)
    order = np.lexsort((rng.random(ms), scores[sel]))
    for rule in guess_rules():
        k_in, k_out = int(rule[0] * ms), int(rule[1] * ms)
        eps = epsilon_lower_bound(ms, k_in + k_out, _correct(order, member[sel], k_in, k_out), delta, level)
        if eps > best_eps:
            best, best_eps = rule, eps
    mt = len(test)
    k_in, k_out = int(best[0] * mt), int(best[1] * mt)
    order = np.lexsort((rng.random(mt), scores[test]))
    v = _correct(order, member[test], k_in, k_out)
    return {"eps_lb": epsilon_lower_bound(mt, k_in + k_out, v, delta, level), "m_test": mt, "k_in": k_in,
            "k_out": k_out, "r": k_in + k_out, "v": v, "selection_eps_lb": best_eps}


def ceiling(m_test: int, sampled_fraction: float, delta: float, level: float = 1 - CONFIDENCE) -> float:
    """What a perfect attacker certifies on ``m_test`` canaries: every "in" guess right, on the
    members sampled at least once (``sampled_fraction`` of all canaries, in expectation)."""
    ks = [int(f * m_test) for f in GUESS_FRACTIONS if f <= sampled_fraction]
    return max((epsilon_lower_bound(m_test, k, k, delta, level) for k in ks if k > 0), default=0.0)


# --------------------------------------------------------------------------------------------
# The audited round
# --------------------------------------------------------------------------------------------

@dataclass
class AuditConfig:
    """One audited round of one site. Training knobs are the coordinator's defaults (ServerConfig)."""

    canaries: int = 10_000
    background: int = 1_000  # the site's own training images (synthetic whitened features)
    classes: int = 3
    canary_norm: float = 8.0  # |x| of a canary: always clipped (|d| * sqrt(A^2 + 1) > C)
    batch_size: int = 32
    lr: float = 0.1
    max_grad_norm: float = 1.0
    local_epochs: int = 1
    budget_epsilon: float = 8.0  # the site's policy budget for the run ...
    planned_rounds: int = 10  # ... spread over this many rounds, as train_round calibrates sigma
    seed: int = 0  # the auditor's coin flips and the synthetic data (not the site's noise)
    level: float = 1 - CONFIDENCE  # significance of the reported lower bound (and of the guessing rule's choice)


@dataclass
class Site:
    """The site's training set for one draw of the canaries, and what the auditor keeps secret."""

    x: torch.Tensor
    y: torch.Tensor
    member: np.ndarray  # per canary: in the training set?
    canary_label: np.ndarray
    extra: dict = field(default_factory=dict)


def make_site(cfg: AuditConfig, rng: np.random.Generator, images_per_patient: int = 1) -> Site:
    """``images_per_patient`` > 1: every patient has that many images (a canary patient: copies of its
    canary; the site's own: consecutive background images); ``extra["units"]`` holds the patient ids."""
    import torch

    m, k, per = cfg.canaries, cfg.classes, images_per_patient
    member = rng.random(m) < 0.5
    canary_label = rng.integers(0, k, m)
    ins = np.repeat(np.flatnonzero(member), per)
    n = cfg.background + len(ins)
    x = torch.zeros(n, DATA_DIM + m)
    y_bg = rng.integers(0, k, cfg.background)
    means = rng.normal(0, 1, (k, DATA_DIM)) * 1.5 / math.sqrt(DATA_DIM)
    x[:cfg.background, :DATA_DIM] = torch.from_numpy((means[y_bg] + rng.normal(0, 1, (cfg.background, DATA_DIM))).astype(np.float32))
    x[torch.arange(cfg.background, n), torch.from_numpy(DATA_DIM + ins)] = cfg.canary_norm
    y = torch.from_numpy(np.concatenate([y_bg, canary_label[ins]]).astype(np.int64))
    site = Site(x, y, member, canary_label)
    if per > 1:
        site.extra["units"] = torch.from_numpy(np.concatenate([np.arange(cfg.background) // per,
                                                               cfg.background + np.arange(len(ins)) // per]))
    return site


def _dp_config(cfg: AuditConfig, sigma: float, public_seed: int | None, sampling_units: int | None = None):
    """DPConfig for the round. ``public_seed``: noise and sampling fixed by a value the coordinator
    knows (``DPConfig.insecure_seed`` when fed.dp has it; else the old ``seed`` field). Without it the
    site's noise is secret: OS entropy when fed.dp has the secure mode, else a seed drawn here from
    ``secrets`` (never shown to the auditor). ``sampling_units``: the site's size class (when
    fed.dp has it)."""
    from fed.dp import DPConfig

    names = {f.name for f in dataclasses.fields(DPConfig)}
    kw: dict = {"epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "max_grad_norm": cfg.max_grad_norm, "noise_multiplier": sigma}
    if "sampling_units" in names:
        kw["sampling_units"] = sampling_units
    if "insecure_seed" in names:
        if public_seed is not None:
            kw["insecure_seed"] = public_seed
        source = "OS entropy" if public_seed is None else "public seed"
    elif "seed" in names:
        kw["seed"] = public_seed if public_seed is not None else secrets.randbits(31)
        source = "secret seed" if public_seed is None else "public seed"
    else:
        raise RuntimeError("fed.dp.DPConfig has neither insecure_seed nor seed: the predictable-noise case cannot be set up")
    return DPConfig(**kw), source


def public_seed_of(run_seed: int, site_name: str, server_round: int) -> int:
    """What the old fed/task.py seeded the noise with: a hash of values the coordinator knows."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}|{site_name}|{server_round}|dp".encode()).digest()[:4], "little") >> 1


def audit_case(case: str, cfg: AuditConfig, rng: np.random.Generator) -> dict:
    """Train one round on a fresh canary draw through fed.dp.train_head; score, guess, bound."""
    import torch

    from echocare.models.heads import ClassifyHead
    from fed.dp import schedule, train_head
    from fed.ledger import calibrate_noise, epsilon_of
    from fed.policy import SitePolicy

    t0 = time.perf_counter()
    site = make_site(cfg, rng, PER_PATIENT_IMAGES if case == "per-patient" else 1)
    units = site.extra.get("units")
    n = len(site.y)
    n_units = n if units is None else len(np.unique(units.numpy()))
    policy = SitePolicy(data="audit", site_name="audit")  # a site's defaults: 4 size classes per doubling
    n_public = policy.sampling_units(n_units)
    dp_cfg, _ = _dp_config(cfg, 1.0, None, n_public)
    q, steps, _ = schedule(n_units, dp_cfg)  # as train_round: from the size class
    delta = policy.delta_for(n_public)
    sigma = calibrate_noise(cfg.budget_epsilon, delta, q, steps * cfg.planned_rounds)  # as train_round does
    run_sigma = sigma * 1e-6 if case == "no-noise" else sigma
    public = public_seed_of(cfg.seed, "site-1", 1)  # what the coordinator knows
    dp_cfg, source = _dp_config(cfg, run_sigma, public if case == "predictable" else None, n_public)

    torch.manual_seed(cfg.seed)  # the coordinator's initial head: it knows W0
    head = ClassifyHead(DATA_DIM + cfg.canaries, cfg.classes)
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    lin = head.net[-1]  # the head's only trainable layer
    w0 = lin.weight.detach().clone()
    t_train = time.perf_counter()
    out = train_head(head, site.x, site.y, dp_cfg, units=units)
    train_s = time.perf_counter() - t_train
    change = lin.weight.detach() - w0
    q_used, steps_used = float(out.get("sample_rate", q)), int(out.get("steps", steps))
    if case == "no-noise":
        source += " x1e-6"

    if case in ("predictable", "regenerate-vs-secure"):  # the coordinator regenerates the noise and subtracts it
        del site.x
        dummy = ClassifyHead(DATA_DIM + cfg.canaries, cfg.classes)
        dummy.load_state_dict(initial)  # the weights it sent
        dlin = dummy.net[-1]
        train_head(dummy, torch.zeros(n, DATA_DIM + cfg.canaries), torch.zeros(n, dtype=torch.long),
                   _dp_config(cfg, run_sigma, public, n_public)[0])
        change = change - (dlin.weight.detach() - w0)

    k = cfg.classes
    direction = torch.eye(k) - 1.0 / k  # row y: e_y - 1/K, the way a canary of label y moves its column
    direction = direction / direction.norm(dim=1, keepdim=True)
    cols = change[:, DATA_DIM:]  # (K, m): one column per canary
    scores = (cols.T * direction[torch.from_numpy(site.canary_label)]).sum(1).double().numpy()
    guess = split_guess(scores, site.member, delta, rng, cfg.level)
    sampled = 0.5 * (1 - (1 - q_used) ** steps_used)  # expected fraction of canaries in and sampled at least once
    return {"case": case, "budget_epsilon": cfg.budget_epsilon, "planned_rounds": cfg.planned_rounds,
            "noise_source": source, "site_says_private": out.get("private"), "sigma_accounted": sigma, "sigma_run": run_sigma, "sample_rate": q_used,
            "steps": steps_used, "n_train": n, "n_units": n_units, "n_public": n_public, "delta": delta, "m": cfg.canaries, "members": int(site.member.sum()),
            **guess, "eps_accounted": epsilon_of([(sigma, q_used, steps_used)], delta), "ceiling": ceiling(guess["m_test"], sampled, delta, cfg.level),
            "train_s": train_s, "wall_s": time.perf_counter() - t0}


def verdict(row: dict) -> tuple[str, bool]:
    """(text, as expected?) for one audited case."""
    lb, acc = row["eps_lb"], row["eps_accounted"]
    if row["case"] in ("dp", "regenerate-vs-secure", "per-patient"):
        return ("holds", True) if lb <= acc else ("VIOLATION", False)
    if lb > acc:
        return f"detected ({lb / acc:.1f}x)", True
    if row["ceiling"] <= acc:
        return "out of reach (ceiling)", True
    return "NOT DETECTED", False


def provenance() -> str:
    """The commit, and the hash of fed/dp.py as imported (the file may differ from the commit)."""
    import fed.dp

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    digest = hashlib.sha256(Path(fed.dp.__file__).read_bytes()).hexdigest()[:12]
    return f"commit {commit or '?'}, fed/dp.py sha256 {digest}"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def main(
    quick: bool = typer.Option(False, help="1,000 canaries, 500 site images (< 60 s on 2 cores)."),
    canaries: int | None = typer.Option(None, help="Canaries m (default 10,000; 1,000 with --quick)."),
    background: int | None = typer.Option(None, help="The site's own training images (default 1,000; 500 with --quick)."),
    budgets: str = typer.Option("8/10,2/10", help="Site settings 'EPSILON/ROUNDS,...': run budget and planned rounds."),
    seed: int = typer.Option(0, help="Auditor's seed (canary coin flips, synthetic data, initial head)."),
    json_out: Path | None = typer.Option(None, help="Also write all numbers to this JSON file."),
) -> None:
    warnings.filterwarnings("ignore")
    t_all = time.perf_counter()
    m = canaries or (1_000 if quick else 10_000)
    n_bg = background or (500 if quick else 1_000)
    try:
        settings = [(float(e), int(r)) for e, r in (s.split("/") for s in budgets.split(",") if s.strip())]
    except ValueError:
        console.print(f"--budgets {budgets!r}: expected EPSILON/ROUNDS pairs separated by commas, e.g. 8/10,2/10")
        raise typer.Exit(2)
    if m < 100 or n_bg < 1 or not settings or any(e <= 0 or r < 1 for e, r in settings):
        console.print("--canaries must be >= 100, --background >= 1, and every budget EPSILON > 0 with ROUNDS >= 1")
        raise typer.Exit(2)
    cpu, code = cpu_name(), provenance()  # fed.dp is imported (once) here, and hashed as imported
    console.print(f"CPU: {cpu} ({os.cpu_count()} cores visible); audited code: {code}")

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    failures = self_check(np.random.default_rng(seed + 1), trials=40 if quick else 100)
    console.print(f"self-check of the bound (perfect guesses grow with m, chance gives 0, randomised response stays "
                  f"below its eps): {'ok' if not failures else 'FAILED: ' + '; '.join(failures)} ({time.perf_counter() - t:.1f} s)")
    if failures:
        raise typer.Exit(1)

    rows = []
    for eps, rounds in settings:
        cfg = AuditConfig(canaries=m, background=n_bg, budget_epsilon=eps, planned_rounds=rounds, seed=seed)
        for case in CASES:
            with console.status(f"budget {eps:g} over {rounds} rounds: {case}"):
                rows.append(audit_case(case, cfg, rng))
            r = rows[-1]
            console.print(f"  budget {eps:g}/{rounds} rounds, {case}: eps_lb {r['eps_lb']:.3f} vs accounted "
                          f"{r['eps_accounted']:.3f} ({r['wall_s']:.1f} s)")

    table = Table(title=f"One-run privacy audit (Steinke, Nasr, Jagielski 2023) of fed.dp.train_head on ClassifyHead, "
                        f"{CONFIDENCE:.0%} confidence, m = {m} canaries, {n_bg} site images; CPU {cpu}")
    for col in ("budget/rounds", "case", "noise", "units (class)", "sigma run (acct)", "q", "steps", "delta", "m test", "r (k+, k-)", "v",
                "eps lower bound", "eps accounted", "ratio", "ceiling", "verdict", "s"):
        table.add_column(col, justify="left" if col in ("case", "noise", "verdict") else "right")
    ok = True
    for r in rows:
        text, good = verdict(r)
        ok &= good
        table.add_row(f"{r['budget_epsilon']:g}/{r['planned_rounds']}", r["case"], r["noise_source"],
                      f"{r['n_units']} ({r['n_public']})",
                      f"{r['sigma_run']:.3g} ({r['sigma_accounted']:.3f})", f"{r['sample_rate']:.4f}", str(r["steps"]),
                      f"{r['delta']:.0e}", str(r["m_test"]), f"{r['r']} ({r['k_in']}, {r['k_out']})", str(r["v"]),
                      f"{r['eps_lb']:.3f}", f"{r['eps_accounted']:.3f}", f"{r['eps_lb'] / r['eps_accounted']:.2f}",
                      f"{r['ceiling']:.2f}", text, f"{r['wall_s']:.0f}")
    console.print(table)
    total = time.perf_counter() - t_all
    console.print(f"total {total:.0f} s on {cpu}; (k+, k-) chosen on the other {m - rows[0]['m_test']} canaries; "
                  f"audited code: {code}; all cases as expected: {ok}")
    if json_out:
        from echocare.atomic import atomic_write_bytes

        atomic_write_bytes(json_out, json.dumps({"cpu": cpu, "code": code, "total_s": total, "quick": quick, "rows": rows}, indent=1,
                                                default=float).encode())
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
