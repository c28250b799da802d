"""The coordinator attacks one hospital (docs/privacy.md, threat model).

Each test plays a curious or malicious coordinator against the site's real entry points
(``fed.task.train_round`` / ``evaluate_round``, what the ClientApp calls) on phantom images with
the small encoder, and checks that the attack fails: the noise cannot be regenerated from what the
coordinator knows, every release is charged to the site's lifetime ledger whatever run or round it
claims, an identical re-delivery gets the stored reply, a crafted evaluation head is refused and
an honest one is charged, replies carry no counts or losses. The imports at module level exist in
the code before these protections, so that every test can be run there and fail.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fed.policy import SitePolicy
from fed.task import RoundConfig, evaluate_round, train_round

warnings.filterwarnings("ignore")

DATA = "phantom:90?profiles=linear-a,convex-b,linear-c&seed=0"
REFERENCE = "phantom:30?profiles=linear-a,convex-b,linear-c&seed=9001"  # the public projection's images
PROJ = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def public(cache) -> tuple[np.ndarray, np.ndarray]:
    """The public projection, as the honest coordinator computes it."""
    from echocare.preprocess import PreprocessSpec
    from server.coordinator.public_features import public_projection

    return public_projection(RoundConfig().encoder, PreprocessSpec(), PROJ, Path(cache), REFERENCE)


def _policy(tmp_path: Path, cache: str, name: str = "state", **kw) -> SitePolicy:
    fields = dict(data=DATA, site_name="hospital-a", state_dir=str(tmp_path / name), cache_dir=cache)
    fields.update(kw)
    if "projection_reference" in SitePolicy.__dataclass_fields__:
        fields.setdefault("projection_reference", REFERENCE)
    return SitePolicy(**fields)


def _cfg(**kw) -> RoundConfig:
    base = dict(head={"proj_dim": PROJ}, local_epochs=1, batch_size=1000, lr=1.0, max_grad_norm=0.5,
                noise_multiplier=1.0, num_rounds=3, server_round=1, seed=0, run_key="run-a")
    base.update(kw)
    return RoundConfig(**base)


def _head(public, seed: int = 0) -> dict[str, np.ndarray]:
    """Global weights: a random output layer (so gradients are not all alike) and the public projection."""
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    torch.manual_seed(seed)
    head = build_head("classify", get_config("echocare-tiny"), 3, proj_dim=PROJ)
    head.set_projection(torch.from_numpy(public[0]), torch.from_numpy(public[1]))
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def _lifetime_ledger(policy: SitePolicy) -> dict:
    """What `echofleet site ledger STATE_DIR --json` prints."""
    import contextlib
    import io

    from echofleet.cli.ledger import ledger

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ledger(Path(policy.state_dir), as_json=True)
    return json.loads(out.getvalue())


# -- 1. the noise cannot be regenerated -----------------------------------------------------------
def _true_clipped_sum(policy: SitePolicy, cfg: RoundConfig, w: dict[str, np.ndarray]) -> tuple[torch.Tensor, int]:
    """The referee (who sees the site's data) computes the clipped per-example gradient sum with
    Opacus' own per-sample gradients: what a noise-free release would reveal."""
    from opacus import GradSampleModule

    from fed.task import site_features

    x, y = site_features(policy, cfg, "train")
    xt = (torch.from_numpy(x) - torch.from_numpy(w["proj_mean"])) @ torch.from_numpy(w["proj_matrix"])
    lin = torch.nn.Linear(PROJ, 3)
    lin.load_state_dict({"weight": torch.from_numpy(w["net.0.weight"]), "bias": torch.from_numpy(w["net.0.bias"])})
    gsm = GradSampleModule(lin, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(xt), torch.from_numpy(y), reduction="sum").backward()
    per = torch.cat([gsm._module.weight.grad_sample.flatten(1), gsm._module.bias.grad_sample], 1)
    clip = (cfg.max_grad_norm / (per.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (per * clip[:, None]).sum(0).double(), len(y)


def _released_sum(reply, w: dict[str, np.ndarray], n: int, lr: float) -> torch.Tensor:
    """One step, sample rate 1, SGD: new = old - lr * (clipped sum + noise) / n."""
    dw = torch.from_numpy(w["net.0.weight"] - reply.arrays["net.0.weight"]).double().flatten()
    db = torch.from_numpy(w["net.0.bias"] - reply.arrays["net.0.bias"]).double()
    return torch.cat([dw, db]) * n / lr


def _noise_as_the_coordinator_regenerates_it(cfg: RoundConfig, site: str, std: float) -> torch.Tensor:
    """Everything the coordinator knows: its run seed and round, the site's pseudonym (in every
    reply) and the site's source code (how it seeds its generators from them)."""
    seed = int.from_bytes(hashlib.sha256("/".join(map(str, (cfg.seed, site, cfg.server_round, "dp"))).encode()).digest()[:4], "little")
    gen = torch.Generator().manual_seed(seed + 1)
    nw = torch.normal(0.0, std, (3, PROJ), generator=gen)
    nb = torch.normal(0.0, std, (3,), generator=gen)
    return torch.cat([nw.flatten(), nb]).double()


def test_coordinator_cannot_regenerate_and_subtract_the_noise(tmp_path, cache, public):
    cfg, w = _cfg(), _head(public)
    policy = _policy(tmp_path, cache)
    reply = train_round(policy, cfg, w)
    assert reply.status == "ok", reply.reason
    true_sum, n = _true_clipped_sum(policy, cfg, w)
    released = _released_sum(reply, w, n, cfg.lr)
    std = cfg.noise_multiplier * cfg.max_grad_norm
    # the noise is really there (std sigma*C on the clipped sum) ...
    assert float((released - true_sum).std()) == pytest.approx(std, rel=0.6)
    # ... and subtracting the noise the coordinator regenerates does not reveal the clipped sum
    recovered = released - _noise_as_the_coordinator_regenerates_it(cfg, policy.site_name, std)
    assert float((recovered - true_sum).std()) > 0.5 * std, "the coordinator recovered the exact clipped gradient sum"


def test_same_request_to_two_identical_sites_gives_different_heads(tmp_path, cache, public):
    """Same data, same policy, same seed, same round, same weights: if the noise were any function
    of what the coordinator knows (plus the data), the two releases would be identical."""
    cfg, w = _cfg(), _head(public)
    a = train_round(_policy(tmp_path, cache, "site-1"), cfg, w)
    b = train_round(_policy(tmp_path, cache, "site-2"), cfg, w)
    assert a.status == b.status == "ok"
    diff = torch.from_numpy(a.arrays["net.0.weight"] - b.arrays["net.0.weight"]).double()
    n = _true_clipped_sum(_policy(tmp_path, cache, "site-1"), cfg, w)[1]
    expected = 2 ** 0.5 * cfg.noise_multiplier * cfg.max_grad_norm * cfg.lr / n  # two independent noises
    assert float(diff.abs().max()) > 0 and float(diff.std()) == pytest.approx(expected, rel=0.6)


# -- 2. the lifetime ledger --------------------------------------------------------------------
def test_replayed_round_number_with_other_weights_is_charged_again(tmp_path, cache, public):
    policy = _policy(tmp_path, cache, target_epsilon=1000.0)
    cfg = _cfg(noise_multiplier=2.0)
    eps = []
    for seed in (0, 1, 2):  # three trainings, all labelled "round 1" of the same run
        reply = train_round(policy, cfg, _head(public, seed))
        assert reply.status == "ok", reply.reason
        eps.append(reply.metrics["epsilon"])
    assert eps[0] < eps[1] < eps[2], eps


def test_identical_request_gets_the_stored_reply_without_a_new_charge(tmp_path, cache, public):
    policy, cfg, w = _policy(tmp_path, cache, target_epsilon=1000.0), _cfg(noise_multiplier=2.0), _head(public)
    first = train_round(policy, cfg, w)
    again = train_round(policy, cfg, w)  # the coordinator crashed and re-delivers the same request
    assert first.status == again.status == "ok"
    for k in first.arrays:
        np.testing.assert_array_equal(first.arrays[k], again.arrays[k])  # difference of the two: zero, not noise-free data
    assert again.metrics == first.metrics
    book = _lifetime_ledger(policy)
    assert [r["kind"] for r in book["releases"]] == ["train"]  # charged once
    other = train_round(policy, cfg, {**w, "net.0.bias": w["net.0.bias"] + 1e-3})  # one weight changed: new release
    assert other.status == "ok" and other.metrics["epsilon"] > first.metrics["epsilon"]
    assert len(_lifetime_ledger(policy)["releases"]) == 2


def test_a_new_run_key_does_not_get_a_fresh_budget(tmp_path, cache, public):
    """The policy budget is the lifetime total: one release fits, the next one (in a 'new run',
    with another config hash) does not."""
    policy, w = _policy(tmp_path, cache, target_epsilon=6.0), _head(public)  # one release ~5.3, two ~7.1
    first = train_round(policy, _cfg(noise_multiplier=1.0, run_key="run-a"), w)
    assert first.status == "ok" and first.metrics["epsilon"] > 4.0
    second = train_round(policy, _cfg(noise_multiplier=1.0, run_key="run-b", lr=0.5), w)
    assert second.status == "budget-exhausted", (second.status, second.metrics)
    book = _lifetime_ledger(policy)
    assert len(book["releases"]) == 1
    # the reply carries the lifetime epsilon rounded UP to a coarse grid (exact epsilon is a function of N)
    assert book["epsilon"] <= first.metrics["epsilon"] < book["epsilon"] + 0.25


def test_the_lifetime_ledger_recomposes_independently(tmp_path, cache, public):
    """`echofleet site ledger --json` lists every release; Google's dp-accounting on them gives the
    site's epsilon (an evaluation is an unsampled Gaussian release: q 1.0, one step)."""
    from dp_helpers import independent_epsilon

    policy, w = _policy(tmp_path, cache, target_epsilon=1000.0), _head(public)
    assert evaluate_round(policy, _cfg(server_round=0), w).status == "ok"
    assert train_round(policy, _cfg(noise_multiplier=0.0, batch_size=16, local_epochs=2), w).status == "ok"
    book = _lifetime_ledger(policy)
    kinds = [r["kind"] for r in book["releases"]]
    assert kinds == ["evaluate", "train"] and all(r["private"] for r in book["releases"])
    ev, tr = book["releases"]
    assert (ev["sample_rate"], ev["steps"]) == (1.0, 1) and tr["sample_rate"] < 1.0 and tr["steps"] > 1
    assert {"run", "round", "noise_multiplier", "time"} <= set(tr)
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in book["releases"]]
    assert book["epsilon"] == pytest.approx(independent_epsilon(history, book["delta"]), rel=0.02)


def test_ledger_lock_serialises_check_and_record(tmp_path):
    from fed.ledger import Release, locked_ledger

    path = tmp_path / "ledger.json"
    order: list[str] = []

    def holder():
        with locked_ledger(path, 1e-5, 10.0) as book:
            order.append("a-in")
            time.sleep(0.4)
            book.charge(Release("train", 1.0, 0.1, 10))
            order.append("a-out")

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.1)
    with locked_ledger(path, 1e-5, 10.0) as book:
        order.append("b-in")
        assert len(book.releases) == 1  # b saw a's charge: the check cannot race the record
    t.join()
    assert order == ["a-in", "a-out", "b-in"]


# -- 3. evaluation -------------------------------------------------------------------------------
def test_crafted_evaluation_head_is_refused_and_an_honest_one_is_charged(tmp_path, cache, public):
    policy, w = _policy(tmp_path, cache, target_epsilon=1000.0), _head(public)
    crafted = dict(w)
    matrix = np.zeros_like(w["proj_matrix"])
    matrix[17, 0] = 100.0  # one raw feature, magnified: val_loss would then reveal its moments
    crafted["proj_matrix"] = matrix
    refused = evaluate_round(policy, _cfg(server_round=1), crafted)
    assert refused.status == "refused" and "proj_matrix" in refused.reason and not refused.metrics
    crafted_mean = {**w, "proj_mean": w["proj_mean"] + 1.0}
    assert evaluate_round(policy, _cfg(server_round=2), crafted_mean).status == "refused"
    # the honest head is evaluated, with noise, and every evaluation is charged
    a = evaluate_round(policy, _cfg(server_round=3), w)
    b = evaluate_round(policy, _cfg(server_round=4), w)
    # (compare every metric: a noisy loss sum below zero is clamped to 0.0 in both, which made this flaky)
    assert a.status == b.status == "ok" and a.metrics != b.metrics
    assert [r["kind"] for r in _lifetime_ledger(policy)["releases"]] == ["evaluate", "evaluate"]


def test_exact_evaluation_only_as_a_counted_policy_disclosure(tmp_path, cache, public):
    policy = _policy(tmp_path, cache, evaluation="disclosed", disclosed_evaluations_per_run=2)
    w = _head(public)
    a = evaluate_round(policy, _cfg(server_round=1), w)
    b = evaluate_round(policy, _cfg(server_round=2), w)
    assert a.status == b.status == "ok" and a.metrics["val_loss"] == b.metrics["val_loss"]  # exact
    third = evaluate_round(policy, _cfg(server_round=3), w)
    assert third.status == "refused" and "at most 2" in third.reason
    assert evaluate_round(policy, _cfg(server_round=1, run_key="run-b"), w).status == "ok"
    book = _lifetime_ledger(policy)
    assert len(book["disclosures"]) == 3 and book["releases"] == []


def test_exact_evaluations_are_limited_per_site_lifetime_not_only_per_run_key(tmp_path, cache, public):
    """A new run key is the coordinator's claim: it gets no fresh allowance of exact queries beyond
    the policy's lifetime limit."""
    policy = _policy(tmp_path, cache, evaluation="disclosed", disclosed_evaluations_per_run=5,
                     disclosed_evaluations_lifetime=2)
    w = _head(public)
    assert evaluate_round(policy, _cfg(run_key="run-a"), w).status == "ok"
    assert evaluate_round(policy, _cfg(run_key="run-b"), w).status == "ok"
    third = evaluate_round(policy, _cfg(run_key="run-c"), w)  # a "fresh run" per query
    assert third.status == "refused" and "lifetime limit of 2" in third.reason
    assert len(_lifetime_ledger(policy)["disclosures"]) == 2


# -- 4. only private outputs leave ------------------------------------------------------------
def test_replies_carry_no_loss_count_or_accountant_inputs(tmp_path, cache, public):
    from fed.client_app import to_content

    w = _head(public)
    reply = train_round(_policy(tmp_path, cache), _cfg(), w)
    assert reply.status == "ok"
    content = to_content(reply)
    metrics = dict(next(iter(content.metric_records.values())))
    assert metrics["num-examples"] == 1  # a fixed weight, not the site's count
    assert set(metrics) == {"num-examples", "dp-weight", "epsilon", "delta"}, metrics
    ev = dict(next(iter(to_content(evaluate_round(_policy(tmp_path, cache), _cfg(), w)).metric_records.values())))
    assert ev["num-examples"] == 1 and "steps" not in ev and "sample_rate" not in ev
    # the site's policy may disclose the accountant's inputs
    open_policy = _policy(tmp_path, cache, "open", disclose_accounting=True)
    disclosed = train_round(open_policy, _cfg(batch_size=16), w)
    assert {"noise_multiplier", "sample_rate", "steps"} <= set(disclosed.metrics)
    # ... and then it samples at the exact B/N of its training rows (no size class: N is disclosed anyway;
    # the class of the site's 90 images would give 16/90)
    from fed.task import site_features

    n_train = len(site_features(open_policy, _cfg(), "train")[1])
    assert n_train < 90 and disclosed.metrics["sample_rate"] == pytest.approx(16 / n_train)


def test_site_errors_do_not_leave_the_site(tmp_path, cache, public):
    w = _head(public)
    broken = {**w, "net.0.weight": np.zeros((5, 5), np.float32)}  # wrong shape: loading fails at the site
    reply = train_round(_policy(tmp_path, cache), _cfg(), broken)
    assert reply.status == "refused" and "site's own log" in reply.reason and "/" not in reply.reason


# -- 5. the policy's own checks ----------------------------------------------------------------
def test_policy_delta_must_be_below_one_over_n(tmp_path, cache, public):
    reply = train_round(_policy(tmp_path, cache, delta=0.05), _cfg(), _head(public))  # 1/N ~ 0.011
    assert reply.status == "refused" and "1/N" in reply.reason
    assert not any(c.isdigit() for c in reply.reason.replace("1/N", ""))  # N itself stays at the site


def test_policy_minimum_noise_multiplier(tmp_path, cache, public):
    """A coordinator-fixed sigma below the site's floor is refused before anything is charged (one
    such release could spend the whole lifetime budget); a calibrated sigma is raised to the floor."""
    w = _head(public)
    policy = _policy(tmp_path, cache, min_noise_multiplier=3.0)
    low = train_round(policy, _cfg(noise_multiplier=0.3), w)
    assert low.status == "refused" and "minimum 3" in low.reason
    assert not policy.ledger_path.exists()
    calibrated = train_round(policy, _cfg(noise_multiplier=0.0, target_epsilon=50.0), w)  # calibrated below 3 without the floor
    assert calibrated.status == "ok"
    assert _lifetime_ledger(policy)["releases"][0]["noise_multiplier"] == 3.0


def test_released_delta_and_epsilon_do_not_reveal_n(tmp_path, cache, public):
    """delta: a power of ten (default), so only N's order of magnitude shows; epsilon: rounded up
    to a multiple of 0.25 unless the site discloses its accounting (exact epsilon is a function of N)."""
    from fed.policy import SitePolicy

    site = SitePolicy(data="x")
    assert [site.delta_for(n) for n in (90, 9_999, 10_001, 12_345, 99_999, 100_001)] == [1e-5, 1e-5, 1e-6, 1e-6, 1e-6, 1e-7]
    w = _head(public)
    reply = train_round(_policy(tmp_path, cache), _cfg(), w)
    exact = _lifetime_ledger(_policy(tmp_path, cache))["epsilon"]
    assert reply.metrics["delta"] == 1e-5
    assert reply.metrics["epsilon"] % 0.25 == 0 and exact <= reply.metrics["epsilon"] < exact + 0.25


def test_policy_caps_the_clipping_bound(tmp_path, cache, public):
    reply = train_round(_policy(tmp_path, cache, max_grad_norm=0.25), _cfg(max_grad_norm=0.5), _head(public))
    assert reply.status == "refused" and "max_grad_norm" in reply.reason


def test_insecure_deterministic_noise_is_reproducible_and_says_not_private(tmp_path, cache, public):
    cfg, w = _cfg(), _head(public)
    a = train_round(_policy(tmp_path, cache, "one", insecure_deterministic_noise=True), cfg, w)
    b = train_round(_policy(tmp_path, cache, "two", insecure_deterministic_noise=True), cfg, w)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert a.reason.startswith("NOT PRIVATE") and a.metrics["not-private"] == 1.0
    book = _lifetime_ledger(_policy(tmp_path, cache, "one"))
    assert book["private"] is False and book["releases"][0]["private"] is False


# -- 6. the feature cache key ------------------------------------------------------------------
def test_feature_cache_key_is_the_sites_own_checkpoint_hash(tmp_path):
    from fed.features import EncoderRef, site_encoder_key

    ckpt = tmp_path / "encoder.pth"
    ckpt.write_bytes(b"weights the site has")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # the coordinator did not announce a sha256: the site hashes its own file (no config-seedN fallback)
    assert site_encoder_key(EncoderRef("echocare-tiny", str(ckpt), None, 0)) == f"echocare-tiny-{sha[:16]}"
    with pytest.raises(RuntimeError, match="expects"):
        site_encoder_key(EncoderRef("echocare-tiny", str(ckpt), "0" * 64, 0))
    assert site_encoder_key(EncoderRef("echocare-tiny", None, None, 3)) == "echocare-tiny-seed3"
