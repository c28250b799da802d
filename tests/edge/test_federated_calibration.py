"""Federated INT8 calibration (edge/federated/): the site's bounded, noisy, charged histograms and the
coordinator's merge, ranges and QDQ model. A small hand-built ONNX model (Conv -> Relu -> pool -> Gemm)
and phantom images keep these tests to seconds; the federation itself is tests/echofleet/test_release_federation.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from echocare.preprocess import PreprocessSpec
from edge.build.evaluate import load_calibration
from edge.build.quantize import QuantizeConfig, prepare_for_qdq, quantize
from edge.federated.coordinator import SiteAnswer, calibration_points, derive_ranges, make_plan, merge
from edge.federated.plan import CalibrationPlan, PlanError, ScalePlan, image_row, plan_from_arrays
from edge.federated.site import POLICY_REFUSAL, calibrate_round, histogram_sums, unit_histogram_sums
from fed.policy import SitePolicy
from fed.task import RoundConfig

SIZE = PreprocessSpec().size
OPS = ("Conv", "Gemm")


def _tiny_model(path: Path) -> Path:
    """input (N, 3, S, S) -> Conv 3->4 (8x8, stride 8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> (N, 3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 8, 8)).astype(np.float32) * 0.2, "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    g = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "g")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], kernel_shape=[8, 8], strides=[8, 8], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "g"], ["logits"], transB=1, name="gemm")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [w, b, g])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return prepare_for_qdq(path, path.with_name("prepared.onnx"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fedcal")
    model = _tiny_model(root / "tiny.onnx")
    public = load_calibration("phantom:6?seed=11", PreprocessSpec(), limit=6)
    images = load_calibration("phantom:12?seed=5", PreprocessSpec(), limit=12)
    return {"root": root, "model": model, "public": public, "images": images,
            "plan": make_plan(model, OPS, public, bins=64, margin=2.0, clip=1.0, kind="histogram")}


def test_points_are_the_tensors_onnx_runtime_calibrates(tiny):
    assert calibration_points(tiny["model"], OPS) == ["input", "conv", "flat", "logits"]
    plan = tiny["plan"]
    assert plan.edges.shape == (4, 65) and np.allclose(plan.edges[:, 0], -plan.edges[:, -1])


def test_one_image_changes_a_sites_histograms_by_at_most_the_bound(tiny):
    """L2 sensitivity: adding any one image (ordinary, all-zero, huge, NaN, constant) to a site's
    images moves the summed histograms by at most ``clip``; an image piling every value into one bin
    per point (row norm sqrt(P) before clipping) reaches the bound, so the bound is what clipping does."""
    plan = replace(tiny["plan"], clip=0.5)
    base, _ = histogram_sums(plan, tiny["images"][:4])
    crafted = [tiny["images"][7], np.zeros((3, SIZE, SIZE), np.float32), np.full((3, SIZE, SIZE), 1e30, np.float32),
               np.full((3, SIZE, SIZE), np.nan, np.float32), np.full((3, SIZE, SIZE), 0.5, np.float32)]
    changes = []
    for x in crafted:
        more, n = histogram_sums(plan, [*tiny["images"][:4], x])
        assert n == 5
        changes.append(float(np.linalg.norm(more - base)))
    assert max(changes) <= plan.sensitivity * (1 + 1e-9), changes
    assert max(changes) > 0.99 * plan.sensitivity  # the zero / huge images put every value of a point in one bin
    # per point, before clipping: a normalised histogram (sums to 1; all zero when nothing is finite)
    row = image_row([np.array([1.0, 2.0, np.nan]), np.array([np.nan])], np.array([[0, 1, 2, 3.0], [0, 1, 2, 3.0]]), 10.0)
    assert row[0].sum() == pytest.approx(1.0) and row[1].sum() == 0.0


def test_one_patient_changes_the_sums_by_at_most_the_bound_however_many_images(tiny):
    """Per-patient privacy: a patient's rows are summed, then that sum is clipped, so adding a patient
    with five images moves the sums by at most ``clip`` (per image it would be up to 5 x clip)."""
    plan = replace(tiny["plan"], clip=0.5)
    zeros = np.zeros((3, SIZE, SIZE), np.float32)
    others = [(("p", i), x) for i, x in enumerate(tiny["images"][:3])]
    base, _ = unit_histogram_sums(plan, others)
    with_patient, n = unit_histogram_sums(plan, [*others, *((("p", 99), zeros) for _ in range(5))])
    assert n == 8
    assert np.linalg.norm(with_patient - base) <= plan.clip * (1 + 1e-9)
    as_images, _ = unit_histogram_sums(plan, [*others, *((("i", k), zeros) for k in range(5))])
    assert np.linalg.norm(as_images - base) > 4 * plan.clip  # the same five images as five units


def test_merged_site_histograms_give_the_pooled_ranges_exactly_without_noise(tiny):
    """Three sites' exact sums add up to the pooled images' sums, so the derived ranges equal the
    central ones (same images pooled); the min-max ranges enclose ONNX Runtime's own MinMax
    calibration of those images within one bin, and the QDQ model is written from them with no image."""
    plan, images = tiny["plan"], tiny["images"]
    parts = [histogram_sums(plan, images[i::3]) for i in range(3)]
    pooled, n = histogram_sums(plan, images)
    assert n == len(images) and sum(p[1] for p in parts) == n
    merged = merge([SiteAnswer(f"s{i}", "ok", histograms=p[0]) for i, p in enumerate(parts)], plan)
    assert np.allclose(merged.sums, pooled, rtol=0, atol=1e-9) and merged.noise_std == 0.0
    central = merge([SiteAnswer("pooled", "ok", histograms=pooled)], plan)
    for method in ("minmax", "percentile"):
        for symmetric in (False, True):
            fed = derive_ranges(merged, plan, method, symmetric=symmetric).ranges
            assert fed == derive_ranges(central, plan, method, symmetric=symmetric).ranges
    ranges = derive_ranges(merged, plan, "minmax")
    assert not ranges.saturated and not ranges.public_fallback
    # ONNX Runtime's MinMax calibrator on the same pooled images
    from onnxruntime.quantization import create_calibrator

    from edge.build.quantize import _ArrayReader

    cal = create_calibrator(Path(tiny["model"]), list(OPS), augmented_model_path=str(tiny["root"] / "aug.onnx"))
    cal.collect_data(_ArrayReader("input", images))
    ort = {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in cal.compute_data().items()}
    assert set(ort) == set(plan.points)
    for p, name in enumerate(plan.points):
        width = plan.edges[p, 1] - plan.edges[p, 0]
        (lo, hi), (olo, ohi) = ranges.ranges[name], ort[name]
        assert lo <= olo + 1e-6 and hi >= ohi - 1e-6, name
        assert olo - lo <= width + 1e-6 and hi - ohi <= width + 1e-6, name
    q = quantize(tiny["model"], None, tiny["root"] / "q", QuantizeConfig(method="qdq", activations="asymmetric"),
                 ranges=ranges.ranges, prepared=True)
    import onnx

    kinds = {n.op_type for n in onnx.load(str(q.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds


def test_noise_hides_small_bins_and_a_refusing_site_is_named(tiny):
    plan = tiny["plan"]
    pooled, _ = histogram_sums(plan, tiny["images"])
    rng = np.random.default_rng(1)
    answers = [SiteAnswer("a", "ok", histograms=pooled + rng.normal(0, 2.0, pooled.shape), noise_std=2.0),
               SiteAnswer("b", "refused", reason=POLICY_REFUSAL)]
    merged = merge(answers, plan)
    assert merged.sites == ["a"] and merged.noise_std == 2.0
    r = derive_ranges(merged, plan, "minmax")
    assert set(r.ranges) == set(plan.points)  # every point has a range (public one where nothing rises above noise)
    from edge.federated.coordinator import CalibrationFailed

    with pytest.raises(CalibrationFailed, match="b: refused"):
        merge([answers[1]], plan)


def test_pure_noise_sets_no_range_the_public_images_range_is_used():
    """A merged histogram that is only noise (no site signal) yields no spurious range: the threshold
    accounts for the number of bins tested (a fixed 3 sigma lets about 0.13 % of them through, enough
    to set absurd ranges over 21 000 bins), and each point falls back to its public (min, max)."""
    from edge.federated.coordinator import noise_threshold_sigmas

    points = tuple(f"t{i}" for i in range(83))  # echocare-tiny's 83 points x 256 bins
    plan = CalibrationPlan(b"model", points, np.tile(np.linspace(-4.0, 4.0, 257), (83, 1)),
                           public_ranges=np.tile([-1.5, 2.5], (83, 1)))
    cells = len(plan.points) * plan.bins
    noise = np.random.default_rng(7).normal(0.0, 5.0, (len(plan.points), plan.bins))
    merged = merge([SiteAnswer("a", "ok", histograms=noise, noise_std=5.0)], plan)
    r = derive_ranges(merged, plan, "minmax")
    assert r.public_fallback == list(plan.points)
    assert r.ranges == {p: (-1.5, 2.5) for p in plan.points}
    assert noise_threshold_sigmas(cells) == pytest.approx(4.58, abs=0.01)
    assert len(derive_ranges(merged, plan, "minmax", threshold_sigmas=3.0).public_fallback) < 83 - 10  # spikes pass 3 sigma
    # a bulk that rises above the noise (bins 120-135, inside the public range) widens nothing and
    # narrows nothing: a noisy histogram shows no tails, so the range keeps at least the public one
    noise[0, 120:136] += 1000.0
    r = derive_ranges(merge([SiteAnswer("a", "ok", histograms=noise, noise_std=5.0)], plan), plan, "minmax")
    assert "t0" not in r.public_fallback and r.ranges["t0"] == (-1.5, 2.5)
    noise[0, 250] += 1000.0  # mass beyond the public maximum widens it
    assert derive_ranges(merge([SiteAnswer("a", "ok", histograms=noise, noise_std=5.0)], plan), plan, "minmax").ranges["t0"][1] > 3.8


def _policy(root: Path, **kw) -> SitePolicy:
    return SitePolicy(data="phantom:15?seed=3", site_name="h1", state_dir=str(root / "state"), **kw)


def test_site_charges_one_calibrate_release_and_replays_an_identical_request(tiny, tmp_path):
    from fed.ledger import PrivacyLedger

    policy = _policy(tmp_path, insecure_deterministic_noise=True)
    cfg, arrays = RoundConfig(run_key="release-x", server_round=0), tiny["plan"].to_arrays()
    reply = calibrate_round(policy, cfg, arrays)
    assert reply.status == "ok", reply.reason
    noisy = reply.arrays["histograms"]
    assert noisy.shape == (4, 64) and reply.metrics["noise-std"] == policy.evaluation_noise_multiplier * 1.0
    assert "num-examples" not in reply.metrics and set(reply.metrics) >= {"epsilon", "delta"}
    ledger = PrivacyLedger.load(policy.ledger_path)
    assert [(r.kind, r.noise_multiplier, r.sample_rate, r.steps, r.max_grad_norm) for r in ledger.releases] == \
        [("calibrate", policy.evaluation_noise_multiplier, 1.0, 1, 1.0)]
    assert 0 < ledger.epsilon() == pytest.approx(reply.metrics["epsilon"], abs=0.25)  # replies carry it coarsened
    # the noise is there, at the stated scale (deterministic here: the NOT PRIVATE test switch)
    from edge.federated.site import train_images

    exact, _ = unit_histogram_sums(tiny["plan"], train_images(policy, cfg))
    assert np.std(noisy - exact) == pytest.approx(policy.evaluation_noise_multiplier, rel=0.15)
    # an identical re-delivered request: the stored reply, no new charge
    again = calibrate_round(policy, cfg, arrays)
    assert np.array_equal(again.arrays["histograms"], noisy)
    assert len(PrivacyLedger.load(policy.ledger_path).releases) == 1


def test_site_refuses_by_policy_or_a_bad_plan_before_reading_or_charging(tiny, tmp_path):
    cfg = RoundConfig(run_key="release-y")
    off = _policy(tmp_path, calibration=False)
    reply = calibrate_round(off, cfg, tiny["plan"].to_arrays())
    assert (reply.status, reply.reason) == ("refused", POLICY_REFUSAL)
    bad = dict(tiny["plan"].to_arrays(), edges=np.zeros((4, 65)))
    reply = calibrate_round(_policy(tmp_path), cfg, bad)
    assert reply.status == "refused" and "strictly increasing" in reply.reason
    assert not off.ledger_path.exists()
    with pytest.raises(PlanError, match="repeat"):
        CalibrationPlan(b"x", ("a", "a"), np.tile([0.0, 1.0, 2.0], (2, 1)))
    points = json.loads(bytes(tiny["plan"].to_arrays()["points"]).decode())
    assert points == list(tiny["plan"].points)


# -- the scale release (one number per group of points: the default) ------------------------------
def test_scale_plan_one_image_or_patient_changes_the_sums_by_at_most_the_bound(tiny):
    """The scale release's L2 sensitivity is ``clip`` too: the constant and the G group means are
    weighted so that one image's row has norm <= clip whatever its tensors (zero, huge, NaN, constant),
    and a patient's summed rows are clipped to it again."""
    plan = make_plan(tiny["model"], OPS, tiny["public"], clip=0.5, kind="scale", grouping="points")
    assert isinstance(plan, ScalePlan) and plan.release_shape == (1, 1 + plan.n_groups) and plan.n_groups >= 4
    base, _ = histogram_sums(plan, tiny["images"][:4])
    crafted = [tiny["images"][7], np.zeros((3, SIZE, SIZE), np.float32), np.full((3, SIZE, SIZE), 1e30, np.float32),
               np.full((3, SIZE, SIZE), np.nan, np.float32), np.full((3, SIZE, SIZE), 0.5, np.float32),
               -np.full((3, SIZE, SIZE), 1e30, np.float32)]
    changes = [float(np.linalg.norm(histogram_sums(plan, [*tiny["images"][:4], x])[0] - base)) for x in crafted]
    assert max(changes) <= plan.sensitivity * (1 + 1e-9), changes
    assert max(changes) > 0.9 * plan.sensitivity  # a huge image reaches +width at every side: the bound is tight
    # the row itself is within the bound (the site's per-unit clipping then never reweights an image)
    P = len(plan.points)
    for logm in (np.full((P, 2), np.inf), np.full((P, 2), -np.inf), np.full((P, 2), np.nan), np.zeros((P, 2))):
        assert np.linalg.norm(plan.row_of_magnitudes(logm)) <= plan.clip * (1 + 1e-9)
    assert np.linalg.norm(plan.row_of_magnitudes(np.full((P, 2), np.inf))) == pytest.approx(plan.clip)
    others = [(("p", i), x) for i, x in enumerate(tiny["images"][:3])]
    ref, _ = unit_histogram_sums(plan, others)
    huge = np.full((3, SIZE, SIZE), 1e30, np.float32)
    more, _ = unit_histogram_sums(plan, [*others, *((("p", 99), huge) for _ in range(5))])
    assert np.linalg.norm(more - ref) <= plan.clip * (1 + 1e-9)


def test_scale_plan_finds_the_scale_of_the_sites_activations(tiny):
    """The tiny model is positively homogeneous (Conv without bias, Relu, pool, Gemm without bias), so
    images twice as bright give every tensor twice the magnitude: without noise the merged scale is
    exactly log 2 and each range is the public one doubled; with noise it is log 2 within the noise;
    with too few images for the noise, every point keeps the public range."""
    public = tiny["public"]
    plan = make_plan(tiny["model"], OPS, public, kind="scale")  # sides: one scale for lows, one for highs
    assert plan.n_groups == 2
    parts = [histogram_sums(plan, 2.0 * public[i::3])[0] for i in range(3)]
    merged = merge([SiteAnswer(f"s{i}", "ok", histograms=p) for i, p in enumerate(parts)], plan)
    r = derive_ranges(merged, plan, "minmax")
    assert r.count == pytest.approx(len(public)) and r.scales == pytest.approx([np.log(2.0)] * 2)
    for name, (lo, hi) in zip(plan.points, plan.public_ranges):
        assert r.ranges[name] == pytest.approx((2.0 * lo, 2.0 * hi))
    # many such images at sigma 8: the scale within the noise the notes state
    rng = np.random.default_rng(0)
    big = merge([SiteAnswer(f"s{i}", "ok", histograms=200 * p + rng.normal(0, 8.0, p.shape), noise_std=8.0)
                 for i, p in enumerate(parts)], plan)
    assert derive_ranges(big, plan).scales == pytest.approx([np.log(2.0)] * 2, abs=0.1)
    few = merge([SiteAnswer("s", "ok", histograms=parts[0] + rng.normal(0, 8.0, parts[0].shape), noise_std=8.0)], plan)
    r = derive_ranges(few, plan)
    assert r.public_fallback == list(plan.points) and r.ranges[plan.points[-1]] == tuple(plan.public_ranges[-1])
    # enough images to count, too few to tell a log 2 scale from the noise: the public range is kept
    some = merge([SiteAnswer("s", "ok", histograms=5 * parts[0], noise_std=1.5)], plan)  # count 5.8 > 3 x 1.5; scale noise 0.52
    r = derive_ranges(some, plan)
    assert not r.public_fallback and r.scales == [0.0, 0.0] and "0 above 2 noise deviations" in r.notes[-1]
    assert r.ranges[plan.points[-1]] == tuple(plan.public_ranges[-1])


def test_scale_plan_travels_as_arrays_and_a_bad_one_is_refused(tiny, tmp_path):
    plan = make_plan(tiny["model"], OPS, tiny["public"], kind="scale", grouping="points")
    back = plan_from_arrays(plan.to_arrays())
    assert isinstance(back, ScalePlan) and back.digest() == plan.digest() and back.points == plan.points
    assert isinstance(plan_from_arrays(tiny["plan"].to_arrays()), CalibrationPlan)  # no kind: histograms
    bad = dict(plan.to_arrays(), groups=np.full_like(plan.groups, 7))
    reply = calibrate_round(_policy(tmp_path), RoundConfig(run_key="release-z"), bad)
    assert reply.status == "refused" and "groups" in reply.reason
    assert not _policy(tmp_path).ledger_path.exists()
    with pytest.raises(PlanError, match="kind"):
        plan_from_arrays(dict(plan.to_arrays(), kind=np.frombuffer(b"other", np.uint8)))


def test_site_charges_one_scale_release_of_the_plans_shape(tiny, tmp_path):
    from fed.ledger import PrivacyLedger

    policy = _policy(tmp_path, insecure_deterministic_noise=True)
    plan = make_plan(tiny["model"], OPS, tiny["public"], kind="scale")
    reply = calibrate_round(policy, RoundConfig(run_key="release-s", server_round=0), plan.to_arrays())
    assert reply.status == "ok", reply.reason
    assert reply.arrays["histograms"].shape == plan.release_shape == (1, 3)
    assert [(r.kind, r.noise_multiplier, r.sample_rate, r.steps, r.max_grad_norm)
            for r in PrivacyLedger.load(policy.ledger_path).releases] == [("calibrate", policy.evaluation_noise_multiplier, 1.0, 1, 1.0)]
