"""Hospital-side and coordinator-side building blocks, without a running federation."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from fed.cache import FeatureCache, image_hash
from fed.dp import DPConfig, train_head
from fed.ledger import PrivacyLedger, Release, calibrate_noise
from fed.policy import Instruction, PolicyError, SitePolicy, load_policy, refusal_reason, write_policy
from dp_helpers import independent_epsilon

warnings.filterwarnings("ignore", category=UserWarning)


# -- privacy ledger --------------------------------------------------------------------------------
def test_ledger_is_cumulative_persistent_and_matches_independent_accounting(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, delta=1e-5, budget_epsilon=10.0)
    ledger.charge(Release("train", 1.1, 0.05, 40, 1.0, round=1))
    eps1 = ledger.epsilon()
    # a new process opens the same ledger: the spend carries over and keeps growing
    again = PrivacyLedger.open(path, delta=0.5, budget_epsilon=10.0)
    assert again.delta == 1e-5  # delta is fixed when the ledger is created
    again.charge(Release("train", 1.1, 0.05, 40, 1.0, round=2))
    assert again.epsilon() > eps1
    assert again.steps == 80
    assert again.epsilon() == pytest.approx(independent_epsilon([(1.1, 0.05, 80)], 1e-5), rel=0.02)
    # privacy change: a release claiming round 2 again is a new release, charged (the round number
    # is the coordinator's claim); only an identical request gets its stored reply (fed.task)
    again.charge(Release("train", 1.1, 0.05, 40, 1.0, round=2))
    assert again.steps == 120 and PrivacyLedger.open(path, 1e-5, 10.0).steps == 120


def test_ledger_refuses_a_round_beyond_budget(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", delta=1e-5, budget_epsilon=1.0)
    assert ledger.would_exceed(Release("train", 0.8, 0.1, 100, 1.0))
    assert not ledger.would_exceed(Release("train", 5.0, 0.01, 10, 1.0))


def test_corrupt_ledger_is_an_error_not_a_reset(tmp_path):
    p = tmp_path / "l.json"
    p.write_text("{not json")
    with pytest.raises(RuntimeError, match="corrupt"):
        PrivacyLedger.open(p, 1e-5, 8.0)


def test_noise_calibration_hits_the_target():
    sigma = calibrate_noise(4.0, 1e-5, 0.05, 200)
    eps = independent_epsilon([(sigma, 0.05, 200)], 1e-5)
    assert 3.8 < eps <= 4.05


def test_noise_calibration_agrees_with_opacus_and_is_memoised():
    from opacus.accountants.utils import get_noise_multiplier

    calibrate_noise.cache_clear()
    ours = calibrate_noise(8.0, 1e-4, 0.25, 40)
    assert ours == get_noise_multiplier(target_epsilon=8.0, target_delta=1e-4, sample_rate=0.25, steps=40,
                                        epsilon_tolerance=0.01)
    calibrate_noise(8.0, 1e-4, 0.25, 40)
    assert calibrate_noise.cache_info().hits == 1
    with pytest.raises(ValueError, match="cannot calibrate"):
        calibrate_noise(8.0, 1e-4, 0.0, 40)


# -- DP-SGD ------------------------------------------------------------------------------------------
def _toy(n=300, d=32, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    return x, y


def test_dp_training_learns_and_is_deterministic_only_with_the_insecure_seed():
    # privacy change: DP noise comes from OS entropy; only DPConfig.insecure_seed (tests) reproduces it
    x, y = _toy()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 3)
        stats = train_head(head, x, y, DPConfig(epochs=4, lr=0.5, noise_multiplier=0.8, insecure_seed=3))
        results.append(head.weight.detach().clone())
    assert torch.equal(results[0], results[1]) and stats["private"] is False
    acc = (head(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc
    assert stats["steps"] == 4 * 10 and stats["sample_rate"] == pytest.approx(32 / 300)


def test_dp_noise_changes_the_result():
    x, y = _toy()
    outs = []
    for nm in (0.0, 2.0):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 3)
        train_head(head, x, y, DPConfig(epochs=1, lr=0.5, noise_multiplier=nm, seed=1))
        outs.append(head.weight.detach().clone())
    assert not torch.allclose(outs[0], outs[1])


# -- feature cache -----------------------------------------------------------------------------------
def _compute(calls):
    def f(images):
        calls.append(len(images))
        return {"pooled": np.stack([im.mean(axis=(0, 1), keepdims=False).reshape(1).repeat(4) for im in images]).astype(np.float32)}
    return f


def test_cache_computes_once_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (20, 30), dtype=np.uint8) for _ in range(7)]
    items = [(image_hash(im), im) for im in imgs]
    calls = []
    cache = FeatureCache(tmp_path, "enc-spec-pooled", shard_rows=3)
    cache.ensure(items, _compute(calls), batch_size=2)
    assert sum(calls) == 7
    again = FeatureCache(tmp_path, "enc-spec-pooled")
    calls2 = []
    again.ensure(items, _compute(calls2))
    assert calls2 == [] and again.stats.hits == 7
    got = again.read([k for k, _ in items])["pooled"]
    assert got.dtype == np.float16 and got.shape == (7, 4)
    np.testing.assert_allclose(got[:, 0], [im.mean() for im in imgs], rtol=1e-3)
    # another key (other encoder/spec) shares nothing
    assert len(FeatureCache(tmp_path, "other-spec-pooled")) == 0


def test_cache_changed_image_is_a_miss_and_damaged_shard_is_recomputed(tmp_path):
    img = np.full((10, 10), 7, np.uint8)
    cache = FeatureCache(tmp_path, "k")
    cache.ensure([(image_hash(img), img)], _compute([]))
    img2 = img.copy()
    img2[0, 0] = 8
    assert image_hash(img2) not in cache
    shard = next((tmp_path / "k").glob("shard-*"))
    (shard / "pooled.npy").write_bytes(b"garbage")  # a damaged entry
    reopened = FeatureCache(tmp_path, "k")
    assert image_hash(img) not in reopened and reopened.stats.corrupt_shards
    calls = []
    reopened.ensure([(image_hash(img), img)], _compute(calls))
    assert calls == [1]


def test_cache_crash_mid_write_leaves_no_readable_entry(tmp_path, monkeypatch):
    img = np.ones((5, 5), np.uint8)

    def boom(*a, **k):
        raise OSError("disk full")

    cache = FeatureCache(tmp_path, "k")
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        cache.ensure([(image_hash(img), img)], _compute([]))
    monkeypatch.undo()
    assert len(FeatureCache(tmp_path, "k")) == 0
    assert not list((tmp_path / "k").glob(".tmp-*"))


# -- site policy -------------------------------------------------------------------------------------
def test_policy_roundtrip_and_refusals(tmp_path):
    p = write_policy(SitePolicy(data="phantom:10", site_name="hospital-a", allowed_tasks=["classify"],
                                target_epsilon=3.0, max_local_epochs=2), tmp_path / "policy.toml")
    pol = load_policy(p)
    assert pol.site_name == "hospital-a" and pol.target_epsilon == 3.0
    assert refusal_reason(pol, Instruction("classify", 2, 1.0)) is None
    assert "not allowed" in refusal_reason(pol, Instruction("segment", 1, 1.0))
    assert "max_local_epochs" in refusal_reason(pol, Instruction("classify", 3, 1.0))
    assert pol.delta_for(1000) < 1 / 1000


def test_size_classes_floor_n_to_a_public_grid(tmp_path):
    """N rounded down to floor(2^(k/g)): 4 per doubling by default, powers of two at g = 1; the
    policy field round-trips through TOML and a bad value names the file and the field."""
    from fed.policy import size_class

    assert [size_class(n, 4) for n in (0, 1, 2, 300, 303, 304, 361, 362, 512, 1023)] == \
        [1, 1, 2, 256, 256, 304, 304, 362, 512, 861]
    assert [size_class(n, 1) for n in (255, 256, 300, 500, 511, 512)] == [128, 256, 256, 256, 256, 512]
    assert all(size_class(n, g) <= n < size_class(n, g) * 2 ** (1 / g) + 1 for g in (1, 2, 4, 8) for n in range(1, 3000))
    pol = SitePolicy(data="phantom:10")
    assert pol.size_classes_per_doubling == 4 and pol.sampling_units(500) == 430
    assert SitePolicy(data="phantom:10", disclose_accounting=True).sampling_units(500) == 500  # exact N, disclosed anyway
    assert load_policy(write_policy(SitePolicy(data="phantom:10", size_classes_per_doubling=1), tmp_path / "g1.toml")) \
        .sampling_units(500) == 256
    (tmp_path / "bad.toml").write_text('data = "phantom:10"\nsize_classes_per_doubling = 0\n')
    with pytest.raises(PolicyError, match="bad.toml.*size_classes_per_doubling"):
        load_policy(tmp_path / "bad.toml")


def test_policy_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('data = "x"\nepsilonn = 3\n')
    with pytest.raises(PolicyError, match="p.toml.*epsilonn"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.toml")


def test_fast_linear_dp_clips_exactly_like_opacus_per_sample_gradients():
    """The closed-form per-example norms of the linear fast path equal Opacus' own per-sample
    gradients (GradSampleModule) on the same batch: same clipped sum."""
    from opacus import GradSampleModule

    x, y = _toy(n=40, d=16)
    lin = torch.nn.Linear(16, 3)
    gsm = GradSampleModule(torch.nn.Linear(16, 3), loss_reduction="sum")
    gsm._module.load_state_dict(lin.state_dict())
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per = torch.cat([gsm._module.weight.grad_sample.flatten(1), gsm._module.bias.grad_sample], 1)
    clip = (0.5 / (per.norm(dim=1) + 1e-6)).clamp(max=1.0)
    want = (per * clip[:, None]).sum(0)
    # the production functions (not a re-derived formula)
    from fed.dp import linear_clipped_sum, linear_input_factor

    with torch.no_grad():
        d = torch.softmax(lin(x), 1) - torch.nn.functional.one_hot(y, 3).float()
        norms = d.norm(dim=1) * linear_input_factor(x)
    torch.testing.assert_close(norms, per.norm(dim=1), rtol=1e-4, atol=1e-5)
    gw, gb, _ = linear_clipped_sum(lin.weight, lin.bias, x, linear_input_factor(x), y, 0.5)
    torch.testing.assert_close(torch.cat([gw.flatten(), gb]), want, rtol=1e-4, atol=1e-5)


def test_fast_linear_path_learns_like_the_opacus_path():
    from echocare.models.heads import ClassifyHead

    x, y = _toy(n=600)
    accs = {}
    for fast in (True, False):
        torch.manual_seed(0)
        head = ClassifyHead(32, 3)
        torch.nn.init.zeros_(head.net[0].weight)
        train_head(head, x, y, DPConfig(epochs=5, lr=0.5, noise_multiplier=1.0, seed=2, fast_linear=fast))
        accs[fast] = (head(x).argmax(1) == y).float().mean().item()
    assert accs[True] > 0.7 and accs[False] > 0.7 and abs(accs[True] - accs[False]) < 0.1, accs
