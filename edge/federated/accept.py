"""Federated acceptance of a candidate scanner build: each site gates it on its own validation split.

The central accuracy gate (:mod:`edge.build.gate`) needs labelled images on the build machine; in
a real federation there are none. Here the coordinator sends the candidate signed bundle and the
signed FP32 **reference bundle** of the same model (an ONNX Runtime FP32 bundle, built by
:func:`reference_bundle` from the exported ONNX: the reference is signed too, so a site runs
nothing the release authority did not sign, and both run through the same torch-free runtime).

Site side, :func:`accept_at_site` (plain function; the Flower ClientApp only moves messages):

1. refuses, before reading any image or touching its ledger, when its policy does not take part
   (``acceptance = false``), pins no release key, when either bundle does not verify against the
   **release key pinned in its policy** (``release_pubkey``), when the two bundles are not the same
   model (task, labels, preprocessing, input, encoder, head), or the task is not allowed;
2. runs the FP32 reference and the candidate through :class:`edge.device.runtime.BundleRuntime`
   (the candidate exactly as a scanner runs it: the backend its manifest picks) on the images of its
   own **validation split** (the split its training rounds held out: ``fed.task.site_split``);
3. releases the gate metric's difference, candidate - FP32 (AUROC for classify, Dice for segment,
   HC MAE for hc), **accounted** (default): one bounded row per image for each model (the rows of
   accounted evaluation, ``fed.task``), summed, Gaussian noise from OS entropy
   (:class:`fed.dp.DPRandom`), charged to the site's lifetime ledger as kind ``"accept"`` under the
   same lock, replay store and delta check as evaluation (``fed.task.locked_release``); or **disclosed**
   when its policy says ``evaluation = "disclosed"``: the exact metrics of the central gate
   (:func:`edge.build.evaluate.metrics_from_outputs`), within the same per-run and lifetime limits
   as disclosed evaluations, logged in the ledger;
4. adds the candidate's p50 latency (one image at a time on the bundle's own self-test sample: a
   capability of the site's hardware and the backend, **not** a function of its data), the backend,
   and the result of the bundle's self-test.

Coordinator side, :func:`decide_acceptance`: the build is accepted only if every participating
site (or the quorum the run asks for) is within the gate bound; a refusal names the site and the
metric. The result is an :class:`echocare.bundle.AcceptanceRecord`, the signed manifest's
``acceptance`` section; :func:`site_results` is the model card's per-site detail.

What leaves a site: noisy (or disclosed) metric differences, the noise's standard deviation on the
gate metric (post-processing of released numbers only), p50 latency, backend, self-test verdict,
its lifetime epsilon and delta. Never an image, a count, a file name or a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path

import numpy as np

from echocare.bundle import (
    AcceptanceRecord,
    BundleError,
    SiteAcceptance,
    load_public_key,
    safe_extract,
    verify_bundle,
)
from echocare.data.base import Sample, SiteData, UnreadableImage
from echocare.preprocess import PreprocessSpec
from edge.build.evaluate import (
    EvalDataError,
    EvalSet,
    load_eval_set,
    metrics_from_outputs,
)
from edge.build.gate import PRIMARY, GateBounds
from edge.device import postprocess as post
from edge.device.runtime import BundleRuntime
from fed.config import RunConfig
from fed.dp import DPRandom
from fed.ledger import Disclosure, Release
from fed.policy import SitePolicy
from fed.task import (
    EVALUATION_SENSITIVITY,
    HC_CAP_MM,
    NO_PATIENTS,
    NOT_PRIVATE,
    STATUS_EXHAUSTED,
    STATUS_OK,
    STATUS_REFUSED,
    RoundConfig,
    classify_contributions,
    insecure_noise_seed,
    locked_release,
    metrics_from_sums,
    patient_ids,
    privacy_figures,
    site_split,
    unit_or_none,
    unit_rows,
)

log = logging.getLogger(__name__)

KIND = "accept"
POLICY_REFUSAL = "this site's policy does not take part in federated acceptance (acceptance = false)"
NO_KEY = "this site pins no release key (release_pubkey): it runs no candidate build"
BAD_KEY = "this site's pinned release key cannot be read (details in the site's own log)"
NOT_SIGNED = ("the {which} bundle does not verify against the release key this site pins "
              "(signature or artifact hashes): nothing was run")
SITE_ERROR = "the site could not answer this acceptance request (details in the site's own log)"
# The model identity the reference and the candidate must share (manifest keys).
SAME_MODEL = ("task", "labels", "preprocess", "input", "encoder", "head")
NOISE_DRAWS = 256  # Monte Carlo draws for the noise's standard deviation on the gate metric (post-processing)


# ------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class AcceptanceRequest:
    """What the coordinator sends with the candidate: the FP32 reference bundle and the run's split.

    ``reference`` is the signed FP32 bundle of the same model (tarball bytes, or a path to the
    tarball or bundle directory). ``val_fraction`` and ``seed`` name the run's train/validation
    split, so the site gates on the images its training held out. ``run_key`` and ``round`` are
    labels in the site's ledger (never how it is keyed)."""

    reference: bytes | Path | str
    run_key: str = "run"
    round: int = 0
    val_fraction: float = RunConfig.val_fraction
    seed: int = RunConfig.seed
    latency_runs: int = 20


@dataclass
class AcceptanceReply:
    """Everything that leaves a site after an acceptance request.

    ``difference``: candidate - FP32 of the gate ``metric`` in the metric's own units (NaN when it is
    undefined on the site's split); ``differences``: the same for every metric computed;
    ``noise_sd``: the standard deviation of the noise on ``difference`` (0 when disclosed);
    ``p50_ms``: median latency of one image on the candidate's backend (the bundle's public
    self-test sample: hardware capability, not data)."""

    site: str
    status: str
    reason: str = ""
    candidate: str = ""
    mode: str = ""
    metric: str = ""
    difference: float = math.nan
    noise_sd: float = 0.0
    differences: dict[str, float] = field(default_factory=dict)
    p50_ms: float | None = None
    backend: str = ""
    precision: str = ""
    selftest: str = ""
    privacy: dict[str, float] = field(default_factory=dict)
    unit: str = ""

    def fields(self) -> dict:
        return asdict(self)

    @classmethod
    def from_fields(cls, d: dict) -> AcceptanceReply:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _refused(policy: SitePolicy, reason: str, status: str = STATUS_REFUSED, **kw) -> AcceptanceReply:
    return AcceptanceReply(policy.site_name, status, reason, **kw)


# ------------------------------------------------------------------------------------ site side
def accept_at_site(policy: SitePolicy, candidate: bytes | Path | str, request: AcceptanceRequest) -> AcceptanceReply:
    """Gate ``candidate`` (a signed bundle: tarball bytes, or a path) at this site (module docstring)."""
    if not policy.acceptance:
        return _refused(policy, POLICY_REFUSAL)
    if not policy.release_pubkey:
        return _refused(policy, NO_KEY)
    try:
        key = load_public_key(Path(policy.release_pubkey))
    except BundleError as e:
        log.error("site %s: %s", policy.site_name, e)
        return _refused(policy, BAD_KEY)
    tmp = Path(tempfile.mkdtemp(prefix="echofleet-accept-"))
    try:
        try:
            cand_dir, cand_manifest = _verified(candidate, key, tmp / "candidate")
        except BundleError as e:
            log.warning("site %s refuses the candidate: %s", policy.site_name, e)
            return _refused(policy, NOT_SIGNED.format(which="candidate"))
        try:
            ref_dir, ref_manifest = _verified(request.reference, key, tmp / "reference")
        except BundleError as e:
            log.warning("site %s refuses the reference: %s", policy.site_name, e)
            return _refused(policy, NOT_SIGNED.format(which="FP32 reference"))
        problem = _pairing_problem(cand_manifest, ref_manifest)
        if problem:
            return _refused(policy, problem)
        if cand_manifest["task"] not in policy.allowed_tasks:
            return _refused(policy, f"task '{cand_manifest['task']}' is not allowed by this site's policy")
        if not (0.0 < request.val_fraction < 1.0) or not 1 <= request.latency_runs <= 1000:
            return _refused(policy, "val_fraction must be in (0, 1) and latency_runs in [1, 1000]: refused")
        try:
            return _gate_at_site(policy, request, cand_dir, cand_manifest, ref_dir, ref_manifest)
        except Exception:  # an exception's text can name paths or counts, which must not leave the site
            log.exception("acceptance failed at site %s", policy.site_name)
            return _refused(policy, SITE_ERROR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verified(bundle: bytes | Path | str, key, where: Path) -> tuple[Path, dict]:
    """(bundle directory, verified manifest); a tarball (bytes or file) is unpacked safely first."""
    where.mkdir(parents=True)
    if isinstance(bundle, bytes):
        tar = where / "bundle.tar.gz"
        tar.write_bytes(bundle)
        bundle = tar
    path = Path(bundle)
    if path.is_file():
        path = safe_extract(path, where / "unpacked")
    return path, verify_bundle(path, key)


def _pairing_problem(candidate: dict, reference: dict) -> str | None:
    """Why ``reference`` is not the FP32 reference of ``candidate``'s model, or None."""
    for k in SAME_MODEL:
        if candidate.get(k) != reference.get(k):
            return f"the FP32 reference is not the candidate's model: their manifests differ in '{k}': refused"
    models = [a for a in reference.get("artifacts", []) if a.get("role") == "model"]
    if not models or any(a.get("precision") != "fp32" for a in models):
        return "the reference bundle is not an FP32 build: refused"
    return None


def _gate_at_site(policy: SitePolicy, request: AcceptanceRequest, cand_dir: Path, cand_manifest: dict, ref_dir: Path,
                  ref_manifest: dict) -> AcceptanceReply:
    import torch

    task, labels = cand_manifest["task"], list(cand_manifest.get("labels") or [])
    cfg = RoundConfig(task=task, labels=labels, preprocess=dict(cand_manifest["preprocess"]), run_key=request.run_key,
                      server_round=request.round, val_fraction=request.val_fraction, seed=request.seed)
    unit = unit_or_none(policy, cfg)
    if unit is None:
        return _refused(policy, NO_PATIENTS)
    val, unreadable = _noting_unreadable(site_split(policy, cfg, "val"))
    known_problems = len(val.problems)
    try:
        ev = load_eval_set(val, task, labels, PreprocessSpec.from_dict(cand_manifest["preprocess"]))
    except EvalDataError as e:
        log.warning("site %s: %s", policy.site_name, e)
        # Accounted: an ordinary charged release of no rows (pure noise). A refusal would tell the
        # coordinator, uncharged, that none of the site's images has a label its bundle names.
        # Disclosed: refused below, only after the request is counted as a disclosure (that refusal is
        # itself an exact answer; before, it was free and unlimited).
        spec = PreprocessSpec.from_dict(cand_manifest["preprocess"])
        ev = EvalSet(spec="", task=task, labels=labels, inputs=np.zeros((0, 3, spec.size, spec.size), np.float32),
                     targets=np.zeros(0, np.int64) if task == "classify" else None)
    units = None
    if unit == "patient" and len(ev):
        # The rows of the images load_eval_set kept (it skips, e.g., labels the bundle does not name:
        # the coordinator's choice), matched to their patients by key; a refusal here would tell,
        # uncharged, whether the split holds such an image.
        # load_eval_set names a skipped sample by its key; the reader names an unreadable image by its file,
        # so those are noted by key as they fail (_noting_unreadable) and skipped like any other image
        skipped = {p.path for p in val.problems[known_problems:]} | unreadable
        kept = [s for s in val.samples if s.key not in skipped]
        if len(ev) != len(kept):  # rows can no longer be matched to patients
            log.error("site %s: %d validation images unreadable; per-patient acceptance cannot match rows to patients",
                      policy.site_name, len(kept) - len(ev))
            return _refused(policy, SITE_ERROR)
        units = patient_ids(kept)

    with BundleRuntime(ref_dir, ref_manifest) as ref, BundleRuntime(cand_dir, cand_manifest) as cand:
        (ref_out, ref_ok), (cand_out, cand_ok) = _predict_each(ref, ev.inputs), _predict_each(cand, ev.inputs)
        ran = ref_ok & cand_ok  # images both models answered; the others contribute zero rows
        p50 = _p50_ms(cand, request.latency_runs)
        selftest = cand.self_test()
        backend, precision = cand.backend, cand.precision
    identity = f"{cand_manifest.get('name')}-{cand_manifest.get('version')}"
    common = dict(candidate=identity, metric=PRIMARY[task][0], p50_ms=p50, backend=backend, precision=precision,
                  selftest=("passed: " if selftest[0] else "FAILED: ") + selftest[1].split(" (")[0])

    request_id = _request_hash(cand_dir, ref_dir, cfg)
    with locked_release(policy, cfg, request_id) as (ledger, store, early):
        if early is not None:
            stored = store.get(request_id)
            if stored is not None:  # an identical request re-delivered: its reply, no new charge
                return AcceptanceReply.from_fields(stored[0])
            return _refused(policy, early.reason, early.status)
        if policy.evaluation == "disclosed":
            if ledger.disclosed_in_run(KIND, cfg.run_key) >= policy.disclosed_evaluations_per_run:
                return _refused(policy, f"this site discloses at most {policy.disclosed_evaluations_per_run} "
                                        "exact results per run")
            if ledger.disclosed() >= policy.disclosed_evaluations_lifetime:  # exact evaluations count too
                return _refused(policy, f"this site has disclosed its lifetime limit of "
                                        f"{policy.disclosed_evaluations_lifetime} exact results")
            ledger.disclose(Disclosure(KIND, cfg.run_key, cfg.server_round, request_id))
            if len(ev) == 0:  # counted above: "no image here has the bundle's labels" is an exact answer
                return _refused(policy, "no labelled validation images at this site")
            if not ran.all():  # counted as a disclosure above: this refusal is one (exact) answer too
                log.error("site %s: a bundle failed on %d validation images", policy.site_name, int((~ran).sum()))
                return _refused(policy, SITE_ERROR)
            ref_m, cand_m = metrics_from_outputs(ref_out, ev), metrics_from_outputs(cand_out, ev)
            diffs, noise_sd, mode = _differences(ref_m, cand_m), 0.0, "disclosed"
        else:
            rows, sensitivity = _rows(task, ref_out, cand_out, ev)
            rows[torch.from_numpy(~ran)] = 0.0  # a failed image: a zero row (within the bound), never an error
            rows = unit_rows(rows, units, sensitivity)
            sigma = policy.evaluation_noise_multiplier
            release = Release(KIND, sigma, 1.0, 1, sensitivity, run=cfg.run_key, round=cfg.server_round,
                              request=request_id, private=not policy.insecure_deterministic_noise, unit=unit)
            if ledger.would_exceed(release):
                return _refused(policy, "privacy budget exhausted: an acceptance release would exceed this site's "
                                        "lifetime budget", STATUS_EXHAUSTED, privacy=privacy_figures(policy, ledger))
            rng = DPRandom(insecure_noise_seed(policy, cfg, KIND))
            noisy = rows.sum(0).double() + rng.gaussian(sigma * sensitivity, (rows.shape[1],), torch.float64)
            ledger.charge(release)  # durable before anything leaves the site
            diffs = _noisy_differences(cfg, noisy)
            noise_sd = _noise_sd(cfg, noisy, sigma * sensitivity, common["metric"])
            mode = "accounted"
        reply = AcceptanceReply(policy.site_name, STATUS_OK, NOT_PRIVATE if policy.insecure_deterministic_noise else "",
                                mode=mode, difference=diffs.get(common["metric"], math.nan), noise_sd=noise_sd,
                                differences=diffs, privacy=privacy_figures(policy, ledger), unit=ledger.unit, **common)
        store.put(request_id, {**reply.fields(), "weight": 1, "metrics": {}}, None)  # fed.task's stored-reply keys
        return reply


def _noting_unreadable(val: SiteData) -> tuple[SiteData, set[str]]:
    """``val`` whose samples add their key to the returned set when their image is unreadable.

    Per-patient acceptance matches the evaluated rows to patients by key; an unreadable image used
    to break that match and the site refused ("could not answer", uncharged: an answer about its
    split). With its key noted, the image is skipped inside the ordinary charged release."""
    unreadable: set[str] = set()

    def noting(s: Sample) -> Sample:
        def load():
            try:
                return s.load_image()
            except UnreadableImage:
                unreadable.add(s.key)
                raise

        return dataclass_replace(s, load_image=load)

    return SiteData(val.spec, list(val.classes), [noting(s) for s in val.samples], list(val.problems),
                    val.task_hint), unreadable


def _request_hash(cand_dir: Path, ref_dir: Path, cfg: RoundConfig) -> str:
    """What makes two acceptance requests identical: both signed manifests (which hash every
    artifact) and the whole config (run key, round, split)."""
    h = hashlib.sha256(KIND.encode())
    for d in (cand_dir, ref_dir):
        h.update(hashlib.sha256((d / "manifest.json").read_bytes()).digest())
    h.update(json.dumps(cfg.to_record(), sort_keys=True).encode())
    return h.hexdigest()


def _predict_each(rt: BundleRuntime, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, ok per image). The bundles are the coordinator's code even when signed (it is often
    the release authority): a model can be built to fail, or to change its output's shape, on exactly
    the images it asks about, and an error would be an exact, uncharged answer. So a batch that fails
    (or whose output is not one row of the manifest's declared shape per image) is run image by
    image; an image that fails or answers another shape gets NaN outputs and ``ok`` False (its rows
    are zeroed, :func:`_gate_at_site`)."""
    declared = [int(d) for d in (rt.manifest.get("output") or {}).get("shape", [-1])[1:]]

    def fits(shape: tuple[int, ...]) -> bool:
        return len(shape) == len(declared) and all(d < 0 or d == s for d, s in zip(declared, shape))

    ok = np.ones(len(inputs), bool)
    try:
        out = np.asarray(rt.predict_arrays(inputs))
        if out.shape[:1] == (len(inputs),) and fits(out.shape[1:]):
            return out, ok
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("a bundle failed on the validation batch; running it image by image")
    outs: list[np.ndarray | None] = []
    for i in range(len(inputs)):
        try:
            o = np.asarray(rt.predict_arrays(inputs[i:i + 1]))
            outs.append(o[0] if o.shape[:1] == (1,) and fits(o.shape[1:]) else None)
        except Exception:  # noqa: BLE001
            outs.append(None)
    shape = next((o.shape for o in outs if o is not None), None)
    if shape is None:  # nothing usable: every row will be zero
        shape = tuple(d if d > 0 else 1 for d in declared)
    for i, o in enumerate(outs):
        if o is None or o.shape != shape:
            outs[i], ok[i] = np.full(shape, np.nan, np.float32), False
    return (np.stack(outs) if outs else np.zeros((0, *shape), np.float32)), ok


def _p50_ms(rt: BundleRuntime, runs: int) -> float | None:
    """Median milliseconds of one image through the candidate, on its public self-test sample."""
    st = rt.manifest.get("selftest") or {}
    try:
        x = np.load(rt.bundle_dir / st["input"], allow_pickle=False)[:1]
    except (KeyError, OSError, ValueError):
        return None
    rt.predict_arrays(x)  # warm-up (lazy initialisation, caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rt.predict_arrays(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _differences(ref: dict, cand: dict) -> dict[str, float]:
    return {k: float(cand[k]) - float(ref[k]) for k in sorted(set(ref) & set(cand)) if k != "hc_failed"}


# ------------------------------------------------------------------ accounted: bounded rows
def _rows(task: str, ref_out: np.ndarray, cand_out: np.ndarray, ev: EvalSet):
    """Per image: [FP32 row, candidate row], each the row of accounted evaluation (fed.task), so one
    image moves the released sums by at most ``sqrt(2) *`` the evaluation's L2 sensitivity."""
    import torch

    k = len(ev.labels)
    if task == "classify":
        y = torch.from_numpy(ev.targets)
        halves = [classify_contributions(torch.from_numpy(np.asarray(o, np.float32)), y, k) for o in (ref_out, cand_out)]
    else:
        halves = [_mask_rows(o, ev) for o in (ref_out, cand_out)]
    return torch.cat(halves, 1), math.sqrt(2.0) * EVALUATION_SENSITIVITY[task](k)


def _mask_rows(outputs: np.ndarray, ev: EvalSet):
    """Rows [0 (no loss from a bundle), Dice, 1, HC error / HC_CAP_MM, has HC] (fed.task's layout;
    L2 norm <= sqrt(5)): the per-image Dice of the central gate and the capped HC error."""
    import torch

    pred = post.foreground(post.masks_from_logits(outputs, ev.inputs.shape[-1]))
    rows = torch.zeros(len(ev), 5, dtype=torch.float64)
    for i, p in enumerate(pred):
        if ev.masks is not None:
            rows[i, 1] = post.dice_binary(p, ev.masks[i])
        rows[i, 2] = 1.0
        px, truth = (float(ev.pixel_mm[i]), float(ev.hc_mm[i])) if ev.task == "hc" else (0.0, 0.0)
        # Metadata alone decides whether an image counts for HC: a pixel size that is not a positive
        # number made hc_from_mask raise only when the bundle predicted a mask for that image ("could
        # not answer", uncharged: an oracle a crafted bundle steers); a NaN truth made every sum NaN.
        if ev.task == "hc" and math.isfinite(px) and px > 0 and math.isfinite(truth):
            hc = post.hc_from_mask(p, px)
            rows[i, 3] = min(abs((hc if math.isfinite(hc) else 0.0) - truth), HC_CAP_MM) / HC_CAP_MM
            rows[i, 4] = 1.0
    return rows


def _noisy_differences(cfg: RoundConfig, noisy) -> dict[str, float]:
    """candidate - FP32 of every metric the noisy sums define (post-processing: no extra cost)."""
    half = noisy.shape[0] // 2
    ref, cand = metrics_from_sums(cfg, noisy[:half]), metrics_from_sums(cfg, noisy[half:])
    return {k: v for k, v in _differences(ref, cand).items() if k != "val_loss"}


def _noise_sd(cfg: RoundConfig, noisy, std: float, metric: str) -> float:
    """The standard deviation the release's noise puts on ``metric``'s difference, estimated by
    re-noising the released sums (post-processing of released values and the public noise scale;
    this randomness protects nothing, so it need not come from OS entropy)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(NOISE_DRAWS):
        d = _noisy_differences(cfg, noisy + torch.randn(noisy.shape, generator=gen, dtype=torch.float64) * std)
        if metric in d and math.isfinite(d[metric]):
            draws.append(d[metric])
    return float(np.std(draws)) if len(draws) > 1 else math.inf


# ------------------------------------------------------------------------- coordinator side
def decide_acceptance(replies: list[AcceptanceReply], bounds: GateBounds = GateBounds(),
                      quorum: int | None = None) -> AcceptanceRecord:
    """The verdict on a candidate from the sites' replies (the signed manifest's ``acceptance``).

    A site participates when it answered ``ok``; it passes when its drop (the gate's convention,
    :mod:`edge.build.gate`: positive = the candidate is worse, in AUROC points / Dice / mm) is within
    the bound and, for an accounted reply, the noise on it is not larger than the bound (a result
    that noisy cannot tell a good build from a bad one). ``quorum`` None: every participating site
    must pass (and at least one must take part); else at least ``quorum`` sites must pass."""
    if quorum is not None and quorum < 1:
        raise ValueError(f"quorum must be >= 1 (or None: every participating site), got {quorum}")
    taking_part = [r for r in replies if r.status == STATUS_OK]
    absent = [f"{r.site} did not take part ({r.reason})" for r in replies if r.status != STATUS_OK]
    metrics = {r.metric for r in taking_part}
    if len(metrics) > 1 or len({r.candidate for r in taking_part}) > 1:
        raise ValueError(f"replies are about different candidates or metrics: {sorted(metrics)}, "
                         f"{sorted({r.candidate for r in taking_part})}")
    metric = metrics.pop() if metrics else ""
    task = next((t for t, p in PRIMARY.items() if p[0] == metric), None)
    bound = float(bounds.for_task(task)) if task else math.nan
    sites = tuple(_site_verdict(r, task, bound) for r in taking_part)
    passing = [s for s in sites if s.passed]
    need = len(sites) if quorum is None else quorum
    failed = [f"{s.site}: {s.metric} {s.reason}" for s in sites if not s.passed]
    if not sites:
        passed, reason = False, "no site took part"
    elif len(passing) < need:
        passed, reason = False, (f"refused: {len(passing)} of the {need} sites the run asks for passed"
                                 + (": " + "; ".join(failed) if failed else ""))
    else:
        passed, reason = True, ("passed" + (" (quorum; failed: " + "; ".join(failed) + ")" if failed else ""))
    if absent:
        reason += " | " + "; ".join(absent)
    if quorum is not None and quorum > len(sites):
        reason += f" | the run asked for a quorum of {quorum}"
    return AcceptanceRecord(passed=passed, method="federated", metric=metric or "none",
                            bound=bound if math.isfinite(bound) else 0.0, quorum=max(1, min(need, len(sites))),
                            sites=sites, reason=reason)


def _site_verdict(r: AcceptanceReply, task: str | None, bound: float) -> SiteAcceptance:
    if task is None:
        return SiteAcceptance(r.site, r.metric, None, 0.0, r.p50_ms, False, f"unknown gate metric {r.metric!r}")
    _, sign, scale, unit = PRIMARY[task]
    if not math.isfinite(r.difference):
        return SiteAcceptance(r.site, r.metric, None, bound, r.p50_ms, False,
                              "undefined on the site's validation split: an unmeasured build is not accepted")
    drop = -r.difference * scale if sign > 0 else r.difference * scale
    noise = r.noise_sd * scale
    if r.mode == "accounted" and not noise <= bound:
        return SiteAcceptance(r.site, r.metric, drop, bound, r.p50_ms, False,
                              f"inconclusive: the noise on the accounted result (sd {noise:.3g} {unit}) exceeds the "
                              f"bound {bound:g}")
    if drop <= bound:
        return SiteAcceptance(r.site, r.metric, drop, bound, r.p50_ms, True)
    return SiteAcceptance(r.site, r.metric, drop, bound, r.p50_ms, False,
                          f"drop {drop:.3g} {unit} > bound {bound:g} ({r.mode})")


def site_results(replies: list[AcceptanceReply]) -> list[dict]:
    """The model card's per-site detail: mode, difference, noise, p50 latency, backend, self-test,
    the site's lifetime privacy figures; for a site that did not take part, its reason."""
    keep = ("site", "status", "reason", "mode", "metric", "difference", "noise_sd", "p50_ms", "backend", "precision",
            "selftest", "privacy", "unit")
    return [{k: v for k, v in r.fields().items() if k in keep} for r in replies]


# ------------------------------------------------------------------- messages as records
def request_record(candidate: bytes | Path | str, request: AcceptanceRequest) -> dict:
    """A flat dict of bytes/str/int/float (a Flower ``ConfigRecord``) carrying the candidate tarball,
    the reference tarball and the request's numbers; bundles given as paths must be tarballs."""
    return {"candidate": _tar_bytes(candidate, "candidate"), "reference": _tar_bytes(request.reference, "reference"),
            "run-key": request.run_key, "round": int(request.round), "val-fraction": float(request.val_fraction),
            "seed": int(request.seed), "latency-runs": int(request.latency_runs)}


def request_from_record(record) -> tuple[bytes, AcceptanceRequest]:
    """(candidate tarball, request) from :func:`request_record`'s dict; ``ValueError`` names a missing
    or mistyped key (checked before anything is unpacked)."""
    kinds = {"candidate": bytes, "reference": bytes, "run-key": str, "round": int, "val-fraction": float, "seed": int,
             "latency-runs": int}
    for k, kind in kinds.items():
        if k not in record:
            raise ValueError(f"acceptance request: '{k}' is missing")
        v = record[k]
        if isinstance(v, bool) or not (isinstance(v, kind) or (kind is float and isinstance(v, int))):
            raise ValueError(f"acceptance request: '{k}' is a {type(v).__name__}, expected {kind.__name__}")
    return bytes(record["candidate"]), AcceptanceRequest(
        reference=bytes(record["reference"]), run_key=record["run-key"], round=record["round"],
        val_fraction=float(record["val-fraction"]), seed=record["seed"], latency_runs=record["latency-runs"])


def reply_record(reply: AcceptanceReply) -> dict:
    """The reply as one JSON string (a ``ConfigRecord`` value)."""
    return {"acceptance": json.dumps(reply.fields(), sort_keys=True)}


def reply_from_record(record) -> AcceptanceReply:
    try:
        return AcceptanceReply.from_fields(json.loads(record["acceptance"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"acceptance reply: not a reply record ({e})") from None


def _tar_bytes(bundle: bytes | Path | str, which: str) -> bytes:
    if isinstance(bundle, bytes):
        return bundle
    path = Path(bundle)
    if not path.is_file():
        raise ValueError(f"{path}: the {which} bundle must travel as its .tar.gz (a directory cannot be sent)")
    return path.read_bytes()


# ------------------------------------------------------------------- the FP32 reference
def reference_bundle(fp32_onnx: Path, info: dict, key: Path | str, out: Path, *, name: str, version: str,
                     selftest_inputs: np.ndarray) -> Path:
    """The signed FP32 reference bundle (ONNX Runtime, ``onnxruntime-cpu``) of an exported model
    (``info``: its ``export.json``); what :class:`AcceptanceRequest` carries. Returns the tarball."""
    from edge.build.bundling import assemble_bundle
    from edge.build.compiled import CompileOptions, compile_model

    work = Path(out) / f".work-{name}-{version}"
    size = int(info["input"]["shape"][-1])
    compiled = compile_model("onnxruntime-cpu", fp32_onnx, work / "onnxruntime-cpu",
                             CompileOptions(graph_precision="fp32", input_chw=(3, size, size)))
    return assemble_bundle(Path(out), key, info=info, compiled=compiled, selftest_inputs=selftest_inputs, name=name,
                           version=version, work=work)


__all__ = [
    "KIND",
    "AcceptanceReply",
    "AcceptanceRequest",
    "accept_at_site",
    "decide_acceptance",
    "reference_bundle",
    "reply_from_record",
    "reply_record",
    "request_from_record",
    "request_record",
    "site_results",
]
