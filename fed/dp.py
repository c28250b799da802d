"""DP-SGD on a task head with Opacus, over cached features.

Privacy meaning of the knobs (example-level DP: neighbouring datasets differ in one image):

- ``max_grad_norm`` (C): each example's gradient is clipped to L2 norm C, bounding what one image
  can change in a step.
- ``noise_multiplier`` (sigma): Gaussian noise of std ``sigma * C`` is added to the summed clipped
  gradients of a batch. Larger sigma, less privacy loss per step.
- ``sample_rate`` (q = ``batch_size / N_s``): each example joins each batch independently with
  probability q (Poisson sampling), which is what the accountant's amplification assumes. Every
  training path samples at exactly this q, the rate the ledger accounts.
- ``steps``: number of noisy steps (``epochs * ceil(N_s / batch_size)``); an empty batch is still a
  noisy step. Privacy loss grows with it.
- ``sampling_units`` (N_s): the number of units q and the steps are computed from. A site sets it
  to its public size class (``fed.policy.size_class``: its N rounded down to a public grid), so
  that q, the steps and the noise on the update (each step's noisy sum is divided by ``q * N_s``)
  are functions of public values and the class only; the expected number of units an epoch
  samples is still the true N. ``None``: the exact number of units in the data (which the update's
  noise norm then reveals).

Where the randomness comes from (:class:`DPRandom`, see docs/privacy.md): every Poisson mask and
every noise value is drawn from ``os.urandom``, never from a seed, so nothing the coordinator knows
(run seed, site name, round) lets it regenerate the noise and subtract it. The noise follows
Opacus' ``secure_mode`` recipe against the floating-point attack on Gaussian sampling (the sum of
four draws, halved). ``DPConfig.insecure_seed`` makes both predictable, for tests only: such a
release is **not private** and is reported so.

The trainer uses Opacus' fast gradient clipping (``grad_sample_mode="ghost"``): per-example
gradient *norms* are computed without materialising per-example gradients, which is what makes
DP-SGD on a head only a few times slower than plain SGD.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class DPConfig:
    """Hyper-parameters of one round of local DP training."""

    epochs: int = 1
    batch_size: int = 32  # expected batch size under Poisson sampling
    lr: float = 0.1
    momentum: float = 0.0  # momentum accumulates DP noise over the few steps of a round
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0  # 0 disables DP (plain SGD; for benchmarks and baselines only)
    proximal_mu: float = 0.0  # FedProx: pull towards the global weights (data-independent step)
    optimizer: str = "sgd"  # sgd | adam (DP-Adam: noise is added before Adam's update, post-processing)
    # A head whose only trainable layer is one nn.Linear gets exact per-example gradient norms in
    # closed form (|dL/dz| * sqrt(|x|^2 + 1), what ghost clipping computes) without Opacus' hooks;
    # same Poisson sampler, same Gaussian mechanism, same accounting.
    fast_linear: bool = True
    grad_sample_mode: str = "ghost"
    # Where the head trains ("cpu", "cuda", "cuda:N"; the site policy's device). Its tensors, the noise
    # and the Poisson batch indices live there; the randomness is still drawn on the CPU (DPRandom).
    device: str = "cpu"
    seed: int = 0  # shuffling of the NON-private baseline (noise_multiplier=0) only; DP never uses it
    # INSECURE, tests and audits only: seeds DP sampling and noise, so anyone who knows it can
    # regenerate the noise. The release is then not private (train_head reports private=False).
    insecure_seed: int | None = None
    # The number of units (images, or patients with ``units``) q and the steps are computed from: the
    # site's public size class (fed.policy.size_class). None: the exact number in the data (reveals N).
    sampling_units: int | None = None


class DPRandom:
    """The randomness of DP-SGD: Poisson masks and Gaussian noise.

    Default: every uniform comes from ``os.urandom`` (the kernel CSPRNG, the source torchcsprng's
    random-device generator reads too) as a 53-bit float in (0, 1); Gaussians by Box-Muller in
    float64. A ``torch.Generator`` seeded from secrets would not do: its MT19937 keeps only the low
    32 bits of the seed. With ``insecure_seed`` a seeded ``torch.Generator`` is used instead
    (reproducible, **not private**).

    ``device``: where the noise and batch indices are returned. They are always drawn on the CPU
    (a CUDA generator cannot be seeded from OS entropy this way) and then moved: the same numbers,
    the same guarantee, on any device.
    """

    def __init__(self, insecure_seed: int | None = None, device: str | torch.device = "cpu"):
        self.private = insecure_seed is None
        self.device = torch.device(device)
        self._gen = None if self.private else torch.Generator().manual_seed(int(insecure_seed))

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in (0, 1)."""
        if not self.private:
            return torch.rand(n, generator=self._gen, dtype=torch.float64)
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy((raw.astype(np.float64) + 0.5) * 2.0**-53)

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` float64 N(0, 1) draws (Box-Muller on :meth:`uniform`)."""
        if not self.private:
            return torch.randn(n, generator=self._gen, dtype=torch.float64)
        m = (n + 1) // 2
        u = self.uniform(2 * m)
        r = torch.sqrt(-2.0 * torch.log(u[:m]))
        theta = 2.0 * math.pi * u[m:]
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]

    def gaussian(self, std: float, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise of std ``std``: Opacus' secure-mode recipe against the floating-point attack
        (``opacus.optimizers.optimizer._generate_noise``): the sum of four N(0, std^2) draws, halved."""
        numel = math.prod(shape)
        z = self.standard_normal(4 * numel).view(4, numel).sum(0) * (std / 2.0)
        return z.view(*shape).to(device=self.device, dtype=dtype)

    def poisson_batch(self, n: int, q: float) -> torch.Tensor:
        """Indices of one Poisson-sampled batch: each of ``n`` examples independently with probability ``q``."""
        return (self.uniform(n) < q).nonzero().flatten().to(self.device)


def sample_rate(n: int, batch_size: int) -> float:
    return min(1.0, batch_size / max(1, n))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Noisy steps per epoch: ``ceil(N / batch_size)``, so an epoch samples each example ~once."""
    return max(1, math.ceil(n / batch_size))


def schedule(n: int, cfg: DPConfig) -> tuple[float, int, float]:
    """(sampling rate q, noisy steps, divisor of each step's noisy sum) for ``n`` units in the data.

    Computed from ``cfg.sampling_units`` when set (the site's public size class), else from ``n``:
    ``q = min(1, B / N_s)``, ``epochs * ceil(N_s / B)`` steps, divisor ``max(q * N_s, 1)`` (the
    expected batch of a site of exactly N_s units; >= 1 so that a noise-only step stays finite).
    Nothing in it depends on ``n`` once ``sampling_units`` is set."""
    units = n if cfg.sampling_units is None else cfg.sampling_units
    q = sample_rate(units, cfg.batch_size)
    return q, cfg.epochs * steps_per_epoch(units, cfg.batch_size), max(q * units, 1.0)


def _optimizer(params, cfg: DPConfig) -> torch.optim.Optimizer:
    """The optimizer both training paths use (DP-Adam is post-processing of the noisy gradient)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def train_head(head: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, cfg: DPConfig,
               loss_fn: nn.Module | None = None, units: torch.Tensor | None = None) -> dict:
    """Train ``head`` in place on (x, y) for ``cfg.epochs``; DP-SGD when ``cfg.noise_multiplier > 0``.

    ``x`` may be a tuple of tensors (e.g. several encoder maps): ``head(*x_batch)`` is called.
    ``loss_fn`` must return one loss per example when its ``reduction`` is ``"none"`` (Opacus'
    ghost clipping sets it so); default: cross-entropy.

    ``units`` (optional, one id per example, e.g. the patient): **user-level DP-SGD**. The unit of
    privacy is then a group of examples: units are Poisson-sampled at ``q = batch_size / U`` (U
    units, or ``cfg.sampling_units``; ``batch_size`` is the expected number of units per batch), each unit's per-example
    gradients are summed and that sum is clipped to ``max_grad_norm``, so one patient with k images
    moves a step by at most C, not k*C (:func:`unit_clipped_sum`). Without ``units``: example-level.

    The head, ``x`` and ``y`` are moved to ``cfg.device`` (the head stays there afterwards).

    Returns {"loss": mean training loss (stays at the site), "steps": noisy steps, "sample_rate": q,
    "unit": "patient" with ``units`` else "image", "private": False only for an ``insecure_seed`` or
    a non-DP run}.
    """
    device = torch.device(cfg.device)
    head.to(device)
    x = tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
    y = y.to(device)
    if cfg.noise_multiplier <= 0:
        return _train_plain(head, x, y, cfg, loss_fn)
    rng = DPRandom(cfg.insecure_seed, device)
    if units is not None:
        return _train_unit_dp(head, x if isinstance(x, tuple) else (x,), y, units.to(device), cfg,
                              loss_fn or nn.CrossEntropyLoss(), rng)
    lin = _single_linear(head) if (cfg.fast_linear and loss_fn is None and not isinstance(x, tuple)
                                    and cfg.proximal_mu == 0) else None
    if lin is not None:
        return _train_linear_dp(head, lin, x, y, cfg, rng)
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in head.modules()):
        # Dropout draws new masks every pass, so the finiteness check of the Opacus path (a separate
        # forward pass) could disagree with the training pass: one pass, per-example units, exact guard.
        return _train_unit_dp(head, x if isinstance(x, tuple) else (x,), y, torch.arange(len(y), device=device), cfg,
                              loss_fn or nn.CrossEntropyLoss(), rng, unit="image")
    return _train_opacus_dp(head, x if isinstance(x, tuple) else (x,), y, cfg, loss_fn or nn.CrossEntropyLoss(), rng)


def _train_plain(head: nn.Module, x, y: torch.Tensor, cfg: DPConfig, loss_fn: nn.Module | None) -> dict:
    """Plain (non-private) SGD: benchmarks and baselines only."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    xs = x if isinstance(x, tuple) else (x,)
    loader = DataLoader(TensorDataset(*xs, y), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    global_weights = [p.detach().clone() for p in head.parameters()] if cfg.proximal_mu > 0 else None
    head.train()
    optimizer = _optimizer(head.parameters(), cfg)
    steps, total, count = 0, 0.0, 0
    for _ in range(cfg.epochs):
        for *xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            loss = loss_fn(head(*xb), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.detach().mean()) * len(yb)
            count += len(yb)
            _proximal(head, global_weights, cfg)
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": sample_rate(len(y), cfg.batch_size),
            "unit": "image", "private": False}


def _proximal(head: nn.Module, global_weights: list[torch.Tensor] | None, cfg: DPConfig) -> None:
    """FedProx's pull towards the global weights (data-independent: post-processing)."""
    if global_weights is not None:
        with torch.no_grad():
            for p, g in zip(head.parameters(), global_weights):
                p.sub_(cfg.lr * cfg.proximal_mu * (p - g))


def _train_opacus_dp(head: nn.Module, xs: tuple[torch.Tensor, ...], y: torch.Tensor, cfg: DPConfig,
                     loss_fn: nn.Module, rng: DPRandom) -> dict:
    """DP-SGD through Opacus' per-sample clipping (ghost or hooks), with :class:`DPRandom` batches
    and noise: Opacus' optimizer clips and sums; its ``add_noise`` is replaced on this instance by
    the same step with our noise, and its expected batch size is :func:`schedule`'s divisor."""
    from opacus import PrivacyEngine
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    n = len(y)
    q, n_steps, expected_batch = schedule(n, cfg)
    std = cfg.noise_multiplier * cfg.max_grad_norm
    global_weights = [p.detach().clone() for p in head.parameters()] if cfg.proximal_mu > 0 else None
    head.train()
    # Opacus wants a loader to wrap; we never iterate it (batches come from rng.poisson_batch). With no
    # example at all (none carries the round's labels: the coordinator's choice) Opacus would divide by
    # its empty length and the site would answer "could not answer", uncharged: a free yes/no on whether
    # a label exists here. One zero row stands in (never read): the round is the usual noise-only release.
    rows = (*xs, y) if n else tuple(torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in (*xs, y))
    placeholder = DataLoader(TensorDataset(*rows), batch_size=cfg.batch_size)
    kwargs = dict(module=head, optimizer=_optimizer(head.parameters(), cfg), data_loader=placeholder,
                  noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                  poisson_sampling=False, grad_sample_mode=cfg.grad_sample_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": Opacus' RNG is not used (DPRandom is)
        engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: the site's ledger accounts
        if cfg.grad_sample_mode == "ghost":
            model, optimizer, criterion, _ = engine.make_private(criterion=loss_fn, **kwargs)
        else:
            model, optimizer, _ = engine.make_private(**kwargs)
            criterion = loss_fn
    optimizer.expected_batch_size = expected_batch
    _zero_nonfinite_examples(model, optimizer, cfg.grad_sample_mode)
    per_example_loss = _per_example(loss_fn)

    def add_noise() -> None:  # DPOptimizer.add_noise, with DPRandom's noise
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + rng.gaussian(std, p.summed_grad.shape, p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
    steps, total, count = 0, 0.0, 0
    for _ in range(n_steps):
        idx = rng.poisson_batch(n, q)
        steps += 1
        optimizer.zero_grad(set_to_none=True)
        idx = idx[_finite_rows(model, tuple(t[idx] for t in xs), y[idx], per_example_loss)]
        if len(idx) == 0:  # an empty batch is still a noisy step (the accountant counts it)
            for p in optimizer.params:
                p.grad = rng.gaussian(std, p.shape, p.dtype) / expected_batch
            optimizer.original_optimizer.step()
        else:
            loss = criterion(model(*(t[idx] for t in xs)), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach().mean()) * len(idx)
            count += len(idx)
        _proximal(head, global_weights, cfg)
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": q, "unit": "image",
            "private": rng.private}


def _per_example(loss_fn: nn.Module) -> nn.Module:
    """A copy of ``loss_fn`` that returns one loss per example (``reduction="none"``)."""
    per = copy.copy(loss_fn)
    per.reduction = "none"
    return per


def _finite_rows(model: nn.Module, xs: tuple[torch.Tensor, ...], y: torch.Tensor, per_example_loss: nn.Module) -> torch.Tensor:
    """Mask of the examples whose loss is finite (a forward pass without gradients). A crafted head
    can make one image overflow; that image then takes no part in the step (it contributes zero, as
    in the linear path), so it cannot turn the whole noisy sum into NaN: a release decided by one image."""
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.bool, device=y.device)
    with torch.no_grad():
        return torch.isfinite(per_example_loss(model(*xs), y)).reshape(len(y), -1).all(1)


def _zero_nonfinite_examples(model: nn.Module, optimizer, mode: str) -> None:
    """Opacus clips each example's gradient by ``C / norm``; a non-finite norm gives a NaN factor that
    spreads to the whole sum. Here such an example's factor (ghost) or per-example gradient (hooks)
    becomes zero, on this instance only: its contribution is zero, the sensitivity stays C."""
    if mode == "ghost":
        coef = model.get_clipping_coef
        model.get_clipping_coef = lambda: torch.nan_to_num(coef(), nan=0.0, posinf=0.0, neginf=0.0)
        return
    clip_and_accumulate = optimizer.clip_and_accumulate

    def guarded() -> None:
        samples = [p.grad_sample for p in optimizer.params]
        if samples and len(samples[0]):
            ok = torch.stack([torch.isfinite(g.reshape(len(g), -1)).all(1) for g in samples]).all(0)
            for p, g in zip(optimizer.params, samples):
                p.grad_sample = torch.where(ok.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=g.device))
        clip_and_accumulate()

    optimizer.clip_and_accumulate = guarded


def unit_clipped_sum(model: nn.Module, params: list[nn.Parameter], xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                     units: torch.Tensor, max_grad_norm: float, per_example_loss: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """User-level clipping: for each unit (patient) in the batch, the **sum** of its examples'
    gradients, clipped to L2 norm ``max_grad_norm`` over all ``params``; then summed over units.

    ``model`` is an Opacus ``GradSampleModule`` (hooks: per-example gradients materialised); an
    example whose loss or gradient is not finite contributes zero. One unit with k examples moves the
    result by at most C (not k*C): that is the sensitivity the accountant assumes per unit.
    Returns (one summed, clipped gradient per parameter, per-example losses)."""
    for p in params:
        p.grad_sample = None
        p.grad = None
    losses = per_example_loss(model(*xs), y).reshape(len(y), -1).sum(1)
    ok = torch.isfinite(losses)
    torch.where(ok, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum().backward()
    grads = [p.grad_sample.reshape(len(y), -1) for p in params]
    for g in grads:
        ok &= torch.isfinite(g).all(1)
    _, inverse = torch.unique(units, return_inverse=True)
    n_units = int(inverse.max()) + 1
    zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
    per_unit = [torch.zeros(n_units, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, inverse, torch.where(ok[:, None], g, zero))
                for g in grads]
    norms = torch.stack([u.pow(2).sum(1) for u in per_unit]).sum(0).sqrt()
    clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [(u * clip[:, None]).sum(0).view_as(p) for u, p in zip(per_unit, params)]
    for p in params:
        p.grad_sample = None
    return sums, losses.detach()


def _train_unit_dp(head: nn.Module, xs: tuple[torch.Tensor, ...], y: torch.Tensor, units: torch.Tensor, cfg: DPConfig,
                   loss_fn: nn.Module, rng: DPRandom, unit: str = "patient") -> dict:
    """DP-SGD where the unit of privacy is a group of examples (user-level DP-SGD, e.g. per patient).

    Each step Poisson-samples units at ``q = B/U_s``, takes all examples of the sampled units, clips
    each unit's summed gradient to C (:func:`unit_clipped_sum`) and adds Gaussian noise of std sigma*C
    to the sum, divided by ``q*U_s`` (U_s: ``cfg.sampling_units``, else the U units present;
    :func:`schedule`): Opacus' DPOptimizer step with a unit in place of an example, so the RDP
    accounting of ``(sigma, q, steps)`` holds per unit."""
    from opacus import GradSampleModule

    _, units = torch.unique(units, return_inverse=True)  # dense ids 0..U-1
    n_units = int(units.max()) + 1 if len(units) else 0
    q, n_steps, expected_batch = schedule(n_units, cfg)  # divisor >= 1: no unit at all -> noise only, finite
    std = cfg.noise_multiplier * cfg.max_grad_norm
    params = [p for p in head.parameters() if p.requires_grad]
    global_weights = [p.detach().clone() for p in head.parameters()] if cfg.proximal_mu > 0 else None
    optimizer = _optimizer(params, cfg)
    per_example_loss = _per_example(loss_fn)
    head.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GradSampleModule(head, batch_first=True, loss_reduction="sum")
    steps, total, count = 0, 0.0, 0
    try:
        for _ in range(n_steps):
            chosen = rng.poisson_batch(n_units, q)
            steps += 1
            sums = [torch.zeros_like(p) for p in params]
            rows = torch.isin(units, chosen).nonzero().flatten()
            if len(rows):
                sums, losses = unit_clipped_sum(model, params, tuple(t[rows] for t in xs), y[rows], units[rows],
                                                cfg.max_grad_norm, per_example_loss)
                finite = losses[torch.isfinite(losses)]
                total += float(finite.sum())
                count += len(finite)
            for p, s in zip(params, sums):  # an empty batch is still a noisy step (the accountant counts it)
                p.grad = (s + rng.gaussian(std, s.shape, s.dtype)) / expected_batch
            optimizer.step()
            _proximal(head, global_weights, cfg)
    finally:
        model._close()  # hooks off: the head is a plain module again
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": q, "unit": unit, "private": rng.private}


class PerImageSegLoss(nn.Module):
    """Cross-entropy + Dice (MONAI) per image: (N, C, H, W) logits, (N, H, W) labels.

    ``reduction="none"`` returns one loss per image (what per-sample clipping needs);
    ``"mean"`` their mean.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        from monai.losses import DiceLoss

        self.reduction = reduction
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target.long(), reduction="none").mean(dim=(1, 2))
        dice = self.dice(logits, target.long().unsqueeze(1)).flatten(1).mean(1)
        per_image = ce + dice
        return per_image if self.reduction == "none" else per_image.mean()


class MapsHead(nn.Module):
    """Adapter: ``forward(*maps)`` -> ``head(list(maps), None)`` (one tensor argument per cached map)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        if getattr(self.head, "needs_image", False):
            return self.head(list(maps[:-1]), maps[-1])
        return self.head(list(maps), None)


def _single_linear(head: nn.Module) -> nn.Linear | None:
    """The head's only trainable layer when it is one nn.Linear (and nothing else trains), else None."""
    trainable = [m for m in head.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    if len(trainable) == 1 and isinstance(trainable[0], nn.Linear) and trainable[0].bias is not None:
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in head.modules()):
            return trainable[0]
    return None


def linear_input_factor(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(|x_i|^2 + 1)`` per row: the per-example gradient norm of a Linear with bias is
    ``|dL/dz_i| * sqrt(|x_i|^2 + 1)`` (the +1 is the bias' gradient ``dL/dz_i``)."""
    return x.pow(2).sum(1).add(1.0).sqrt()


def linear_clipped_sum(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, factor: torch.Tensor,
                       y: torch.Tensor, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over the batch of the per-example cross-entropy gradients of ``x @ weight.T + bias``,
    each clipped to L2 norm ``max_grad_norm`` (``factor`` = :func:`linear_input_factor` of ``x``).
    Returns (weight gradient sum, bias gradient sum, per-example losses)."""
    with torch.no_grad():
        z = x @ weight.T + bias
        d = torch.softmax(z, 1) - nn.functional.one_hot(y, weight.shape[0]).to(z.dtype)
        # An example whose gradient is not finite (a crafted head can make one image's logits overflow)
        # contributes zero: a NaN clip factor would otherwise turn the whole noisy sum into NaN, a
        # release decided by that one image, which no noise hides. Zeroing keeps the sensitivity at C.
        ok = torch.isfinite(d).all(1) & torch.isfinite(factor) & torch.isfinite(x).all(1)
        d = torch.where(ok[:, None], d, torch.zeros((), dtype=d.dtype))
        xs = torch.where(ok[:, None], x, torch.zeros((), dtype=x.dtype))
        clip = (max_grad_norm / (d.norm(dim=1) * torch.where(ok, factor, torch.ones_like(factor)) + 1e-6)).clamp(max=1.0)
        dc = d * clip[:, None]
        return dc.T @ xs, dc.sum(0), nn.functional.cross_entropy(z, y, reduction="none")


def _train_linear_dp(head: nn.Module, lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: DPConfig,
                     rng: DPRandom) -> dict:
    """DP-SGD for a head that is a fixed input transform followed by one trainable nn.Linear.

    Per example i with softmax cross-entropy, dL_i/dW = d_i x_i^T and dL_i/db = d_i, where
    d_i = softmax(z_i) - onehot(y_i); so the per-example gradient norm is |d_i| sqrt(|x_i|^2 + 1),
    exactly. Clipping, the Gaussian noise (std sigma*C on the summed clipped gradient), the division
    by the public expected batch size (:func:`schedule`) and Poisson sampling are those of Opacus' DPOptimizer, so the RDP
    accounting of the ledger applies unchanged.
    """
    n = len(y)
    q, n_steps, expected_batch = schedule(n, cfg)  # divisor >= 1: a site with no example releases noise only, finite
    feats: list[torch.Tensor] = []
    hook = lin.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    with torch.no_grad():
        head.eval()
        head(x)
    hook.remove()
    xt = feats[0]  # the Linear's inputs (after any fixed projection)
    factor = linear_input_factor(xt)
    optimizer = _optimizer(lin.parameters(), cfg)
    std = cfg.noise_multiplier * cfg.max_grad_norm
    steps, total, count = 0, 0.0, 0
    for _ in range(n_steps):
        idx = rng.poisson_batch(n, q)
        steps += 1
        gw, gb = torch.zeros_like(lin.weight), torch.zeros_like(lin.bias)
        if len(idx):
            gw, gb, losses = linear_clipped_sum(lin.weight, lin.bias, xt[idx], factor[idx], y[idx], cfg.max_grad_norm)
            total += float(losses.sum())
            count += len(idx)
        lin.weight.grad = (gw + rng.gaussian(std, gw.shape, gw.dtype)) / expected_batch
        lin.bias.grad = (gb + rng.gaussian(std, gb.shape, gb.dtype)) / expected_batch
        optimizer.step()
    head.train()
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": q, "unit": "image",
            "private": rng.private}
