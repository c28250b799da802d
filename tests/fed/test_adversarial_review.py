"""Adversarial review of issue 9: the coordinator attacks a site (docs/privacy.md, "What is not yet done").

Each test plays a curious or malicious coordinator with something it controls (a calibration plan's
ONNX model, the round config, a head) and checks that what comes back is accounted or a stated
disclosure, never an exact, uncharged answer about the site's data. Each failed on the code before
its fix (the commit that added it says how)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from echocare.preprocess import PreprocessSpec
from edge.federated.plan import CalibrationPlan
from edge.federated.site import calibrate_round, train_images
from fed.ledger import PrivacyLedger
from fed.policy import SitePolicy
from fed.task import RoundConfig

SIZE = PreprocessSpec().size


def _policy(root: Path, **kw) -> SitePolicy:
    return SitePolicy(data="phantom:15?seed=3", site_name="h1", state_dir=str(root / "state"), **kw)


def _tripwire_model(threshold: float) -> bytes:
    """A coordinator's "calibration model" that computes nothing useful: it fails (an out-of-range
    Gather in ONNX Runtime) exactly when the image's mean pixel exceeds ``threshold``, else outputs
    that mean. Uncaught, the failure is a free, exact yes/no answer about the site's images."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(threshold, np.float32), "t"),
              numpy_helper.from_array(np.array(10 ** 6, np.int64), "big"),
              numpy_helper.from_array(np.zeros(2, np.float32), "table")]
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
             helper.make_node("Greater", ["mean", "t"], ["over"]),
             helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
             helper.make_node("Mul", ["over_i", "big"], ["index"]),
             helper.make_node("Gather", ["table", "index"], ["picked"]),
             helper.make_node("Add", ["picked", "mean"], ["out"])]
    graph = helper.make_graph(nodes, "tripwire",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _tripwire_plan(threshold: float) -> dict[str, np.ndarray]:
    return CalibrationPlan(_tripwire_model(threshold), ("out",), np.linspace(-1, 1, 17)[None], clip=1.0).to_arrays()


def test_a_calibration_model_that_fails_on_some_images_gets_no_exact_answer(tmp_path):
    """Attack: binary-search a statistic of the site's training images with a model that raises for
    images above a threshold. Before the fix the failure was answered "could not answer" and not
    charged: an unlimited, exact oracle (the maximum mean pixel to any precision). Now an image the
    model fails on contributes a zero row (within the bound), so the reply is an ordinary, charged,
    noisy release whether or not any image tripped the wire."""
    policy = _policy(tmp_path)
    cfg = RoundConfig(run_key="release-attack", server_round=0)
    means = sorted(float(x.mean()) for _, x in train_images(policy, cfg))
    assert len(means) >= 3
    between = (means[-2] + means[-1]) / 2  # only the brightest image trips
    replies = [calibrate_round(policy, cfg, _tripwire_plan(t)) for t in (means[-1] + 1.0, between, means[0] - 1.0)]
    assert [r.status for r in replies] == ["ok", "ok", "ok"], [r.reason for r in replies]
    assert len({r.reason for r in replies}) == 1
    assert len(PrivacyLedger.load(policy.ledger_path).releases) == 3  # every answer was charged


# -- training and evaluation on phantom features (the session's shared feature cache) -------------
DATA = "phantom:30?profiles=linear-a,convex-b,linear-c&seed=0"  # a prefix of the federation tests' phantoms


def _site(tmp_path: Path, cache: str, **kw) -> SitePolicy:
    return SitePolicy(data=DATA, site_name="hospital-a", state_dir=str(tmp_path / "state"), cache_dir=cache, **kw)


def _plain_head(seed: int = 0, k: int = 3, **options) -> dict[str, np.ndarray]:
    """A seeded classification head of ``k`` labels without fixed buffers (no projection): enough for
    training attacks; ``options``: more head options (``hidden=8``: a hidden layer)."""
    import torch

    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    torch.manual_seed(seed)
    head = build_head("classify", get_config("echocare-tiny"), k, proj_dim=0, **options)
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def _train_cfg(**kw) -> RoundConfig:
    base = {"head": {"proj_dim": 0}, "local_epochs": 1, "batch_size": 1000, "lr": 1.0, "max_grad_norm": 0.5,
            "noise_multiplier": 1.0, "num_rounds": 3, "server_round": 1, "seed": 0, "run_key": "run-a"}
    return RoundConfig(**{**base, **kw})


def test_an_exhausted_reply_carries_the_coarse_epsilon_not_the_exact_one(tmp_path, phantom_feature_cache):
    """Attack: replies carry epsilon rounded up to 0.25 because the exact value is a function of N
    (sigma and batch size are the coordinator's). Drive the site to exhaustion and read the refusal
    text: before the fix it said "spent epsilon 4.xyz", the exact lifetime epsilon (and so N)."""
    from fed.task import train_round

    policy = _site(tmp_path, phantom_feature_cache, target_epsilon=6.0)
    first = train_round(policy, _train_cfg(), _plain_head(0))
    assert first.status == "ok", first.reason
    second = train_round(policy, _train_cfg(server_round=2), _plain_head(1))
    assert second.status == "budget-exhausted", second.reason
    exact = PrivacyLedger.load(policy.ledger_path).epsilon()
    assert f"{exact:.3f}" not in second.reason and f"{exact:.2f}" not in second.reason, second.reason
    assert second.metrics["epsilon"] == first.metrics["epsilon"] != round(exact, 3)


def test_asking_whether_a_label_exists_at_the_site_costs_a_charged_release(tmp_path, phantom_feature_cache):
    """Attack: the coordinator chooses the round's labels; images with another label are skipped. An
    evaluation for a label the site may not have (a rare diagnosis) used to be refused, uncharged,
    "no labelled validation images at this site" exactly when none of its images has it: an unlimited
    yes/no oracle on the site's data. Accounted evaluation now answers both with a noisy, charged
    release (the noisy sums of no rows are pure noise)."""
    from fed.task import evaluate_round

    policy = _site(tmp_path, phantom_feature_cache)
    replies = {}
    for label in ("benign", "a-diagnosis-nobody-here-has"):
        cfg = _train_cfg(labels=[label, "another-absent-label"], head={"proj_dim": 0}, run_key=f"eval-{label}")
        import torch

        from echocare.models.encoder import get_config
        from echocare.models.heads import build_head

        torch.manual_seed(0)
        head = build_head("classify", get_config("echocare-tiny"), 2, proj_dim=0)
        replies[label] = evaluate_round(policy, cfg, {k: v.detach().numpy() for k, v in head.state_dict().items()})
    assert {r.status for r in replies.values()} == {"ok"}, {k: r.reason for k, r in replies.items()}
    assert [r.kind for r in PrivacyLedger.load(policy.ledger_path).releases] == ["evaluate", "evaluate"]


# -- federated acceptance: a signed candidate is still the coordinator's code ----------------------
ACC_SIZE, ACC_LABELS = 64, ["benign", "malignant", "normal"]


def _tripwire_classifier(path: Path, threshold: float) -> Path:
    """(N, 3, S, S) -> (N, 3) logits that fail (out-of-range Gather) for any image whose mean pixel
    exceeds ``threshold``: a "classifier" whose only purpose is to ask a yes/no question."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(threshold, np.float32), "t"),
              numpy_helper.from_array(np.array(10 ** 6, np.int64), "big"),
              numpy_helper.from_array(np.eye(3, dtype=np.float32)[:2], "table")]
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Greater", ["mean", "t"], ["over"]),
             helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
             helper.make_node("Mul", ["over_i", "big"], ["index"]),
             helper.make_node("Gather", ["table", "index"], ["logits"])]
    graph = helper.make_graph(nodes, "tripwire",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, ACC_SIZE, ACC_SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _tripwire_bundles(tmp_path: Path, threshold: float, tag: str, labels: list[str] = ACC_LABELS) -> tuple[Path, Path, Path]:
    """(public key, candidate tarball, FP32 reference tarball) of the tripwire classifier, both signed
    with the release key the site pins (the coordinator holds it: it is the release authority)."""
    from echocare.bundle import generate_keypair
    from edge.build.bundling import assemble_bundle
    from edge.build.compiled import CompileOptions, compile_model
    from edge.federated import accept as acc

    key, pub = tmp_path / "keys" / "release", tmp_path / "keys" / "release.pub"
    if not key.exists():
        key, pub = generate_keypair(key)
    pre = PreprocessSpec(size=ACC_SIZE)
    info = {"task": "classify", "labels": labels, "preprocess": pre.to_dict(),
            "encoder": {"config": "none", "checkpoint": None, "sha256": None, "seed": 0}, "head": {"kind": "trip"},
            "provenance": {"note": "adversarial test"}, "opset": 17,
            "input": {"name": "input", "shape": [-1, 3, ACC_SIZE, ACC_SIZE], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "logits", "shape": [-1, 3]}}
    zero = np.zeros((1, 3, ACC_SIZE, ACC_SIZE), np.float32)  # the public self-test sample: trips no threshold > 0
    onnx_path = _tripwire_classifier(tmp_path / f"trip-{tag}.onnx", threshold)
    ref = acc.reference_bundle(onnx_path, info, key, tmp_path / f"b-{tag}", name=f"trip-fp32-{tag}", version="1",
                               selftest_inputs=zero)
    compiled = compile_model("onnxruntime-cpu", onnx_path, tmp_path / f"c-{tag}",
                             CompileOptions(graph_precision="fp32", input_chw=(3, ACC_SIZE, ACC_SIZE)))
    cand = assemble_bundle(tmp_path / f"b-{tag}", key, info=info, compiled=compiled, selftest_inputs=zero,
                           name=f"trip-cand-{tag}", version="1", work=tmp_path / f"c-{tag}")
    return Path(pub), cand, ref


def _acc_site(tmp_path: Path, pub: Path, **kw) -> SitePolicy:
    """A site pinning the release key ``pub``; ``kw``: other policy fields (its data too)."""
    return SitePolicy(**{"data": "phantom:12?profiles=linear-a&seed=41", "site_name": "h-acc", "release_pubkey": str(pub),
                         "state_dir": str(tmp_path / "site"), **kw})


def _accept(policy: SitePolicy, cand: Path, ref: Path, run_key: str):
    """The site's acceptance reply to a signed candidate and its FP32 reference (half of its data as
    validation split, one latency run)."""
    from edge.federated import accept as acc

    return acc.accept_at_site(policy, cand, acc.AcceptanceRequest(reference=ref, run_key=run_key, val_fraction=0.5,
                                                                  seed=0, latency_runs=1))


def _honest_acceptance(tmp_path: Path, tag: str, labels: list[str] = ACC_LABELS, **policy):
    """(site policy, its reply) for a signed tripwire candidate that trips on no image (an honest model
    naming ``labels``), asked under run key ``tag``; ``policy``: the site's fields (:func:`_acc_site`)."""
    pub, cand, ref = _tripwire_bundles(tmp_path, 1e9, tag, labels)
    site = _acc_site(tmp_path, pub, **policy)
    return site, _accept(site, cand, ref, tag)


def _per_patient_phantoms(root: Path) -> str:
    """The data spec of 18 phantoms (3 profiles) listed in ``root/manifest.csv`` with a patient column:
    3 images per patient, each patient's images of one label."""
    import csv

    from echocare.phantom import write_phantoms

    manifest = write_phantoms(root / "images", 18, profiles="linear-a,convex-b,linear-c", seed=0)
    by_label: dict[str, list[str]] = {}
    for rel, info in sorted(manifest["files"].items()):
        by_label.setdefault(info["label"], []).append(rel)
    rows = [(f"images/{f}", label, f"P-{label}-{i // 3}") for label, files in sorted(by_label.items())
            for i, f in enumerate(files[:len(files) - len(files) % 3])]
    with (root / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "patient"), *rows])
    return f"csv:{root / 'manifest.csv'}"


def test_a_signed_candidate_that_fails_on_some_images_gets_no_exact_answer(tmp_path):
    """Attack: the coordinator is usually the release authority, so "signed with the pinned key" does
    not make the candidate honest. A candidate (and its FP32 "reference", same manifest identity)
    that fails for images above a threshold turned the acceptance reply into "could not answer",
    uncharged: an exact, unlimited oracle. Now an image either model fails on contributes a zero
    row and the reply is the ordinary charged, noisy release whichever images tripped."""
    from edge.build.evaluate import load_eval_set
    from fed.task import site_split

    pub, _, _ = _tripwire_bundles(tmp_path, 1e9, "probe")
    policy = _acc_site(tmp_path, pub, target_epsilon=50.0)
    cfg = RoundConfig(task="classify", labels=ACC_LABELS, preprocess=PreprocessSpec(size=ACC_SIZE).to_dict(),
                      val_fraction=0.5, seed=0)
    inputs = load_eval_set(site_split(policy, cfg, "val"), "classify", ACC_LABELS, PreprocessSpec(size=ACC_SIZE)).inputs
    means = sorted(float(x.mean()) for x in inputs)
    assert len(means) >= 2 and means[0] > 0
    statuses = []
    for i, t in enumerate((means[-1] + 1.0, (means[-2] + means[-1]) / 2, means[0] / 2)):  # none, one, every image
        _, cand, ref = _tripwire_bundles(tmp_path, t, str(i))
        reply = _accept(policy, cand, ref, f"r{i}")
        statuses.append((reply.status, reply.reason))
    assert statuses == [("ok", "")] * 3, statuses
    assert [r["kind"] for r in json_ledger(policy)["releases"]] == ["accept"] * 3


def test_a_candidate_naming_labels_the_site_may_not_have_costs_a_charged_release(tmp_path):
    """Attack: the candidate's manifest names the labels, so the coordinator chooses them. A bundle
    whose labels no validation image has was refused, uncharged, "no labelled validation images":
    a free yes/no answer to "does this site hold any image of diagnosis X?". Accounted acceptance
    now answers it like any other request: charged, noise only."""
    statuses = []
    for tag, labels in (("present", ACC_LABELS), ("absent", ["rare-x", "rare-y", "rare-z"])):
        policy, reply = _honest_acceptance(tmp_path, tag, labels, target_epsilon=50.0)
        statuses.append((reply.status, reply.reason))
    assert statuses == [("ok", "")] * 2, statuses
    assert [r["kind"] for r in json_ledger(policy)["releases"]] == ["accept"] * 2


def test_exact_acceptance_results_count_against_the_lifetime_limit_of_exact_evaluations(tmp_path):
    """Attack: a site that discloses exact evaluations caps them over its lifetime. Exact acceptance
    results (two models' exact metrics on the same validation split) are exact evaluations too, but
    were counted separately: the coordinator got the limit twice. Now one lifetime count covers both."""
    from fed.task import evaluate_round

    policy, first = _honest_acceptance(tmp_path, "honest", evaluation="disclosed", disclosed_evaluations_lifetime=1)
    assert (first.status, first.mode) == ("ok", "disclosed"), first.reason
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    head = build_head("classify", get_config("echocare-tiny"), 3, proj_dim=0)
    cfg = RoundConfig(labels=ACC_LABELS, head={"proj_dim": 0}, val_fraction=0.5, seed=0, run_key="other-run")
    second = evaluate_round(policy, cfg, {k: v.detach().numpy() for k, v in head.state_dict().items()})
    assert second.status == "refused" and "lifetime limit" in second.reason, (second.status, second.reason)
    assert len(json_ledger(policy)["disclosures"]) == 1


def json_ledger(policy: SitePolicy) -> dict:
    import json

    return json.loads(policy.ledger_path.read_text())


def test_a_segmentation_head_that_overflows_for_one_image_gives_a_zero_evaluation_row(monkeypatch, tmp_path):
    """Attack: a finite head can overflow on chosen inputs (tests/fed/test_nonfinite_attack.py covers
    classification). For segmentation and HC the per-image loss went NaN, the NaN passed
    ``clamp``, and the released noisy sums (so ``val_loss``) became NaN: an exact bit, "did any
    validation image trip the head". Now that image's row is zero, as in classification."""
    import torch

    from fed import task

    size, n = 8, 4
    maps = np.zeros((n, 1, size, size), np.float32)
    maps[2] = 1.0  # the image the crafted head "recognises"
    masks = np.zeros((n, size, size), np.int64)
    masks[:, 2:6, 2:6] = 1

    class Tripwire(torch.nn.Module):  # logits (N, 2, S, S); NaN for an image whose map is set
        def forward(self, m):
            trip = (m.flatten(1).amax(1) > 0.5)[:, None, None, None]
            logits = torch.cat([m, 1.0 - m], 1)
            return torch.where(trip, torch.full_like(logits, float("nan")), logits)

    monkeypatch.setattr(task, "site_maps", lambda policy, cfg, which, head: ((maps,), masks, [(None, None, 1.0)] * n))
    monkeypatch.setattr(task, "MapsHead", lambda head: Tripwire())
    rows, _ = task.segment_contributions(_policy(tmp_path), RoundConfig(task="segment"), head=None)
    assert torch.isfinite(rows).all(), rows
    assert rows[2].abs().sum() == 0 and rows[[0, 1, 3]].abs().sum() > 0


def test_a_per_patient_site_answers_a_bundle_that_skips_one_of_its_labels(tmp_path):
    """Attack: at a site that knows its patients, acceptance refused ("could not answer", uncharged)
    whenever one validation image was skipped, e.g. because its label is not among the bundle's
    (the coordinator writes the manifest): a free yes/no on whether the split holds that label.
    Now the kept rows are matched to their patients by key and the release is the ordinary one."""
    data = _per_patient_phantoms(tmp_path)
    statuses = []
    for tag, labels in (("all", ACC_LABELS), ("skips-normal", ["benign", "malignant", "rare-x"])):
        policy, reply = _honest_acceptance(tmp_path, tag, labels, data=data, site_name="h-pat", target_epsilon=50.0,
                                           privacy_unit="patient")
        statuses.append((reply.status, reply.reason, reply.unit))
    assert statuses == [("ok", "", "patient")] * 2, statuses
    assert [(r["kind"], r["unit"]) for r in json_ledger(policy)["releases"]] == [("accept", "patient")] * 2


# -- the number of training units N: only its public size class leaves the site -----------------
def _sized_sites(monkeypatch, tmp_path: Path, sizes: dict[str, int], d: int = 744, **kw) -> dict[str, SitePolicy]:
    """Sites named by ``sizes`` with that many training images (random features of the round's head
    width, 3 labels; the whole dataset is the training rows). Only the data layer is replaced: the
    attacks below are on what the site derives from N (sampling rate, steps, noise, epsilon), and
    encoding hundreds of phantoms per site would take minutes."""
    import fed.task as task

    rng = np.random.default_rng(7)
    data = {name: ((rng.standard_normal((n, d)) / d ** 0.5).astype(np.float32), rng.integers(0, 3, n).astype(np.int64))
            for name, n in sizes.items()}
    monkeypatch.setattr(task, "site_features", lambda policy, cfg, which: data[policy.site_name])
    monkeypatch.setattr(task, "site_size", lambda policy, cfg, unit: len(data[policy.site_name][1]))
    return {name: SitePolicy(data=f"phantom:{n}?seed=9", site_name=name, privacy_unit="image",
                             state_dir=str(tmp_path / name), **kw) for name, n in sizes.items()}


def _zero_head() -> dict[str, np.ndarray]:
    """An all-zero head: with random labels and zero-mean features its gradients have no common
    direction, so an update is almost all noise (what the coordinator sends to read the noise scale)."""
    return {k: np.zeros_like(v) for k, v in _plain_head(0).items()}


def _noise_steps(sent: dict[str, np.ndarray], reply, cfg: RoundConfig) -> float:
    """The coordinator's estimate of a round's DP-SGD steps from one reply: the update is lr/B times the
    sum over steps of (clipped gradients + noise of std sigma*C per coordinate), so
    ||update||^2 / (d * (lr*sigma*C/B)^2) is about the number of steps (the gradients are small beside
    the noise here)."""
    update = np.concatenate([(reply.arrays[k] - sent[k]).ravel() for k in sorted(reply.arrays)])
    return float(update @ update) / (update.size * (cfg.lr * cfg.noise_multiplier * cfg.max_grad_norm / cfg.batch_size) ** 2)


def test_one_training_reply_does_not_tell_the_number_of_training_images(monkeypatch, tmp_path):
    """Attack: the update of a round is lr/B times the sum over steps of (clipped gradients + noise of
    std sigma*C per coordinate); the coordinator knows lr, B, sigma, C and the number of parameters,
    so ||update||^2 / (d * (lr*sigma*C/B)^2) estimates the number of steps. With steps
    epochs * ceil(N / B) that told N to within B (found at sign-off: 10.2 vs 20.2 for N = 320 vs 640).
    Now the site (default policy) steps and samples by its public size class: N = 305 and N = 361
    (both in the class 304 of 4 classes per doubling; 20 vs 23 steps from the exact N) give the same
    estimate, the class's steps, within its statistical spread."""
    from fed.task import train_round

    sites = _sized_sites(monkeypatch, tmp_path, {"small": 305, "large": 361})
    cfg = _train_cfg(batch_size=16, lr=0.5, max_grad_norm=1.0, noise_multiplier=2.0)
    sent = _zero_head()
    estimates = {}
    for name, policy in sites.items():
        reply = train_round(policy, cfg, sent)
        assert reply.status == "ok", reply.reason
        estimates[name] = _noise_steps(sent, reply, cfg)
    # Both read as the class's ceil(304 / 16) = 19 steps. The estimate's spread is sqrt(2 / d), 3 % (d = 2,235):
    # 12 % is 4 of it; from the exact N the large site reads 23 (21 % off).
    assert all(abs(v / 19 - 1) < 0.12 for v in estimates.values()), estimates


def test_the_released_epsilon_buckets_over_rounds_do_not_tell_n():
    """Attack: replies carry epsilon rounded up to 0.25 so that one reply tells N only within a bucket.
    With sigma and B its own, the coordinator watches the bucket over 40 rounds (lifetime epsilon
    about 5.3, within the default budget): with q = B/N and ceil(N/B) steps the sequence of buckets
    differed from N to N (9 distinct sequences for N = 300..310, found at sign-off). Now the site's
    sampling rate and steps come from its size class (the production functions train_round uses):
    N = 300..310 fall into two classes (256 and 304 at 4 per doubling), so at most two sequences."""
    from fed.dp import DPConfig, schedule
    from fed.ledger import epsilon_of
    from fed.task import released_epsilon

    sigma, batch, delta, rounds = 2.0, 32, 1e-5, 40
    policy = SitePolicy(data="phantom:1")  # the default policy: 4 size classes per doubling
    sequences = set()
    for n in range(300, 311):
        q, steps, _ = schedule(n, DPConfig(epochs=1, batch_size=batch, sampling_units=policy.sampling_units(n)))
        sequences.add(tuple(released_epsilon(epsilon_of([(sigma, q, steps)] * k, delta)) for k in range(1, rounds + 1)))
    assert len(sequences) <= 2, f"{len(sequences)} distinct bucket sequences for 11 values of N"


def test_two_sites_in_one_size_class_look_the_same_to_the_coordinator(monkeypatch, tmp_path):
    """Two sites of N = 300 and N = 500 images, both in the size class 256 of a policy with one class per
    doubling, trained by the same coordinator for 40 rounds (sigma 2, B 32, lifetime budget 2: the
    budget runs out in round 5): every number the coordinator observes is the same, the status and
    epsilon bucket of every round (so the round the budget ran out), the ledgers' (sigma, q, steps)
    and the noise scale of the update. From the exact N (the size class removed) the buckets, the
    exhaustion round and the steps (10 and 16 instead of 8) all differ."""
    from fed.task import train_round

    sites = _sized_sites(monkeypatch, tmp_path, {"h300": 300, "h500": 500}, size_classes_per_doubling=1,
                         target_epsilon=2.0)
    seen: dict[str, list] = {name: [] for name in sites}
    noise: dict[str, float] = {}
    for r in range(1, 41):
        cfg = _train_cfg(batch_size=32, lr=0.5, max_grad_norm=1.0, noise_multiplier=2.0, num_rounds=40, server_round=r)
        sent = _zero_head() if r == 1 else _plain_head(r)  # round 1 probes the noise: no gradient signal to speak of
        for name, policy in sites.items():
            reply = train_round(policy, cfg, sent)
            seen[name].append((reply.status, reply.metrics.get("epsilon"), reply.metrics.get("delta")))
            if r == 1:
                noise[name] = _noise_steps(sent, reply, cfg)
    assert seen["h300"] == seen["h500"], [(r, a, b) for r, (a, b) in enumerate(zip(*seen.values()), 1) if a != b][:3]
    statuses = [s for s, _, _ in seen["h300"]]
    assert "ok" in statuses and "budget-exhausted" in statuses  # the exhaustion round is part of what matched
    ledgers = {name: [(r.noise_multiplier, r.sample_rate, r.steps) for r in PrivacyLedger.load(p.ledger_path).releases]
               for name, p in sites.items()}
    assert ledgers["h300"] == ledgers["h500"] and ledgers["h300"][0] == (2.0, 32 / 256, 256 // 32)
    # The estimate's spread is sqrt(2 / d), 3 %: 15 % is 5 of it. Exact N: 10 and 16 steps (25 % and 100 % off).
    assert all(abs(v / 8 - 1) < 0.15 for v in noise.values()), noise


def test_asking_whether_a_label_exists_through_training_is_charged(tmp_path, phantom_feature_cache):
    """Attack: the label oracle of evaluation, through a training request: labels no training image has
    got "no readable, labelled training images", uncharged; now both get an ordinary, charged round."""
    from fed.task import train_round

    policy = _site(tmp_path, phantom_feature_cache)
    replies = [train_round(policy, _train_cfg(labels=labels, run_key=tag), _plain_head(0))
               for tag, labels in (("present", ["benign", "malignant", "normal"]), ("absent", ["rare-x", "rare-y", "rare-z"]))]
    assert [r.status for r in replies] == ["ok", "ok"], [r.reason for r in replies]
    absent = replies[1]  # a noise-only update: finite, differs from the head sent, and charged like any round
    assert all(np.isfinite(v).all() for v in absent.arrays.values())
    assert any(not np.allclose(absent.arrays[k], v) for k, v in _plain_head(0).items() if k in absent.arrays)
    assert [r.kind for r in PrivacyLedger.load(policy.ledger_path).releases] == ["train", "train"]
