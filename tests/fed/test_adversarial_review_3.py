"""Third adversarial review of issue 9: the coordinator against one site, after the size class.

Each test plays a curious or malicious coordinator with what it controls (labels, head options,
the site's evaluation mode, how often it asks) and checks that what comes back is charged, counted
as a disclosure, or a function of the public size class; never a free, exact answer about the
site's data. Each failed on the code before its fix (docs/privacy.md, "Adversarial review at
sign-off", third review)."""

from __future__ import annotations

import numpy as np
import pytest
from test_adversarial_review import (
    _accept,
    _honest_acceptance,
    _per_patient_phantoms,
    _plain_head,
    _site,
    _sized_sites,
    _train_cfg,
    _tripwire_bundles,
)

# the user-level DP tests' site: 30 phantom images of 10 patients (3 each), a CSV with a patient column
from test_user_level_dp import patient_csv  # noqa: F401  (a pytest fixture)

from fed.ledger import PrivacyLedger
from fed.policy import SitePolicy
from fed.task import RoundConfig, evaluate_round, train_round

ABSENT = ["rare-x", "rare-y", "rare-z"]  # labels no phantom carries
PRESENT = ["benign", "malignant", "normal"]


def _releases(policy: SitePolicy) -> list[str]:
    return [r.kind for r in PrivacyLedger.load(policy.ledger_path).releases] if policy.ledger_path.exists() else []


# -- 1. label existence through training, on the paths the earlier fix did not cover ---------------
def test_a_hidden_head_asking_whether_a_label_exists_through_training_is_charged(tmp_path, phantom_feature_cache):
    """Attack: the earlier fix made a training round for labels no image carries a charged, noise-only
    release on the linear path. A head with a hidden layer trains through Opacus, whose wrapper divided
    by the length of an empty loader: labels absent -> "could not answer", uncharged; present -> ok.
    A free yes/no on whether any training image carries a label (repeatable with any label set)."""
    policy = _site(tmp_path, phantom_feature_cache)
    replies = {tag: train_round(policy, _train_cfg(labels=labels, head={"proj_dim": 0, "hidden": 8}, run_key=tag),
                                _plain_head(hidden=8))
               for tag, labels in (("present", PRESENT), ("absent", ABSENT))}
    assert {t: r.status for t, r in replies.items()} == {"present": "ok", "absent": "ok"}, \
        {t: r.reason for t, r in replies.items()}
    assert replies["absent"].reason == replies["present"].reason == ""
    assert all(np.isfinite(v).all() for v in replies["absent"].arrays.values())
    assert _releases(policy) == ["train", "train"]


def test_a_per_patient_site_asked_for_labels_it_lacks_trains_on_no_patient_charged(tmp_path, patient_csv,  # noqa: F811  (the fixture)
                                                                                    phantom_feature_cache):
    """Attack: the same label question at a site that knows its patients. With no training row the
    site's patient ids were None ("unknown", not "zero patients"), so the trainer stepped per image,
    the site's own check (trained per image, charged per patient) raised, and the reply was "could not
    answer", uncharged, exactly when no image carries the labels. Now: an ordinary per-patient,
    charged, noise-only round, like the answer for labels it has."""
    policy = SitePolicy(data=f"csv:{patient_csv}", site_name="hospital-p", state_dir=str(tmp_path / "state"),
                        cache_dir=phantom_feature_cache, target_epsilon=1000.0)
    replies = {tag: train_round(policy, _train_cfg(labels=labels, batch_size=4, run_key=tag), _plain_head(0))
               for tag, labels in (("present", PRESENT), ("absent", ABSENT))}
    assert {t: (r.status, r.reason, r.unit) for t, r in replies.items()} == \
        {"present": ("ok", "", "patient"), "absent": ("ok", "", "patient")}
    book = PrivacyLedger.load(policy.ledger_path)
    assert [(r.kind, r.unit) for r in book.releases] == [("train", "patient")] * 2
    assert book.releases[0].sample_rate == book.releases[1].sample_rate  # the class of its patients, both times


# -- 2. disclosed evaluation: the "no labelled images" refusal is an exact answer too --------------
def test_disclosed_evaluation_counts_the_question_whether_a_label_exists(tmp_path, phantom_feature_cache):
    """Attack: a site that discloses exact evaluations (policy ``evaluation = "disclosed"``) allows a
    limited number of them, per run key and per lifetime. The refusal "no labelled validation images"
    for labels none of its images carries came before the count: unlimited and uncounted, a free
    label-existence oracle beside the limited exact metrics. Now it is counted like any exact answer;
    once the lifetime limit is spent, present and absent labels get the same refusal."""
    policy = _site(tmp_path, phantom_feature_cache, evaluation="disclosed", disclosed_evaluations_lifetime=2)
    asked = [("absent-1", ABSENT), ("absent-2", ABSENT[::-1]), ("absent-3", ABSENT[1:] + ABSENT[:1]),
             ("present", PRESENT)]
    replies = {tag: evaluate_round(policy, _train_cfg(labels=labels, run_key=tag), _plain_head())
               for tag, labels in asked}
    book = PrivacyLedger.load(policy.ledger_path)
    assert book.disclosed() == 2, [r.reason for r in replies.values()]
    assert replies["absent-3"].reason == replies["present"].reason
    assert "lifetime limit" in replies["present"].reason


def test_disclosed_acceptance_counts_the_question_whether_a_label_exists(tmp_path):
    """Attack: the same question through federated acceptance (the coordinator, as release authority,
    signs a bundle naming labels the site may not have). In disclosed mode the refusal came before the
    disclosure was counted; now it is counted, and the lifetime limit answers the same either way."""
    answers = []
    for tag, labels in (("absent-1", ["rare-x", "rare-y", "rare-z"]), ("absent-2", ["rare-p", "rare-q", "rare-r"]),
                        ("present", ["benign", "malignant", "normal"])):
        policy, reply = _honest_acceptance(tmp_path, tag, labels, data="phantom:15?seed=3", evaluation="disclosed",
                                           disclosed_evaluations_lifetime=1)
        answers.append((reply.status, reply.reason))
    assert PrivacyLedger.load(policy.ledger_path).disclosed() == 1, answers
    assert answers[1] == answers[2] and "lifetime limit" in answers[2][1], answers


# -- 3. the delta check: a refusal the coordinator sees, decided on the exact N --------------------
def test_the_delta_refusal_tells_only_the_size_class(monkeypatch, tmp_path):
    """Attack (curious): every reply of a site whose policy delta is not below 1/N is a refusal. That
    was decided on the exact N: with a policy delta of 1/340, a site of N = 305 trained and one of
    N = 361 (both in the class 304..361 at 4 per doubling) was refused, telling the coordinator on
    which side of 340 N lies, finer than the class. Now the check uses the class's largest N, so the
    two sites answer alike (both refused here, stricter than 1/N), and a delta below 1/361 serves both."""
    answers = {}
    for delta in (1 / 340, 1 / 400):
        sites = _sized_sites(monkeypatch, tmp_path / f"d{round(1 / delta)}", {"small": 305, "large": 361}, delta=delta)
        answers[round(1 / delta)] = {n: (r.status, r.reason) for n, r in
                                     ((n, train_round(p, _train_cfg(batch_size=16), _plain_head(0))) for n, p in sites.items())}
    assert answers[340]["small"] == answers[340]["large"], answers[340]
    assert answers[340]["small"][0] == "refused" and "1/N" in answers[340]["small"][1]
    assert {s for s, _ in answers[400].values()} == {"ok"}, answers[400]


# -- 4. the encoder checkpoint path: the coordinator names a file on the site's machine ------------
def test_a_checkpoint_path_the_coordinator_names_tells_nothing_about_the_sites_files(tmp_path, phantom_feature_cache):
    """Attack: the run config names the encoder checkpoint by path and pins its sha256; the site hashes
    the file at that path. Naming a file that is no checkpoint (an image of the site's dataset, whose
    path and bytes the coordinator knows, e.g. from a public dataset) with a wrong pin got back
    "this site's file has sha256 <the file's hash>": an exact, uncharged membership test. With the
    file's true hash pinned the site went on, failed to load it and answered "could not answer"; with
    no file there, the same. Now all three get one refusal naming only the coordinator's own pin."""
    from fed.features import EncoderRef

    image = tmp_path / "site-data" / "scan-017.png"  # a file on the site's machine, known to the coordinator
    image.parent.mkdir()
    image.write_bytes(np.random.default_rng(17).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    import hashlib

    true_sha = hashlib.sha256(image.read_bytes()).hexdigest()
    policy = _site(tmp_path, phantom_feature_cache)
    asked = {"wrong pin": (image, "ab" * 32), "right pin": (image, true_sha), "no file": (tmp_path / "absent.png", true_sha)}
    replies = {tag: train_round(policy, _train_cfg(encoder=EncoderRef("echocare-tiny", str(path), pin), run_key=tag),
                                _plain_head(0))
               for tag, (path, pin) in asked.items()}
    assert true_sha not in replies["wrong pin"].reason, replies["wrong pin"].reason
    seen = {tag: (r.status, r.reason.replace(asked[tag][1], "<pin>")) for tag, r in replies.items()}
    assert len(set(seen.values())) == 1 and seen["wrong pin"][0] == "refused", seen
    assert str(tmp_path) not in seen["wrong pin"][1]
    assert _releases(policy) == []  # nothing was released, nothing charged


def test_a_segmentation_site_with_no_training_image_answers_with_a_charged_noise_round(monkeypatch, tmp_path):
    """Robustness of the same kind (the coordinator's validation fraction and split seed decide the
    training rows): a segmentation site whose training split holds no image raised (the head's inputs
    were taken as ``inputs[0]`` of no maps) and answered "could not answer", uncharged, where a
    classification site answers with a charged noise-only round. Reachable only where a stratum is one
    group (the split then moves it whole to validation at a high fraction); the data layer is replaced
    here by an empty one."""
    from fed import task

    monkeypatch.setattr(task, "site_maps", lambda policy, cfg, which, head: ((), np.zeros((0, 16, 16), np.int64), []))
    policy = SitePolicy(data="phantom:15?seed=3", site_name="h-seg", state_dir=str(tmp_path / "state"),
                        allowed_tasks=("segment",), privacy_unit="image")
    cfg = RoundConfig(task="segment", labels=["background", "lesion"], head={}, local_epochs=1, batch_size=4,
                      noise_multiplier=1.0, max_grad_norm=1.0, run_key="seg-empty")
    sent = {k: v.detach().numpy().copy() for k, v in task.round_head(cfg).state_dict().items()}
    reply = train_round(policy, cfg, sent)
    assert (reply.status, reply.reason) == ("ok", ""), reply.reason
    assert any(not np.array_equal(reply.arrays[k], sent[k]) for k in reply.arrays)  # noise only, but released
    assert _releases(policy) == ["train"]


def test_a_refused_projection_does_not_name_the_sites_reference_path(monkeypatch, tmp_path):
    """The reply to a head whose fixed projection the site cannot verify named the site's
    ``projection_reference``: a data spec the hospital writes, e.g. ``folder:/srv/<hospital>/ref``, so a
    path on its machine left the site (never in a reply: docs/privacy.md). Only the default phantom
    spec, public text, is named now. (The site's recomputation is replaced: the reply text is the point.)"""
    import fed.features as features

    d = 4
    monkeypatch.setattr(features, "public_projection",
                        lambda *a, **k: (np.zeros(744, np.float32), np.eye(744, d, dtype=np.float32)))
    reference = f"folder:{tmp_path}/srv/st-elsewhere-hospital/reference"
    policy = SitePolicy(data="phantom:15?seed=3", site_name="h1", state_dir=str(tmp_path / "state"),
                        projection_reference=reference)
    cfg = _train_cfg(head={"proj_dim": d})
    crafted = {k: np.ones_like(v) for k, v in _head_with_projection(d).items()}
    reply = evaluate_round(policy, cfg, crafted)
    assert reply.status == "refused" and "projection" in reply.reason, reply.reason
    assert str(tmp_path) not in reply.reason and "hospital" not in reply.reason, reply.reason
    assert _releases(policy) == []


def _head_with_projection(d: int) -> dict[str, np.ndarray]:
    import torch

    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    torch.manual_seed(0)
    head = build_head("classify", get_config("echocare-tiny"), 3, proj_dim=d)
    return {n: v.detach().numpy().copy() for n, v in head.state_dict().items()}


def test_hc_evaluation_with_a_bad_pixel_size_is_not_an_oracle(monkeypatch, tmp_path):
    """Attack: HC evaluation measures the head's predicted mask in millimetres. For an image whose
    metadata gives a pixel size of 0 (or NaN), measuring raised, but only when the head predicted a
    non-empty mask; a crafted head that predicts a mask only for images above a threshold turned that
    into "could not answer", uncharged, exactly when such an image is above it. Now metadata alone
    decides whether an image counts for HC: that image's HC columns are zero, whatever the head does."""
    import torch

    from fed import task

    size, n = 8, 4
    maps = np.zeros((n, 1, size, size), np.float32)
    maps[2] = 1.0  # the image the crafted head "recognises"
    masks = np.zeros((n, size, size), np.int64)
    masks[:, 2:6, 2:6] = 1
    meta = [(0.1, 50.0, 1.0), (0.1, 50.0, 1.0), (0.0, 50.0, 1.0), (float("nan"), 50.0, 1.0)]  # image 2, 3: broken

    class Tripwire(torch.nn.Module):  # a mask (class 1 everywhere) only for an image whose map is set
        def forward(self, m):
            trip = (m.flatten(1).amax(1) > 0.5)[:, None, None, None]
            return torch.where(trip, torch.cat([m * 0, m * 0 + 5], 1), torch.cat([m * 0 + 5, m * 0], 1))

    monkeypatch.setattr(task, "site_maps", lambda policy, cfg, which, head: ((maps,), masks, meta))
    monkeypatch.setattr(task, "MapsHead", lambda head: Tripwire())
    policy = SitePolicy(data="phantom:15?seed=3", site_name="h-hc", state_dir=str(tmp_path / "state"))
    rows, _ = task.segment_contributions(policy, RoundConfig(task="hc", labels=["background", "head"]), head=None)
    assert torch.isfinite(rows).all(), rows
    assert rows[[2, 3], 3:].abs().sum() == 0 and rows[[0, 1], 4].tolist() == [1.0, 1.0]


def test_hc_acceptance_with_a_bad_pixel_size_is_not_an_oracle():
    """The same oracle through federated acceptance: the candidate bundle (the coordinator's code) that
    predicts a head mask only for chosen images made ``hc_from_mask`` raise on an image whose pixel size
    is 0, and the site answered "could not answer", uncharged; a NaN true HC made every release NaN.
    Now such images have zero HC columns, whatever the bundle predicts."""
    from edge.build.evaluate import EvalSet
    from edge.federated import accept as acc

    n, s = 4, 8
    masks = np.zeros((n, s, s), np.uint8)
    masks[:, 2:6, 2:6] = 1
    ev = EvalSet(spec="", task="hc", labels=["background", "head"], inputs=np.zeros((n, 3, s, s), np.float32),
                 masks=masks, hc_mm=np.array([50.0, 50.0, 50.0, np.nan]), pixel_mm=np.array([0.1, 0.1, 0.0, 0.1]))
    logits = np.zeros((n, 2, s, s), np.float32)
    logits[:, 1, 2:6, 2:6] = 5.0  # the bundle predicts a head on every image
    rows = acc._mask_rows(logits, ev)
    assert np.isfinite(rows.numpy()).all(), rows
    assert rows[[2, 3], 3:].abs().sum() == 0 and rows[[0, 1], 4].tolist() == [1.0, 1.0]


def test_a_stretching_bundle_does_not_fail_the_whole_hc_acceptance_on_one_image():
    """Attack: the bundle's manifest (the coordinator's) sets the preprocessing. With
    ``resize = "stretch"`` an HC image whose crop is not square has non-square output pixels, and
    ``load_eval_set`` raised for the whole validation set (outside its per-image skip): "could not
    answer", uncharged, exactly when some image's crop is not square, which the crop thresholds (also
    the coordinator's) steer. Now that image alone is skipped and recorded, as any unusable image."""
    from echocare.data.base import Sample, SiteData
    from echocare.preprocess import PreprocessSpec
    from edge.build.evaluate import load_eval_set

    def sample(key: str, h: int, w: int) -> Sample:
        img = np.full((h, w), 200, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
        return Sample(key, None, lambda: img, lambda: mask, meta={"pixel_size_mm": 0.1, "hc_mm": 100.0})

    data = SiteData("hc-test", [], [sample("square", 64, 64), sample("wide", 64, 96)], task_hint="hc")
    ev = load_eval_set(data, "hc", ["background", "head"], PreprocessSpec(size=32, crop=False, resize="stretch"))
    assert len(ev) == 1 and ev.pixel_mm.tolist() == [pytest.approx(0.2)]
    assert [p.path for p in ev.problems] == ["wide"]


# -- 5. the fixes of the third review's open findings ----------------------------------------------
@pytest.fixture
def task_identity():
    """Flower stamps new messages with the running task's identity (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _secagg_fit(cfg: RoundConfig, arrays: dict[str, np.ndarray], bound: float = 1e6):
    """The legacy fit message of a SecAgg+ round as ``secaggplus_mod`` hands it to the site."""
    import json

    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fed.secagg import PARAM_NAMES, UPDATE_BOUND, UPDATE_KEYS

    names = sorted(arrays)
    config = {**cfg.to_record(), PARAM_NAMES: json.dumps(names), UPDATE_KEYS: json.dumps(names), UPDATE_BOUND: bound}
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([arrays[n] for n in names]), config), True)
    return Message(content, dst_node_id=1, message_type="train"), names


def test_a_plain_redelivery_of_a_secagg_round_is_a_new_charged_release(tmp_path, phantom_feature_cache, task_identity):
    """Attack: a SecAgg+ round and a plain round with the same config and arrays had one request hash,
    so the coordinator re-sent a SecAgg+ round's request plain and got the site's stored, UNMASKED
    update with no new charge: one site's update, where SecAgg+ promises only the sum. Now the path is
    part of the stored-reply key: the plain request is a new, charged release with fresh noise, and an
    identical SecAgg+ re-delivery still gets its stored update (resume stays exact)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fed.secagg import masked_fit_reply

    policy = _site(tmp_path, phantom_feature_cache, target_epsilon=1000.0)
    cfg, sent = _train_cfg(run_key="secagg-replay"), _plain_head(0)
    msg, names = _secagg_fit(cfg, sent)

    def update_of(reply_msg) -> dict[str, np.ndarray]:
        fitres = compat.recorddict_to_fitres(reply_msg.content, keep_input=True)
        assert fitres.metrics["status"] == "ok", fitres.metrics
        return dict(zip(names, parameters_to_ndarrays(fitres.parameters)))

    first = update_of(masked_fit_reply(msg, policy))
    again = update_of(masked_fit_reply(_secagg_fit(cfg, sent)[0], policy))  # identical SecAgg+ re-delivery
    assert all(np.array_equal(first[k], again[k]) for k in names) and _releases(policy) == ["train"]
    plain = train_round(policy, cfg, sent)
    assert plain.status == "ok", plain.reason
    assert _releases(policy) == ["train", "train"]  # charged as a new release
    assert all(not np.allclose(plain.arrays[k] - sent[k], first[k]) for k in names)  # new noise, not the stored update


def test_per_patient_acceptance_skips_an_unreadable_validation_image_inside_a_charged_release(tmp_path):
    """Open finding: at a site that knows its patients, acceptance refused ("could not answer",
    uncharged) when a validation image was unreadable (the reader names it by its file, so its rows
    could not be matched to patients): a free answer about the split. Now that image is skipped, as
    per-image acceptance does, and the reply is the ordinary charged per-patient release."""
    from fed.task import site_split

    data = _per_patient_phantoms(tmp_path)
    pub, cand, ref = _tripwire_bundles(tmp_path, 1e9, "unreadable", PRESENT)
    policy = SitePolicy(data=data, site_name="h-pat", release_pubkey=str(pub),
                        state_dir=str(tmp_path / "site"), target_epsilon=50.0, privacy_unit="patient")
    val = site_split(policy, RoundConfig(val_fraction=0.5, seed=0), "val")  # the split is made (and kept) first
    broken = next(p for p in (tmp_path / "images").rglob("*") if p.is_file() and
                  any(s.key.endswith(p.name) for s in val.samples))
    broken.write_bytes(b"not an image")  # one validation image becomes unreadable
    reply = _accept(policy, cand, ref, "unreadable")
    assert (reply.status, reply.reason, reply.unit) == ("ok", "", "patient"), reply.reason
    assert [(r.kind, r.unit) for r in PrivacyLedger.load(policy.ledger_path).releases] == [("accept", "patient")]


def test_a_checkpoint_path_the_run_names_is_never_opened(monkeypatch, tmp_path, phantom_feature_cache):
    """Open finding: the site opened and hashed whatever checkpoint path the run config named, so the
    answer's time grew with that file's size and ``hf://`` names probed the site's model cache. Now a
    site opens only its own file (policy ``encoder_checkpoint``); a run naming a checkpoint at a site
    without one is refused before any file is touched, with the same reason as any mismatch."""
    import builtins
    import hashlib
    import io

    from echocare.models import encoder as enc
    from fed.features import EncoderRef

    secret = tmp_path / "etc" / "passwd"  # a file on the site's machine the coordinator names
    secret.parent.mkdir()
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 64)
    own = tmp_path / "weights" / "encoder.pth"  # the site's own copy of the released weights
    own.parent.mkdir()
    own.write_bytes(b"the weights this hospital installed")
    pin = hashlib.sha256(secret.read_bytes()).hexdigest()  # the coordinator pins the named file's true hash

    touched: list[str] = []
    real_open, real_sha, real_resolve, real_load = builtins.open, enc.sha256_file, enc.resolve_checkpoint, enc.load_encoder

    def recording(real):
        def call(path, *a, **k):
            touched.append(str(path))
            return real(path, *a, **k)
        return call

    monkeypatch.setattr(builtins, "open", recording(real_open))
    monkeypatch.setattr(io, "open", recording(real_open))
    for name, real in (("sha256_file", real_sha), ("resolve_checkpoint", real_resolve)):
        monkeypatch.setattr(enc, name, recording(real))
    monkeypatch.setattr(enc, "load_encoder", lambda config, checkpoint=None, **k: (touched.append(str(checkpoint)),
                                                                                  real_load(config, checkpoint, **k))[1])
    asked = {"no checkpoint at the site": ("", str(secret)), "the site's own file": (str(own), str(secret)),
             "an hf:// probe": (str(own), "hf://someone/some-model/encoder.pth")}
    replies = {}
    for tag, (site_file, named) in asked.items():
        policy = _site(tmp_path / tag.replace(" ", "-").replace("/", ""), phantom_feature_cache,
                       encoder_checkpoint=site_file)
        replies[tag] = train_round(policy, _train_cfg(encoder=EncoderRef("echocare-tiny", named, pin), run_key=tag),
                                   _plain_head(0))
        assert _releases(policy) == []
    assert {(r.status, r.reason) for r in replies.values()} == {("refused", replies["the site's own file"].reason)}, replies
    assert "encoder checkpoint refused" in replies["no checkpoint at the site"].reason
    assert not [p for p in touched if "passwd" in p or "hf://" in p or "some-model" in p], touched
    assert any(p == str(own) for p in touched)  # the site hashed its own file, and only that one
