"""Federated acceptance of a candidate scanner build (edge/federated/accept.py): plain functions, no Flower.

The model is a tiny hand-built ONNX classifier (not the EchoCare encoder, so the module builds in a
few seconds): two features, the contrast of the image centre and of the region below it against the
whole image (a hypoechoic lesion darkens the centre; shadowing or enhancement shows below it),
each through its own Gemm, fitted by logistic regression on phantoms of all three probes. The INT8 candidate is a real ONNX Runtime QDQ quantization
(:func:`edge.build.quantize.quantize`, min-max) calibrated on linear-probe phantoms only: the
convex probe (fan on black) puts both contrasts far outside their calibrated ranges, so INT8 clips it
there. That is the failure federated acceptance exists for: a central gate on the linear sites'
data passes, the convex site refuses the build.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from echocare.bundle import AcceptanceRecord, generate_keypair
from edge.build.gate import GateBounds, check_gate
from edge.federated import accept as acc
from edge.federated.accept import (
    AcceptanceReply,
    AcceptanceRequest,
    accept_at_site,
    decide_acceptance,
)
from fed.policy import SitePolicy

LABELS = ["benign", "malignant", "normal"]
SIZE = 64
LINEAR, SHIFTED = "linear-a,linear-c", "convex-b"
BOUNDS = GateBounds(auroc_points=2.0)


def _features(x: np.ndarray) -> np.ndarray:
    """The model's two features in numpy: (centre mean, lower-centre mean) minus the image mean."""
    lo, hi = SIZE // 4, 3 * SIZE // 4
    m = x.mean((1, 2, 3))
    return np.stack([x[:, :, lo:hi, lo:hi].mean((1, 2, 3)) - m, x[:, :, SIZE // 2:, lo:hi].mean((1, 2, 3)) - m], 1)


def _contrast_model(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    """logits = Gemm(f1, w[0], b) + Gemm(f2, w[1]) with f1, f2 as :func:`_features` (each Gemm input is
    one activation tensor with its own INT8 range once quantized)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    lo, hi = SIZE // 4, 3 * SIZE // 4
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=1)]
    for i in (1, 2):
        nodes += [helper.make_node("Slice", ["input", f"start{i}", f"end{i}", "axes"], [f"region{i}"]),
                  helper.make_node("ReduceMean", [f"region{i}"], [f"mean{i}"], axes=[1, 2, 3], keepdims=1),
                  helper.make_node("Sub", [f"mean{i}", "m"], [f"d{i}"]),
                  helper.make_node("Reshape", [f"d{i}", "shape"], [f"f{i}"])]
    nodes += [helper.make_node("Gemm", ["f1", "w1", "b"], ["l1"]), helper.make_node("Gemm", ["f2", "w2"], ["l2"]),
              helper.make_node("Add", ["l1", "l2"], ["logits"])]
    ints = {"start1": [lo, lo], "end1": [hi, hi], "start2": [SIZE // 2, lo], "end2": [SIZE, hi], "axes": [2, 3],
            "shape": [-1, 1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in ints.items()]
    inits += [numpy_helper.from_array(w[i:i + 1].astype(np.float32), f"w{i + 1}") for i in (0, 1)]
    inits += [numpy_helper.from_array(b.astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "contrast", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _images(spec: str, pre):
    from edge.build.evaluate import load_eval_set

    return load_eval_set(spec, "classify", LABELS, pre)


@pytest.fixture(scope="module", autouse=True)
def phantoms_once():
    """Each phantom is generated once per module (they are deterministic in their arguments; the
    split's near-duplicate check and the validation set read the same images): a speed cache only."""
    from echocare.phantom import PhantomGenerator

    original, memo = PhantomGenerator.__call__, {}

    def cached(self, index, profile, label, seed=0):
        key = (index, profile if isinstance(profile, str) else profile.name, label, seed)
        if key not in memo:
            memo[key] = original(self, index, profile, label, seed)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PhantomGenerator, "__call__", cached)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, the FP32 reference bundle, the INT8 candidate bundle, and a site policy maker."""
    from sklearn.linear_model import LogisticRegression

    from echocare.preprocess import PreprocessSpec
    from edge.build.bundling import assemble_bundle
    from edge.build.compiled import CompileOptions, compile_model
    from edge.build.quantize import QuantizeConfig, quantize

    tmp = tmp_path_factory.mktemp("accept")
    key, pub = generate_keypair(tmp / "keys" / "release")
    other, other_pub = generate_keypair(tmp / "keys" / "other")
    pre = PreprocessSpec(size=SIZE)
    fit = _images("phantom:36?seed=21", pre)  # the federation trained on every site's probe
    clf = LogisticRegression(C=100.0, max_iter=5000).fit(_features(fit.inputs), fit.targets)
    fp32 = _contrast_model(tmp / "fp32.onnx", clf.coef_.T, clf.intercept_)
    calib = _images(f"phantom:12?profiles={LINEAR}&seed=22", pre).inputs  # central calibration: linear probes only
    q = quantize(fp32, calib, tmp / "int8", QuantizeConfig("qdq", op_types=("Gemm",)))
    info = {"task": "classify", "labels": LABELS, "preprocess": pre.to_dict(),
            "encoder": {"config": "none", "checkpoint": None, "sha256": None, "seed": 0}, "head": {"kind": "contrast"},
            "provenance": {"note": "test model: two contrast features, fitted on phantoms"},
            "input": {"name": "input", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "logits", "shape": [-1, 3]}, "opset": 17}
    ref = acc.reference_bundle(fp32, info, key, tmp / "bundles", name="contrast-fp32", version="1",
                               selftest_inputs=calib[:2])
    compiled = compile_model("onnxruntime-cpu", q.model_path, tmp / "cand-work",
                             CompileOptions(graph_precision="int8", input_chw=(3, SIZE, SIZE)))
    cand = assemble_bundle(tmp / "bundles", key, info=info, compiled=compiled, selftest_inputs=calib[:2],
                           name="contrast-int8", version="1", work=tmp / "cand-work")
    forged = assemble_bundle(tmp / "forged", other, info=info, compiled=compiled, selftest_inputs=calib[:2],
                             name="contrast-int8", version="1", work=tmp / "forged-work")

    def site(name: str, profiles: str, seed: int, **kw) -> SitePolicy:
        kw = {"evaluation": "disclosed", **kw}
        return SitePolicy(data=f"phantom:30?profiles={profiles}&seed={seed}", site_name=name,
                          state_dir=str(tmp / "sites" / name), release_pubkey=str(pub), **kw)

    return {"tmp": tmp, "pub": pub, "other_pub": other_pub, "ref": ref, "cand": cand, "forged": forged, "site": site,
            "pre": pre, "fp32": fp32, "int8": q.model_path}


def _request(world, **kw) -> AcceptanceRequest:
    return AcceptanceRequest(reference=world["ref"].read_bytes(), val_fraction=0.5, latency_runs=3, **kw)


def _ledger(policy: SitePolicy) -> dict:
    return json.loads(policy.ledger_path.read_text())


def test_bundle_signed_with_another_key_is_refused_before_anything_runs(world) -> None:
    """A site pins the release key: a candidate signed by anything else is refused with the reason;
    no data is read (the site's data spec does not even exist) and no ledger is written."""
    policy = SitePolicy(data="busi:/nonexistent/BUSI", site_name="hospital-x", state_dir=str(world["tmp"] / "sites" / "x"),
                        release_pubkey=str(world["pub"]))
    reply = accept_at_site(policy, world["forged"].read_bytes(), _request(world))
    assert reply.status == "refused" and "does not verify against the release key this site pins" in reply.reason
    assert "candidate" in reply.reason and not policy.ledger_path.exists()
    # The genuine candidate, but the site pins the other key: refused the same way.
    pinned_other = SitePolicy(**{**policy.to_dict(), "release_pubkey": str(world["other_pub"])})
    assert "does not verify" in accept_at_site(pinned_other, world["cand"], _request(world)).reason
    # No key pinned / the policy does not take part: refused, nothing run.
    assert accept_at_site(SitePolicy(**{**policy.to_dict(), "release_pubkey": ""}), world["cand"], _request(world)).reason == acc.NO_KEY
    assert accept_at_site(SitePolicy(**{**policy.to_dict(), "acceptance": False}), world["cand"],
                          _request(world)).reason == acc.POLICY_REFUSAL


def test_reference_of_another_model_is_refused(world) -> None:
    """The FP32 reference must be the candidate's own model in FP32 (the candidate as its own reference is not)."""
    policy = world["site"]("hospital-r", "linear-a", 41)
    reply = accept_at_site(policy, world["cand"], AcceptanceRequest(reference=world["cand"], val_fraction=0.5))
    assert reply.status == "refused" and "not an FP32 build" in reply.reason
    assert not policy.ledger_path.exists()


def test_honest_candidate_passes_at_three_sites(world) -> None:
    sites = [world["site"](n, p, s) for n, p, s in (("hospital-a", "linear-a", 41), ("hospital-b", "linear-c", 42),
                                                    ("hospital-c", LINEAR, 43))]
    replies = [accept_at_site(p, world["cand"], _request(world, run_key="honest")) for p in sites]
    assert [r.status for r in replies] == ["ok"] * 3, [r.reason for r in replies]
    for r in replies:
        assert r.mode == "disclosed" and r.metric == "auroc" and r.backend == "onnxruntime" and r.precision == "int8"
        assert r.p50_ms is not None and r.p50_ms > 0 and r.selftest.startswith("passed")
        assert r.candidate == "contrast-int8-1"
    record = decide_acceptance(replies, BOUNDS)
    assert record.passed, record.reason
    parsed = AcceptanceRecord.from_dict(json.loads(json.dumps(record.to_dict())))  # the manifest's schema
    assert parsed.verdict()[0] and parsed.quorum == 3 and [s.site for s in parsed.sites] == ["hospital-a", "hospital-b", "hospital-c"]
    # Disclosed: exact, logged in each site's ledger as an "accept" disclosure (no epsilon charged).
    for p in sites:
        assert [d["kind"] for d in _ledger(p)["disclosures"]] == ["accept"] and _ledger(p)["releases"] == []


def test_shifted_site_fails_acceptance_while_a_central_gate_on_the_other_sites_passes(world) -> None:
    """Convex-probe images (another device profile) push the feature out of the INT8 range calibrated
    on linear probes: the convex site refuses the build, naming itself and the metric, while the
    central gate run on the two linear sites' validation images passes."""
    from edge.build.evaluate import evaluate, load_eval_set
    from edge.device.backends import open_session
    from fed.task import RoundConfig, site_split

    sites = [world["site"](n, p, s) for n, p, s in (("hospital-a", "linear-a", 41), ("hospital-b", "linear-c", 42),
                                                    ("hospital-shifted", SHIFTED, 44))]
    replies = [accept_at_site(p, world["cand"], _request(world, run_key="shifted")) for p in sites]
    assert [r.status for r in replies] == ["ok"] * 3, [r.reason for r in replies]
    record = decide_acceptance(replies, BOUNDS)
    assert not record.passed
    assert "hospital-shifted: auroc drop" in record.reason and "hospital-a:" not in record.reason
    verdicts = {s.site: s.passed for s in record.sites}
    assert verdicts == {"hospital-a": True, "hospital-b": True, "hospital-shifted": False}
    # The central gate on the linear sites' pooled validation images (what a build machine holding
    # them would run, edge.build.pipeline's gate): passes.
    cfg = RoundConfig(val_fraction=0.5)
    pooled = [load_eval_set(site_split(p, cfg, "val"), "classify", LABELS, world["pre"]) for p in sites[:2]]
    ev = pooled[0]
    ev.inputs, ev.targets = np.concatenate([e.inputs for e in pooled]), np.concatenate([e.targets for e in pooled])
    central = check_gate("classify", evaluate(open_session(world["fp32"], "onnxruntime").run, ev),
                         evaluate(open_session(world["int8"], "onnxruntime").run, ev), BOUNDS)
    assert central.passed, central.reason
    # With a quorum of 2 the run accepts the build, and the record still names the failed site.
    quorum = decide_acceptance(replies, BOUNDS, quorum=2)
    assert quorum.passed and "hospital-shifted" in quorum.reason and AcceptanceRecord.from_dict(quorum.to_dict()).verdict()[0]


def test_accounted_acceptance_is_noisy_charged_and_replayed(world, monkeypatch) -> None:
    """Accounted mode: the release is charged to the lifetime ledger as kind "accept"; two requests that
    differ only in their run key (different request hashes) give different numbers (fresh noise); an
    identical re-delivered request gets the stored reply with no new charge."""
    policy = world["site"]("hospital-n", "linear-a", 41, evaluation="accounted", evaluation_noise_multiplier=0.5,
                           target_epsilon=50.0)
    first = accept_at_site(policy, world["cand"], _request(world, run_key="run-1"))
    second = accept_at_site(policy, world["cand"], _request(world, run_key="run-2"))
    assert first.status == second.status == "ok", (first.reason, second.reason)
    assert first.mode == "accounted" and first.noise_sd > 0 and math.isfinite(first.difference)
    assert first.differences != second.differences
    releases = _ledger(policy)["releases"]
    assert [(r["kind"], r["run"]) for r in releases] == [("accept", "run-1"), ("accept", "run-2")]
    assert releases[0]["noise_multiplier"] == 0.5 and releases[0]["max_grad_norm"] == pytest.approx(math.sqrt(2 * 6))
    assert first.privacy["epsilon"] > 0
    again = accept_at_site(policy, world["cand"], _request(world, run_key="run-1"))
    assert again == first and len(_ledger(policy)["releases"]) == 2


def test_accounted_numbers_really_carry_noise(world, monkeypatch) -> None:
    """Break the noise on purpose (zero Gaussian): two requests then give identical numbers, so the
    previous test's inequality is the noise, not something else."""
    from fed.dp import DPRandom

    monkeypatch.setattr(DPRandom, "gaussian", lambda self, std, shape, dtype=None: __import__("torch").zeros(shape, dtype=dtype))
    policy = world["site"]("hospital-z", "linear-a", 41, evaluation="accounted", evaluation_noise_multiplier=0.5,
                           target_epsilon=50.0)
    a = accept_at_site(policy, world["cand"], _request(world, run_key="run-1"))
    b = accept_at_site(policy, world["cand"], _request(world, run_key="run-2"))
    assert a.status == b.status == "ok" and a.differences == b.differences


def test_budget_exhausted_site_does_not_release(world) -> None:
    policy = world["site"]("hospital-e", "linear-a", 41, evaluation="accounted", target_epsilon=0.01)
    reply = accept_at_site(policy, world["cand"], _request(world))
    assert reply.status == "budget-exhausted" and _ledger_or_empty(policy) == []


def _ledger_or_empty(policy: SitePolicy) -> list:
    return _ledger(policy)["releases"] if policy.ledger_path.exists() else []


def _reply(site: str, diff: float, mode: str = "disclosed", noise: float = 0.0, status: str = "ok") -> AcceptanceReply:
    return AcceptanceReply(site, status, "" if status == "ok" else "budget exhausted", candidate="c-1", mode=mode,
                           metric="auroc", difference=diff, noise_sd=noise, p50_ms=1.0)


def test_quorum_logic() -> None:
    good, bad = _reply("a", -0.005), _reply("b", -0.05)  # drops of 0.5 and 5 AUROC points
    bounds = GateBounds(auroc_points=1.0)
    assert decide_acceptance([good, _reply("c", 0.01)], bounds).passed  # an improvement is within the bound
    everyone = decide_acceptance([good, bad], bounds)
    assert not everyone.passed and "b: auroc drop 5 AUROC points > bound 1" in everyone.reason
    assert decide_acceptance([good, bad, _reply("c", 0.0)], bounds, quorum=2).passed
    assert not decide_acceptance([good, bad], bounds, quorum=2).passed
    # A site that did not take part is no participant: all participants passed, but the quorum is not met.
    absent = decide_acceptance([good, _reply("d", 0.0, status="budget-exhausted")], bounds, quorum=2)
    assert not absent.passed and "d did not take part" in absent.reason
    assert decide_acceptance([good, _reply("d", 0.0, status="refused")], bounds).passed
    assert not decide_acceptance([_reply("d", 0.0, status="refused")], bounds).passed  # nobody took part
    # Undefined metric and too-noisy accounted results never pass.
    assert not decide_acceptance([good, _reply("u", math.nan)], bounds).passed
    noisy = decide_acceptance([_reply("n", 0.0, mode="accounted", noise=0.05)], bounds)
    assert not noisy.passed and "inconclusive" in noisy.reason
    assert decide_acceptance([_reply("n", 0.0, mode="accounted", noise=0.005)], bounds).passed
    with pytest.raises(ValueError):
        decide_acceptance([good], bounds, quorum=0)


def _dark_segmenter(path: Path) -> Path:
    """A 1x1 convolution: the lesion channel wins where the image is darker than 0.3 (hypoechoic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((2, 3, 1, 1), np.float32)
    w[0, :, 0, 0], w[1, :, 0, 0] = 10.0 / 3, -10.0 / 3
    b = np.array([-1.5, 1.5], np.float32)  # logit difference 20 * (x - 0.3)
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w", "b"], ["logits"])], "dark",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, SIZE, SIZE])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_segmentation_candidate_disclosed_and_accounted(world) -> None:
    """Segmentation: the gate metric is Dice. An FP32 candidate of the same model (another target's
    FP32 build) differs by exactly 0 when disclosed; the accounted answer is charged and noisy."""
    from edge.build.bundling import assemble_bundle
    from edge.build.compiled import CompileOptions, compile_model

    tmp, labels, key = world["tmp"] / "seg", ["background", "lesion"], world["tmp"] / "keys" / "release"
    tmp.mkdir()
    onnx_path = _dark_segmenter(tmp / "seg.onnx")
    info = {"task": "segment", "labels": labels, "preprocess": world["pre"].to_dict(),
            "encoder": {"config": "none", "checkpoint": None, "sha256": None, "seed": 0}, "head": {"kind": "dark"},
            "provenance": {"note": "test model: a darkness threshold"}, "opset": 17,
            "input": {"name": "input", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "logits", "shape": [-1, 2, SIZE, SIZE]}}
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    ref = acc.reference_bundle(onnx_path, info, key, tmp / "bundles", name="dark-fp32", version="1", selftest_inputs=x)
    compiled = compile_model("onnxruntime-cpu", onnx_path, tmp / "cand", CompileOptions(graph_precision="fp32",
                                                                                        input_chw=(3, SIZE, SIZE)))
    cand = assemble_bundle(tmp / "bundles", key, info=info, compiled=compiled,
                           selftest_inputs=x, name="dark-fp32-other", version="1", work=tmp / "cand")
    request = AcceptanceRequest(reference=ref, val_fraction=0.5, latency_runs=2)
    disclosed = accept_at_site(world["site"]("seg-d", "linear-a", 41, allowed_tasks=("segment",)), cand, request)
    assert disclosed.status == "ok" and disclosed.metric == "dice" and disclosed.difference == 0.0, disclosed.reason
    assert decide_acceptance([disclosed], GateBounds(dice=0.0)).passed
    policy = world["site"]("seg-a", "linear-a", 41, allowed_tasks=("segment",), evaluation="accounted",
                           evaluation_noise_multiplier=0.5, target_epsilon=50.0)
    accounted = accept_at_site(policy, cand, request)
    assert accounted.status == "ok" and accounted.mode == "accounted" and accounted.difference != 0.0
    assert accounted.noise_sd > 0 and [r["kind"] for r in _ledger(policy)["releases"]] == ["accept"]
    assert _ledger(policy)["releases"][0]["max_grad_norm"] == pytest.approx(math.sqrt(2 * 5))


def test_messages_travel_as_flat_records(world) -> None:
    """Request and reply as flat records (what a Flower ConfigRecord carries): the site answers a request
    rebuilt from its record, the reply comes back equal; a malformed record names the key."""
    record = acc.request_record(world["cand"], _request(world, run_key="records"))
    assert all(isinstance(v, (bytes, str, int, float)) for v in record.values())
    candidate, request = acc.request_from_record(record)
    reply = accept_at_site(world["site"]("hospital-a", "linear-a", 41), candidate, request)
    assert reply.status == "ok", reply.reason
    assert acc.reply_from_record(json.loads(json.dumps(acc.reply_record(reply)))) == reply
    with pytest.raises(ValueError, match="'reference' is missing"):
        acc.request_from_record({k: v for k, v in record.items() if k != "reference"})
    with pytest.raises(ValueError, match="'round' is a str"):
        acc.request_from_record({**record, "round": "1"})
    with pytest.raises(ValueError, match="must travel as its .tar.gz"):
        acc.request_record(world["tmp"], _request(world))
