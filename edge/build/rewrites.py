"""Export-time graph rewrites of MONAI's Swin stages: the same numbers, fewer data-movement ops.

The trained model stays MONAI's (``monai.networks.nets.swin_unetr.SwinTransformer``); only the
graph handed to the ONNX exporter changes. :func:`rewrite_for_export` returns a deep copy of a
model in which every 2-D Swin stage (MONAI's ``BasicLayer``) is replaced by a
:class:`WindowOrderStage` that computes the same function:

- **Window order for the whole stage.** LayerNorm, the qkv/proj/MLP linears and the residual
  adds act on each token separately, so they commute with any permutation of the tokens. A
  stage therefore keeps its tokens in the *window order* of the block being run, a flat
  ``(B, H*W, C)`` tensor whose consecutive ``n = wh*ww`` tokens are one window, and moves from
  one block's order to the next (and back to raster order at the end) with **one constant
  Gather** of token rows. MONAI per block: cyclic shift (``torch.roll``: slices + concat per
  axis), window partition (reshape, 6-D transpose, reshape), the reverse of both, and back.
- **Attention as MatMul -> Add(constant) -> Softmax -> MatMul**, the scaled-dot-product pattern
  OpenVINO fuses: the ``head_dim**-0.5`` scale is folded into the query rows of the qkv weights,
  the relative position bias (``table[index]``) is a precomputed constant, and for shifted
  blocks MONAI's shift mask (-100 between regions) is added to that constant once, at export.
  q, k and v are three linears (the rows of MONAI's one qkv linear), so each head split and the
  head merge is a 4-D transpose ``(B*nW, n, heads, d) -> (B*nW, heads, n, d)``: with one qkv
  linear the split is a 6-D transpose, which OpenVINO's CPU plugin runs with a slow generic
  kernel (``split_qkv=False`` keeps that form, for comparison).

MONAI's ``use_v2`` is SwinUNETR-v2 (a residual conv block before each stage), not Swin-v2's
cosine attention: the attention here is Swin-v1's scaled dot product, so there is no logit scale
or continuous position-bias MLP to fold. Stages that need padding (a side not a multiple of the
window), 3-D stages and Hyena stages keep MONAI's own forward.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def window_order(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """Raster token index of each position of the window-ordered sequence (length ``h*w``).

    Position ``t = ((a*nw + b)*wh + p)*ww + q`` (window ``(a, b)``, offset ``(p, q)``) holds the
    token MONAI's block puts there after ``roll(x, (-sh, -sw))`` and ``window_partition``:
    raster token ``((a*wh + p + sh) % h) * w + (b*ww + q + sw) % w``.
    """
    wh, ww = window
    sh, sw = shift
    a, b, p, q = np.meshgrid(np.arange(h // wh), np.arange(w // ww), np.arange(wh), np.arange(ww), indexing="ij")
    rows = (a * wh + p + sh) % h
    cols = (b * ww + q + sw) % w
    return (rows * w + cols).reshape(-1).astype(np.int64)


def shift_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """MONAI's ``compute_mask`` for a shifted block: ``(num_windows, n, n)``, 0 within a region, -100 across."""
    import torch
    from monai.networks.nets.swin_unetr import compute_mask

    return compute_mask([h, w], window, shift, torch.device("cpu")).numpy()


def _attention_bias(attn: "nn.Module", n: int) -> "torch.Tensor":
    """MONAI's relative position bias for one window: ``(heads, n, n)``."""
    index = attn.relative_position_index[:n, :n].reshape(-1)
    return attn.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous().detach().clone()


def _scaled_qkv(attn: "nn.Module") -> "nn.Module":
    """A copy of the qkv linear with the attention scale folded into its query rows."""
    import torch

    qkv = copy.deepcopy(attn.qkv)
    c = attn.dim
    with torch.no_grad():
        qkv.weight[:c] *= attn.scale
        if qkv.bias is not None:
            qkv.bias[:c] *= attn.scale
    return qkv


def _rows(linear: "nn.Module", start: int, stop: int) -> "nn.Module":
    """A new linear computing output rows ``start:stop`` of ``linear``."""
    import torch
    from torch import nn

    out = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight[start:stop])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[start:stop])
    return out


def _block_module():
    """The rewritten block class (defined lazily: torch is imported only when rewriting)."""
    import torch
    from torch import nn

    class WindowOrderBlock(nn.Module):
        """One MONAI ``SwinTransformerBlock`` on tokens already in its window order: ``(B, L, C) -> (B, L, C)``."""

        def __init__(self, blk: nn.Module, h: int, w: int, window: tuple[int, int], shift: tuple[int, int],
                     split: bool = False) -> None:
            super().__init__()
            attn = blk.attn
            self.heads, self.dim = attn.num_heads, attn.dim
            self.n = window[0] * window[1]
            self.windows = (h // window[0]) * (w // window[1])
            self.norm1, self.norm2, self.mlp = blk.norm1, blk.norm2, blk.mlp
            self.proj = attn.proj
            self.split = split
            if split:  # three linears: each head split / merge is a 4-D transpose
                qkv = _scaled_qkv(attn)
                self.q, self.k, self.v = (_rows(qkv, i * self.dim, (i + 1) * self.dim) for i in range(3))
            else:
                self.qkv = _scaled_qkv(attn)
            bias = _attention_bias(attn, self.n)  # (heads, n, n)
            if any(shift):
                mask = torch.from_numpy(shift_mask(h, w, window, shift)).to(bias.dtype)  # (nW, n, n)
                bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(-1, self.n, self.n)  # (nW * heads, n, n)
            self.groups = int(bias.shape[0])  # heads, or windows x heads
            self.register_buffer("bias", bias, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c, heads, n, nw = self.dim, self.heads, self.n, self.windows
            d = c // heads
            t = self.norm1(x)  # (B, L, C), L = nW * n, window order
            # 4-D attention (the form OpenVINO's attention fusion takes): windows in the batch axis
            # when every window shares the bias, else windows x heads as the "heads" axis.
            if self.split:
                q, k, v = (lin(t).reshape(-1, n, heads, d).transpose(1, 2).reshape(-1, self.groups, n, d)
                           for lin in (self.q, self.k, self.v))  # (B*nW, heads, n, d), regrouped
            else:
                qkv = self.qkv(t).reshape(-1, nw, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, n, d)
                qkv = qkv.reshape(3, -1, self.groups, n, d)
                q, k, v = qkv[0], qkv[1], qkv[2]
            attn = torch.softmax(q @ k.transpose(-2, -1) + self.bias, dim=-1)  # scale already in q
            if self.split:
                o = (attn @ v).reshape(-1, heads, n, d).transpose(1, 2).reshape(-1, nw * n, c)
            else:
                o = (attn @ v).reshape(-1, nw, heads, n, d).permute(0, 1, 3, 2, 4).reshape(-1, nw * n, c)
            x = x + self.proj(o)
            return x + self.mlp(self.norm2(x))

    return WindowOrderBlock


def _stage_module():
    import torch
    from monai.networks.nets.swin_unetr import get_window_size
    from torch import nn

    block_cls = _block_module()

    class WindowOrderStage(nn.Module):
        """MONAI's 2-D ``BasicLayer``, with its blocks run in window order (see the module doc).

        The gathers depend on the input's height and width, so the rewritten blocks are built for
        the first ``(h, w)`` seen and rebuilt when it changes (an export traces one fixed size).
        """

        def __init__(self, layer: nn.Module, split_qkv: bool = False) -> None:
            super().__init__()
            self.layer = layer  # MONAI's own, for its parameters and the fallback
            self.split_qkv = split_qkv
            self._size: tuple[int, int] | None = None
            self.blocks = nn.ModuleList()
            self.gathers: list[torch.Tensor | None] = []

        def _build(self, h: int, w: int) -> None:
            layer = self.layer
            self.blocks = nn.ModuleList()
            self.gathers = []
            position = np.arange(h * w)  # position[t] = raster token at place t of the current order
            for blk in layer.blocks:
                window, shift = get_window_size((h, w), blk.window_size, blk.shift_size)
                order = window_order(h, w, tuple(window), tuple(shift))
                self.gathers.append(_gather_index(position, order))
                self.blocks.append(block_cls(blk, h, w, tuple(window), tuple(shift), self.split_qkv))
                position = order
            self.gathers.append(_gather_index(position, np.arange(h * w)))
            self._size = (h, w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            h, w = int(h), int(w)
            window = get_window_size((h, w), self.layer.window_size)
            if len(self.layer.window_size) != 2 or h % window[0] or w % window[1]:
                return self.layer(x)  # padding needed: MONAI's own forward
            if self._size != (h, w):
                self._build(h, w)
            t = x.permute(0, 2, 3, 1).reshape(-1, h * w, c)
            for gather, blk in zip(self.gathers, self.blocks):
                t = t if gather is None else t[:, gather]
                t = blk(t)
            if self.gathers[-1] is not None:
                t = t[:, self.gathers[-1]]
            t = t.reshape(-1, h, w, c)
            if self.layer.downsample is not None:
                t = self.layer.downsample(t)
            return t.permute(0, 3, 1, 2)

    return WindowOrderStage


def _gather_index(current: np.ndarray, wanted: np.ndarray) -> "torch.Tensor | None":
    """Indices into a tensor whose place ``t`` holds raster token ``current[t]`` that give the
    order ``wanted``; None when that is the identity (no Gather in the graph)."""
    import torch

    where = np.empty_like(current)
    where[current] = np.arange(current.size)
    idx = where[wanted]
    return None if np.array_equal(idx, np.arange(idx.size)) else torch.from_numpy(idx)


def rewritable_stages(model: "nn.Module") -> list[str]:
    """Names of the MONAI Swin stages :func:`rewrite_for_export` replaces (2-D, attention blocks)."""
    from monai.networks.nets.swin_unetr import BasicLayer

    return [name for name, m in model.named_modules()
            if isinstance(m, BasicLayer) and not getattr(m, "use_hyena", False) and len(m.window_size) == 2]


def rewrite_for_export(model: "nn.Module", size: int, in_chans: int = 3, split_qkv: bool = True) -> "nn.Module":
    """A deep copy of ``model`` (eval mode) with every 2-D MONAI Swin stage in its window-order
    form, built for ``(size, size)`` inputs (one forward at batch 1 builds the constants, so the
    exporter's trace sees a fixed module); the original is left untouched. Raises ValueError
    when there is no stage to rewrite."""
    import torch

    names = rewritable_stages(model)
    if not names:
        raise ValueError(f"{type(model).__name__}: no MONAI Swin stage to rewrite")
    stage_cls = _stage_module()
    out = copy.deepcopy(model).eval()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        layer = parent.get_submodule(child)
        if child.isdigit():
            parent[int(child)] = stage_cls(layer, split_qkv)
        else:
            setattr(parent, child, stage_cls(layer, split_qkv))
    with torch.no_grad():
        out(torch.zeros(1, in_chans, size, size))
    return out
