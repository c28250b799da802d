"""The DP-SGD mechanism as the site runs it: these tests call the production training path
(``fed.dp.train_head``) and compare what it released with an independent computation (Opacus'
own per-sample gradients), so a weakened mechanism fails them: noise scaled down, a per-example
norm that forgets the bias, a sampling rate other than the accounted B/N, predictable noise."""

from __future__ import annotations

import warnings

import pytest
import torch

from fed.dp import DPConfig, train_head

warnings.filterwarnings("ignore", category=UserWarning)

PATHS = [pytest.param(dict(fast_linear=True), id="fast-linear"),
         pytest.param(dict(fast_linear=False, grad_sample_mode="ghost"), id="opacus-ghost"),
         pytest.param(dict(fast_linear=False, grad_sample_mode="hooks"), id="opacus-hooks")]


def _data(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 0.7  # |x| ~ 0.7 sqrt(d): clipping is active at C=0.5
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _opacus_clipped_sum(lin: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Opacus' own per-sample gradients (GradSampleModule), clipped to ``c`` and summed: flat (W, b)."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(torch.nn.Linear(lin.in_features, lin.out_features), loss_reduction="sum")
    gsm._module.load_state_dict(lin.state_dict())
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per = torch.cat([gsm._module.weight.grad_sample.flatten(1), gsm._module.bias.grad_sample], 1)
    clip = (c / (per.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (per * clip[:, None]).sum(0)


def _one_full_batch_step(x, y, sigma: float, c: float, path: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD step with sample rate 1 (batch_size >= N: every example in the one batch), lr 1:
    returns (what the production path added to the clipped sum = the noise, Opacus' clipped sum)."""
    n, d = x.shape
    k = int(y.max()) + 1
    torch.manual_seed(1)
    lin = torch.nn.Linear(d, k)
    start = lin.state_dict()
    start = {key: v.clone() for key, v in start.items()}
    want = _opacus_clipped_sum(lin, x, y, c)
    stats = train_head(lin, x, y, DPConfig(epochs=1, batch_size=n, lr=1.0, max_grad_norm=c, noise_multiplier=sigma, **path))
    assert stats["steps"] == 1 and stats["sample_rate"] == 1.0 and stats["private"]
    # SGD with lr 1: new = old - (clipped_sum + noise) / expected_batch, expected_batch = q * N = N
    released = torch.cat([(start["weight"] - lin.weight.detach()).flatten(), start["bias"] - lin.bias.detach()]) * n
    return released - want, want


@pytest.mark.parametrize("path", PATHS)
def test_released_gradient_is_the_clipped_sum_opacus_computes(path):
    """With negligible noise the production step releases exactly Opacus' clipped per-sample sum
    (fails when the per-example norm forgets the bias term, or clipping is wrong)."""
    x, y = _data(64, 20, 3)
    residual, want = _one_full_batch_step(x, y, sigma=1e-7, c=0.5, path=path)
    assert float(want.norm()) > 1.0  # a real signal, clipped (64 examples, C = 0.5)
    torch.testing.assert_close(residual, torch.zeros_like(residual), atol=2e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_released_noise_has_std_sigma_times_c(path):
    """The production step adds Gaussian noise of std sigma*C to the clipped sum (fails when the
    noise is scaled down, e.g. 100x, or dropped)."""
    x, y = _data(50, 300, 4)
    sigma, c = 1.3, 0.5
    noise, _ = _one_full_batch_step(x, y, sigma=sigma, c=c, path=path)
    assert noise.numel() == 300 * 4 + 4
    assert float(noise.std()) == pytest.approx(sigma * c, rel=0.08)
    assert abs(float(noise.mean())) < 4 * sigma * c / noise.numel() ** 0.5
    # Gaussian, not e.g. uniform: kurtosis ~ 3
    z = (noise - noise.mean()) / noise.std()
    assert float(z.pow(4).mean()) == pytest.approx(3.0, abs=0.6)


@pytest.mark.parametrize("path", PATHS)
def test_sampling_rate_and_steps_are_the_accounted_ones(path, monkeypatch):
    """Both paths sample at q = B/N (the ledger's rate; Opacus' loader would use 1/len(loader))
    for epochs * ceil(N/B) steps, and an empty batch is still a noisy step."""
    from fed.dp import DPRandom

    calls: list[tuple[int, float]] = []
    real = DPRandom.poisson_batch

    def spy(self, n, q):
        calls.append((n, q))
        return real(self, n, q)[:0] if len(calls) % 2 else real(self, n, q)  # every other batch empty

    monkeypatch.setattr(DPRandom, "poisson_batch", spy)
    x, y = _data(100, 8, 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    before = head.weight.detach().clone()
    stats = train_head(head, x, y, DPConfig(epochs=2, batch_size=30, lr=0.1, noise_multiplier=1.0, **path))
    assert stats["sample_rate"] == pytest.approx(0.3) and stats["steps"] == 2 * 4
    assert calls == [(100, pytest.approx(0.3))] * 8
    assert not torch.equal(before, head.weight.detach())


def test_empty_batches_release_noise_only(monkeypatch):
    """All batches empty: the head still moves, by noise of std lr*sigma*C/(qN) per step."""
    from fed.dp import DPRandom

    monkeypatch.setattr(DPRandom, "poisson_batch", lambda self, n, q: torch.zeros(0, dtype=torch.long))
    for path in (dict(fast_linear=True), dict(fast_linear=False)):
        x, y = _data(100, 200, 3)
        head = torch.nn.Linear(200, 3)
        torch.nn.init.zeros_(head.weight)
        train_head(head, x, y, DPConfig(epochs=1, batch_size=100, lr=1.0, max_grad_norm=2.0, noise_multiplier=1.0, **path))
        assert float(head.weight.detach().std()) == pytest.approx(2.0 / 100, rel=0.1), path


def test_noise_is_not_reproducible_unless_the_insecure_seed_is_set():
    x, y = _data(200, 16, 3)

    def run(**kw):
        torch.manual_seed(0)  # everything a coordinator could fix is fixed
        head = torch.nn.Linear(16, 3)
        stats = train_head(head, x, y, DPConfig(epochs=1, lr=0.5, noise_multiplier=1.0, seed=7, **kw))
        return head.weight.detach().clone(), stats["private"]

    (a, pa), (b, pb) = run(), run()
    assert pa and pb and not torch.equal(a, b)
    (c, pc), (d, pd) = run(insecure_seed=3), run(insecure_seed=3)
    assert torch.equal(c, d) and not pc and not pd


def test_dp_random_draws_from_os_entropy_and_is_gaussian(monkeypatch):
    import os

    from fed.dp import DPRandom

    r = DPRandom()
    z = r.gaussian(2.0, (200_000,))
    assert z.dtype == torch.float32
    assert float(z.std()) == pytest.approx(2.0, rel=0.01) and abs(float(z.mean())) < 0.02
    u = r.uniform(100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and float(u.mean()) == pytest.approx(0.5, abs=0.01)
    # the secure path reads os.urandom (nothing else): a constant urandom gives constant draws
    monkeypatch.setattr(os, "urandom", lambda k: b"\x5a" * k)
    assert torch.equal(DPRandom().uniform(4), DPRandom().uniform(4))
    assert float(DPRandom().poisson_batch(1000, 0.5).numel()) in (0, 1000)


def test_seeded_torch_generators_keep_only_32_bits_of_the_seed():
    """Why DPRandom never seeds a torch.Generator for DP: seeds s and s + 2**32 give the same noise
    (a coordinator could search all 2**32 seeds)."""
    a = torch.randn(5, generator=torch.Generator().manual_seed(12345))
    b = torch.randn(5, generator=torch.Generator().manual_seed(12345 + 2**32))
    assert torch.equal(a, b)


@pytest.mark.parametrize("path", [*PATHS, pytest.param(dict(fast_linear=False, units=2), id="per-patient")])
def test_with_a_size_class_the_schedule_and_the_noise_do_not_depend_on_n(monkeypatch, path):
    """Every training path samples and steps by ``sampling_units`` (the site's public size class), and
    divides each step's noisy sum by ``q * sampling_units``: sites of 70 and 120 units in the class 64
    take the same q (16/64) and steps (4), and their noise-only updates (every batch empty) have the
    same std, lr * sigma * C * sqrt(steps) / (q * 64). From the exact N: q 16/70 vs 16/120, 5 vs 8 steps."""
    from fed.dp import DPRandom

    calls = []
    monkeypatch.setattr(DPRandom, "poisson_batch", lambda self, n, q: calls.append((n, q)) or torch.zeros(0, dtype=torch.long))
    path = dict(path)
    per_unit = path.pop("units", None)
    seen = {}
    for n in (70, 120):
        calls.clear()
        x, y = _data(n * (per_unit or 1), 200, 3)
        units = torch.arange(len(y)) // per_unit if per_unit else None
        head = torch.nn.Linear(200, 3)
        torch.nn.init.zeros_(head.weight)
        stats = train_head(head, x, y, DPConfig(epochs=1, batch_size=16, lr=1.0, max_grad_norm=2.0, noise_multiplier=1.0,
                                                sampling_units=64, **path), units=units)
        assert calls == [(n, 0.25)] * 4  # Poisson over the site's own n units, at the class's rate
        seen[n] = (stats["sample_rate"], stats["steps"])
        assert float(head.weight.detach().std()) == pytest.approx(2.0 * 4 ** 0.5 / 16, rel=0.1), n
    assert seen[70] == seen[120] == (0.25, 4)
