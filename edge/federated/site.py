"""The hospital side of federated INT8 calibration: noisy activation histograms of its own images.

:func:`calibrate_round` is what a site runs when the coordinator asks it to calibrate an edge
build (a Flower ``query.calibrate`` message, see ``echofleet.apps``). It receives a
:class:`~edge.federated.plan.CalibrationPlan` (the FP32 ONNX model pre-processed for ONNX
Runtime's quantizer, the quantization points, fixed bin edges per point, the clipping bound) and
the run's round config (which split of its data is "train": the same split as training), and:

1. refuses, before reading any image, when its policy says ``calibration = false``, when the task
   is not allowed, or when the plan is malformed (too many points or bins, bad edges);
2. runs every image of its **training split** through the model with ONNX Runtime, one image at a
   time (intermediate tensors of a Swin mix the batch with the windows), fetching the points;
3. sums one bounded contribution per image (``plan.row``: per-point histograms,
   :func:`edge.federated.plan.image_row`, or a scale plan's count and group scales,
   :class:`edge.federated.plan.ScalePlan`; L2 norm at most ``clip`` either way), so one image changes the sums by at most ``clip`` (the L2 sensitivity); where the
   site's unit of privacy is the patient (policy ``privacy_unit``, ``fed.task.site_unit``), each
   patient's rows are summed and that sum is scaled down to ``clip``, so one patient moves the sums
   by at most ``clip`` however many images it has, and the release is accounted per patient;
4. adds Gaussian noise of standard deviation ``evaluation_noise_multiplier * clip`` from OS
   entropy (:class:`fed.dp.DPRandom`), after charging the release to its **lifetime ledger** as a
   release of kind ``"calibrate"`` (one unsampled Gaussian release: ``q = 1``, one step), under
   the same lock, replay store and delta check as training and evaluation (``fed.task.locked_release``).

What leaves the site: the noisy sums (points x bins), its lifetime epsilon and delta, and the
noise standard deviation it used (public: the policy's multiplier times the plan's bound). Never
the number of images, a file name or an exact statistic. Why the model travels as ONNX rather
than "the head plus the encoder the site already holds": the site needs no exporter (no torch
export at a hospital), the coordinator's quantizer names exactly these tensors, and the privacy
guarantee does not depend on what the model computes (the bound holds for any model and edges).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator

import numpy as np

from echocare.preprocess import PreprocessSpec, preprocess_image
from edge.federated.plan import Plan, PlanError, activation_session, plan_from_arrays
from fed.dp import DPRandom
from fed.ledger import Release
from fed.policy import SitePolicy
from fed.task import (
    NO_PATIENTS,
    NOT_PRIVATE,
    PATIENT,
    STATUS_EXHAUSTED,
    STATUS_OK,
    STATUS_REFUSED,
    Reply,
    RoundConfig,
    guarded_reply,
    insecure_noise_seed,
    locked_release,
    patient_ids,
    privacy_figures,
    request_hash,
    site_split,
    unit_or_none,
)

log = logging.getLogger(__name__)

KIND = "calibrate"
POLICY_REFUSAL = "this site's policy does not take part in federated calibration (calibration = false)"


def histogram_sums(plan: Plan, images: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    """(exact sums (P, B) of the images' bounded rows, number of images): every image its own unit."""
    return unit_histogram_sums(plan, enumerate(images))


def unit_histogram_sums(plan: Plan, items: Iterable[tuple[Hashable, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Exact sums (``plan.release_shape``: (P, B) histograms, or (1, 1 + G) for a scale plan) over
    ``(unit, image)`` items: each image's bounded row (``plan.row``), the rows of one unit
    (a patient) summed and that sum scaled down to L2 norm ``plan.clip``; and the number of images.
    Site-local: the sums leave the site only with noise (:func:`calibrate_round`); the count never does."""
    session, input_name = activation_session(plan)
    names = [o.name for o in session.get_outputs()]
    per_unit: dict[Hashable, np.ndarray] = {}
    n = 0
    failed = 0
    for unit, x in items:
        x = np.ascontiguousarray(x[None] if x.ndim == 3 else x, np.float32)
        try:
            got = dict(zip(names, session.run(names, {input_name: x})))
            got[input_name] = x
            row = plan.row([got[p] for p in plan.points])
        except Exception:  # noqa: BLE001 - the coordinator's model failing on this image: see below
            # A crafted model can fail on exactly the images it wants to ask about; an error (or an
            # uncharged refusal) would be an exact answer. The image contributes a zero row instead.
            row, failed = np.zeros(plan.release_shape), failed + 1
        per_unit[unit] = per_unit[unit] + row if unit in per_unit else row
        n += 1
    if failed:
        log.warning("the calibration model failed on %d of %d images; they contribute zero rows", failed, n)
    sums = np.zeros(plan.release_shape)
    for rows in per_unit.values():
        norm = float(np.linalg.norm(rows))
        sums += rows * (plan.clip / norm) if norm > plan.clip else rows
    return sums, n


def train_images(policy: SitePolicy, cfg: RoundConfig, per_patient: bool = False) -> Iterator[tuple[Hashable, np.ndarray]]:
    """(unit, image) for the site's training split (the split its training rounds used), preprocessed as
    the model expects, one (3, S, S) image at a time; the unit is the image's patient (``per_patient``)
    or the image itself. An image the preprocessing cannot use is skipped."""
    spec = PreprocessSpec.from_dict(cfg.preprocess) if cfg.preprocess else PreprocessSpec()
    data = site_split(policy, cfg, "train")
    ids = patient_ids(data.samples) if per_patient else None
    patient = {s.key: int(i) for s, i in zip(data.samples, ids)} if ids is not None else {}
    for sample, image in data.iter_images():
        try:
            x = preprocess_image(image, spec)[0]
        except ValueError as e:
            log.warning("site %s: an image skipped for calibration (%s)", policy.site_name, e)
            continue
        yield (("patient", patient[sample.key]) if per_patient else ("image", sample.key)), x


@guarded_reply
def calibrate_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """Noisy per-point activation histograms of this site's training split (module docstring)."""
    if not policy.calibration:
        return Reply(STATUS_REFUSED, policy.site_name, reason=POLICY_REFUSAL)
    if cfg.task not in policy.allowed_tasks:
        return Reply(STATUS_REFUSED, policy.site_name, reason=f"task '{cfg.task}' is not allowed by this site's policy")
    try:
        plan = plan_from_arrays(arrays)
    except PlanError as e:  # depends only on what the coordinator sent
        return Reply(STATUS_REFUSED, policy.site_name, reason=f"calibration plan refused: {e}")
    unit = unit_or_none(policy, cfg)
    if unit is None:  # the policy demands patients its data does not name
        return Reply(STATUS_REFUSED, policy.site_name, reason=NO_PATIENTS)
    # No readable image is an ordinary release too (pure noise): a refusal would be an uncharged answer.
    sums, _ = unit_histogram_sums(plan, train_images(policy, cfg, per_patient=unit == PATIENT))
    sigma = policy.evaluation_noise_multiplier
    request = request_hash(KIND, cfg, arrays)
    with locked_release(policy, cfg, request) as (ledger, store, early):
        if early is not None:
            return early
        release = Release(KIND, sigma, 1.0, 1, plan.sensitivity, run=cfg.run_key, round=cfg.server_round,
                          request=request, private=not policy.insecure_deterministic_noise, unit=unit)
        if ledger.would_exceed(release):
            return Reply(STATUS_EXHAUSTED, policy.site_name, metrics=privacy_figures(policy, ledger), unit=ledger.unit,
                         reason="privacy budget exhausted: a calibration release would exceed this site's lifetime budget")
        import torch

        rng = DPRandom(insecure_noise_seed(policy, cfg, KIND))
        noise = rng.gaussian(sigma * plan.sensitivity, sums.shape, torch.float64).numpy()
        ledger.charge(release)  # durable before anything leaves the site
        noisy = {"histograms": (sums + noise).astype(np.float64)}
        reply = Reply(STATUS_OK, policy.site_name, 1, noisy,
                      {**privacy_figures(policy, ledger), "noise-std": float(sigma * plan.sensitivity)},
                      NOT_PRIVATE if policy.insecure_deterministic_noise else "", ledger.unit)
        store.put(request, reply.fields(), reply.arrays)
        return reply
