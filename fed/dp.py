"""DP-SGD on a task head with Opacus, over cached features.

Privacy meaning of the knobs (example-level DP: neighbouring datasets differ in one image):

- ``max_grad_norm`` (C): each example's gradient is clipped to L2 norm C, bounding what one image
  can change in a step.
- ``noise_multiplier`` (sigma): Gaussian noise of std ``sigma * C`` is added to the summed clipped
  gradients of a batch. Larger sigma, less privacy loss per step.
- ``sample_rate`` (q): each example joins each batch independently with probability q (Poisson
  sampling, ``batch_size / N``), which is what the accountant's amplification assumes.
- ``steps``: number of noisy steps; privacy loss grows with it.

The trainer uses Opacus' fast gradient clipping (``grad_sample_mode="ghost"``): per-example
gradient *norms* are computed without materialising per-example gradients, which is what makes
DP-SGD on a head only a few times slower than plain SGD.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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
    seed: int = 0


def sample_rate(n: int, batch_size: int) -> float:
    return min(1.0, batch_size / max(1, n))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch of Opacus' Poisson DPDataLoader (= len of the original loader)."""
    return max(1, math.ceil(n / batch_size))


def _optimizer(params, cfg: DPConfig) -> torch.optim.Optimizer:
    """The optimizer both training paths use (DP-Adam is post-processing of the noisy gradient)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def train_head(head: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, cfg: DPConfig,
               loss_fn: nn.Module | None = None) -> dict:
    """Train ``head`` in place on (x, y) for ``cfg.epochs``; DP-SGD when ``cfg.noise_multiplier > 0``.

    ``x`` may be a tuple of tensors (e.g. several encoder maps): ``head(*x_batch)`` is called.
    ``loss_fn`` must return one loss per example when its ``reduction`` is ``"none"`` (Opacus'
    ghost clipping sets it so); default: cross-entropy.

    Returns {"loss": mean training loss, "steps": optimizer steps, "sample_rate": q}.
    Deterministic for a given ``cfg.seed`` (sampling and noise both come from seeded generators).
    """
    lin = _single_linear(head) if (cfg.fast_linear and loss_fn is None and not isinstance(x, tuple)
                                    and cfg.noise_multiplier > 0 and cfg.proximal_mu == 0) else None
    if lin is not None:
        return _train_linear_dp(head, lin, x, y, cfg)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    xs = x if isinstance(x, tuple) else (x,)
    n = len(y)
    q = sample_rate(n, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(*xs, y), batch_size=cfg.batch_size, shuffle=True, generator=gen)
    global_weights = [p.detach().clone() for p in head.parameters()] if cfg.proximal_mu > 0 else None
    head.train()
    optimizer = _optimizer(head.parameters(), cfg)
    model, criterion = head, loss_fn
    if cfg.noise_multiplier > 0:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode advice; we seed on purpose for reproducibility
            if cfg.grad_sample_mode == "ghost":
                model, optimizer, criterion, loader = engine.make_private(
                    module=head, optimizer=optimizer, criterion=loss_fn, data_loader=loader,
                    noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                    poisson_sampling=True, grad_sample_mode="ghost",
                    noise_generator=torch.Generator().manual_seed(cfg.seed + 1))
            else:
                model, optimizer, loader = engine.make_private(
                    module=head, optimizer=optimizer, data_loader=loader,
                    noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                    poisson_sampling=True, grad_sample_mode=cfg.grad_sample_mode,
                    noise_generator=torch.Generator().manual_seed(cfg.seed + 1))
    steps, total, count = 0, 0.0, 0
    for _ in range(cfg.epochs):
        for *xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            steps += 1  # counted even when Poisson sampling draws an empty batch (conservative)
            if len(yb) == 0:
                continue
            loss = criterion(model(*xb), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.detach().mean()) * len(yb)
            count += len(yb)
            if global_weights is not None:
                with torch.no_grad():
                    for p, g in zip(head.parameters(), global_weights):
                        p.sub_(cfg.lr * cfg.proximal_mu * (p - g))
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": q}


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


def _train_linear_dp(head: nn.Module, lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: DPConfig) -> dict:
    """DP-SGD for a head that is a fixed input transform followed by one trainable nn.Linear.

    Per example i with softmax cross-entropy, dL_i/dW = d_i x_i^T and dL_i/db = d_i, where
    d_i = softmax(z_i) - onehot(y_i); so the per-example gradient norm is |d_i| sqrt(|x_i|^2 + 1),
    exactly. Clipping, the Gaussian noise (std sigma*C on the summed clipped gradient), the division
    by the expected batch size and Poisson sampling (Opacus' UniformWithReplacementSampler) are those
    of Opacus' DPOptimizer, so the RDP accounting of the ledger applies unchanged.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n = len(y)
    q = sample_rate(n, cfg.batch_size)
    feats: list[torch.Tensor] = []
    hook = lin.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    with torch.no_grad():
        head.eval()
        head(x)
    hook.remove()
    xt = feats[0]  # the Linear's inputs (after any fixed projection)
    sq = xt.pow(2).sum(1).add(1.0).sqrt()
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(cfg.seed),
                                            steps=steps_per_epoch(n, cfg.batch_size))
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = _optimizer(lin.parameters(), cfg)
    expected_batch = q * n
    steps, total, count = 0, 0.0, 0
    k = lin.out_features
    for _ in range(cfg.epochs):
        for idx in sampler:
            steps += 1
            idx = torch.as_tensor(idx, dtype=torch.long)
            gw = torch.zeros_like(lin.weight)
            gb = torch.zeros_like(lin.bias)
            if len(idx):
                xb, yb = xt[idx], y[idx]
                with torch.no_grad():
                    z = xb @ lin.weight.T + lin.bias
                    d = torch.softmax(z, 1) - nn.functional.one_hot(yb, k).to(z.dtype)
                    factor = (cfg.max_grad_norm / (d.norm(dim=1) * sq[idx] + 1e-6)).clamp(max=1.0)
                    dc = d * factor[:, None]
                    gw, gb = dc.T @ xb, dc.sum(0)
                    total += float(nn.functional.cross_entropy(z, yb, reduction="sum"))
                    count += len(idx)
            std = cfg.noise_multiplier * cfg.max_grad_norm
            lin.weight.grad = (gw + torch.normal(0.0, std, gw.shape, generator=noise_gen)) / expected_batch
            lin.bias.grad = (gb + torch.normal(0.0, std, gb.shape, generator=noise_gen)) / expected_batch
            optimizer.step()
    head.train()
    return {"loss": total / max(1, count), "steps": steps, "sample_rate": q}
