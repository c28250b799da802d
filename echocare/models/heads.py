"""Task heads: the only trainable (and the only shared) parameters of a federation.

All heads are trained with Opacus (DP-SGD, ghost clipping for classification), so they use only
layers Opacus can compute per-sample gradients for: ``nn.Linear``, ``nn.Conv2d``,
``nn.ConvTranspose2d`` (Opacus' functorch fallback), parameter-free InstanceNorm, activations and
dropout. No BatchNorm anywhere.

- :class:`ClassifyHead`: linear (``hidden=0``) or one-hidden-layer MLP over the pooled features
  (:func:`echocare.models.encoder.pooled_features`) of all five maps (default) or of the last
  one only (``pooling="last"``, as the FETUS 2026 challenge baseline).
- :class:`SegmentHead` ``variant="unetr"``: the SwinUNETR decoder (MONAI ``UnetrBasicBlock`` /
  ``UnetrUpBlock`` / ``UnetOutBlock``, wired exactly as in ``monai.networks.nets.SwinUNETR``)
  over all five encoder maps plus the input image (SwinUNETR's wiring; EchoCare publishes no
  fine-tuning code of its own).
- :class:`SegmentHead` ``variant="light"``: a small FPN-style decoder over the stride 8/16/32 maps
  only (no raw-image branch), upsampled bilinearly to the input size. Far cheaper on CPU.

Each head says which encoder maps it consumes (``needs``, indices into the five maps) and whether
it wants the input image (``needs_image``), so a feature cache can store only those.
:func:`build_head` and :func:`head_kwargs_of` round-trip a head through JSON.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from torch import nn

from echocare.models.encoder import EncoderConfig, get_config, pooling_stages

TASKS = ("classify", "segment", "hc")
SEGMENT_VARIANTS = ("unetr", "light")
#: hc heads are binary segmentation heads with two output channels (background, head), read
#: with argmax like any segmentation head; the mask then goes to :mod:`echocare.hc`.
HC_OUT_CHANNELS = 2
#: Default ``feature_size`` of the unetr decoder: min(embed_dim, 48). With the encoder's own width
#: (128 for ``echocare``) the decoder alone would have ~134 M parameters, too many to train with DP.
UNETR_DEFAULT_FEATURES = 48
NORM = "instance"  # MONAI InstanceNorm2d(affine=False, track_running_stats=False): Opacus-safe


class ClassifyHead(nn.Module):
    """Logits from pooled encoder features: ``Linear`` (``hidden=0``) or ``Linear-GELU-Dropout-Linear``.

    ``stages`` records which encoder maps were pooled (None = all five) so the task model feeds
    the head what it was trained on; ``in_dim`` must equal the pooled width.

    ``proj_dim > 0`` puts a fixed (non-trainable) whitening projection in front: buffers
    ``proj_mean`` (in_dim) and ``proj_matrix`` (in_dim x proj_dim), set by the coordinator from
    *public* reference images (see :mod:`server.coordinator.public_features`). Privacy meaning: it costs no
    privacy budget (no site data is used), and it makes DP-SGD work far better — the noise is
    spread over ``proj_dim`` well-conditioned inputs instead of thousands of raw, mean-dominated ones.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
        *,
        stages: Sequence[int] | None = None,
        proj_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classification head needs at least 2 classes, got {num_classes}")
        self.in_dim, self.num_classes, self.hidden, self.dropout = int(in_dim), int(num_classes), int(hidden), float(dropout)
        self.proj_dim = int(proj_dim)
        if self.proj_dim > 0:
            self.register_buffer("proj_mean", torch.zeros(self.in_dim))
            self.register_buffer("proj_matrix", torch.eye(self.in_dim, self.proj_dim))
        width = self.proj_dim if self.proj_dim > 0 else self.in_dim
        self.stages: tuple[int, ...] | None = tuple(int(s) for s in stages) if stages is not None else None
        self.needs: tuple[int, ...] = self.stages if self.stages is not None else tuple(range(5))
        self.needs_image = False
        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout > 0 else []
        if self.hidden > 0:
            layers += [nn.Linear(width, self.hidden), nn.GELU()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            layers.append(nn.Linear(self.hidden, self.num_classes))
        else:
            layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def set_projection(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        if self.proj_dim <= 0 or tuple(matrix.shape) != (self.in_dim, self.proj_dim) or tuple(mean.shape) != (self.in_dim,):
            raise ValueError(f"projection shapes {tuple(mean.shape)}, {tuple(matrix.shape)} do not fit a head with "
                             f"in_dim={self.in_dim}, proj_dim={self.proj_dim}")
        self.proj_mean.copy_(mean)
        self.proj_matrix.copy_(matrix)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, num_classes) logits."""
        if self.proj_dim > 0:
            pooled = (pooled - self.proj_mean) @ self.proj_matrix
        return self.net(pooled)


class _UnetrDecoder(nn.Module):
    """MONAI SwinUNETR's decoder, fed by a frozen encoder's five maps and the image.

    Identical to ``SwinUNETR`` when ``feature_size == embed_dim``; with another
    ``feature_size`` the encoder maps are first projected (the ``UnetrBasicBlock`` s have residual
    1x1 projections; the stride-16 skip gets its own projecting block).
    """

    def __init__(self, cfg: EncoderConfig, out_channels: int, feature_size: int) -> None:
        super().__init__()
        fs, ch = feature_size, cfg.feature_channels

        def basic(cin: int, cout: int) -> nn.Module:
            return UnetrBasicBlock(2, cin, cout, kernel_size=3, stride=1, norm_name=NORM, res_block=True)

        def up(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(2, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=NORM, res_block=True)

        self.encoder1 = basic(cfg.in_chans, fs)  # the image, stride 1
        self.encoder2 = basic(ch[0], fs)  # stride 2
        self.encoder3 = basic(ch[1], 2 * fs)  # stride 4
        self.encoder4 = basic(ch[2], 4 * fs)  # stride 8
        self.encoder5 = nn.Identity() if ch[3] == 8 * fs else basic(ch[3], 8 * fs)  # stride 16
        self.encoder10 = basic(ch[4], 16 * fs)  # stride 32
        self.decoder5 = up(16 * fs, 8 * fs)
        self.decoder4 = up(8 * fs, 4 * fs)
        self.decoder3 = up(4 * fs, 2 * fs)
        self.decoder2 = up(2 * fs, fs)
        self.decoder1 = up(fs, fs)
        self.out = UnetOutBlock(2, fs, out_channels)

    def forward(self, maps: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        h0, h1, h2, h3, h4 = maps
        enc0 = self.encoder1(image)
        enc1 = self.encoder2(h0)
        enc2 = self.encoder3(h1)
        enc3 = self.encoder4(h2)
        dec4 = self.encoder10(h4)
        dec3 = self.decoder5(dec4, self.encoder5(h3))
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))


class _LightDecoder(nn.Module):
    """FPN-style: 1x1 lateral convs on the stride 8/16/32 maps, top-down sum with nearest 2x
    upsampling, a MONAI residual block after each merge, a 1x1 output conv at stride 8, then
    bilinear upsampling to the input size."""

    def __init__(self, cfg: EncoderConfig, out_channels: int, feature_size: int, stages: Sequence[int]) -> None:
        super().__init__()
        ch = cfg.feature_channels
        self.lateral = nn.ModuleList([nn.Conv2d(ch[i], feature_size, kernel_size=1) for i in stages])
        self.smooth = nn.ModuleList(
            [UnetResBlock(2, feature_size, feature_size, kernel_size=3, stride=1, norm_name=NORM) for _ in stages[:-1]]
        )
        self.out = UnetOutBlock(2, feature_size, out_channels)

    def forward(self, maps: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral[-1](maps[-1])
        for i in range(len(maps) - 2, -1, -1):
            x = F.interpolate(x, size=maps[i].shape[-2:], mode="nearest") + self.lateral[i](maps[i])
            x = self.smooth[i](x)
        return F.interpolate(self.out(x), size=out_size, mode="bilinear", align_corners=False)


class SegmentHead(nn.Module):
    """Per-pixel logits (N, out_channels, H, W) at the input resolution.

    ``forward(maps, image)`` takes only the maps listed in ``needs`` (in that order) and the
    normalised input image when ``needs_image`` (``image`` may be None otherwise; then the output
    size is ``maps[0]``'s size times its stride).

    - ``variant="unetr"``: needs all five maps and the image; ``feature_size`` defaults to
      ``min(embed_dim, 48)`` (with ``feature_size == embed_dim`` it is exactly SwinUNETR's decoder;
      otherwise encoder maps are projected by the residual blocks' 1x1 convs).
    - ``variant="light"``: needs maps 2, 3, 4 (strides 8, 16, 32); ``feature_size`` defaults to 32.
    """

    def __init__(
        self,
        encoder_config: str | EncoderConfig,
        out_channels: int,
        variant: str = "light",
        feature_size: int | None = None,
    ) -> None:
        super().__init__()
        cfg = get_config(encoder_config)
        if variant not in SEGMENT_VARIANTS:
            raise ValueError(f"unknown segmentation head variant {variant!r}; choose one of {', '.join(SEGMENT_VARIANTS)}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        self.encoder_config, self.out_channels, self.variant = cfg.name, int(out_channels), variant
        if variant == "unetr":
            self.feature_size = int(feature_size or min(cfg.embed_dim, UNETR_DEFAULT_FEATURES))
            self.needs: tuple[int, ...] = (0, 1, 2, 3, 4)
            self.needs_image = True
            self.decoder: nn.Module = _UnetrDecoder(cfg, self.out_channels, self.feature_size)
        else:
            self.feature_size = int(feature_size or 32)
            self.needs = (2, 3, 4)
            self.needs_image = False
            self.decoder = _LightDecoder(cfg, self.out_channels, self.feature_size, self.needs)
        self._strides = tuple(cfg.feature_strides[i] for i in self.needs)

    def forward(self, maps: Sequence[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        if len(maps) != len(self.needs):
            raise ValueError(f"{self.variant} head expects {len(self.needs)} maps (encoder maps {self.needs}), got {len(maps)}")
        if self.variant == "unetr":
            if image is None:
                raise ValueError("the unetr head needs the input image (needs_image=True)")
            return self.decoder(maps, image)
        if image is not None:
            out_size = (int(image.shape[-2]), int(image.shape[-1]))
        else:
            out_size = (int(maps[0].shape[-2]) * self._strides[0], int(maps[0].shape[-1]) * self._strides[0])
        return self.decoder(maps, out_size)


def build_head(task: str, encoder_config: str | EncoderConfig, num_classes: int, **head_kwargs) -> nn.Module:
    """A fresh head for ``task`` on top of ``encoder_config``.

    - ``classify``: :class:`ClassifyHead` over the pooled features; kwargs ``hidden``,
      ``dropout``, ``proj_dim``, and which maps are pooled: ``pooling`` (``"all"``, the default,
      or ``"last"``: the stride-32 map only) or explicit ``stages`` (``in_dim`` is derived from
      the config and stages).
    - ``segment``: :class:`SegmentHead` with ``out_channels=num_classes`` (background included);
      kwargs ``variant`` (default ``"light"``), ``feature_size``.
    - ``hc``: a binary :class:`SegmentHead` with 2 output channels (background, head):
      ``num_classes`` must be 2. Same kwargs as ``segment``.

    ``num_classes`` is ``len(labels)`` of the task model in every case.
    """
    from echocare.models.encoder import pooled_dim

    cfg = get_config(encoder_config)
    if task == "classify":
        unknown = set(head_kwargs) - {"hidden", "dropout", "stages", "proj_dim", "pooling"}
        if unknown:
            raise ValueError(f"unknown classify head options {sorted(unknown)}; allowed: hidden, dropout, stages, proj_dim, pooling")
        stages = head_kwargs.get("stages")
        if "pooling" in head_kwargs:
            by_pooling = pooling_stages(str(head_kwargs["pooling"]))
            every = tuple(range(len(cfg.feature_channels)))
            if stages is not None and tuple(stages) != (every if by_pooling is None else by_pooling):
                raise ValueError(f"classify head: pooling={head_kwargs['pooling']!r} contradicts stages={list(stages)}; give one of them")
            stages = by_pooling
        return ClassifyHead(
            pooled_dim(cfg, stages),
            num_classes,
            hidden=int(head_kwargs.get("hidden", 0)),
            dropout=float(head_kwargs.get("dropout", 0.0)),
            stages=stages,
            proj_dim=int(head_kwargs.get("proj_dim", 0)),
        )
    if task in ("segment", "hc"):
        unknown = set(head_kwargs) - {"variant", "feature_size"}
        if unknown:
            raise ValueError(f"unknown {task} head options {sorted(unknown)}; allowed: variant, feature_size")
        if task == "hc" and num_classes != HC_OUT_CHANNELS:
            raise ValueError(f"an hc head is binary with {HC_OUT_CHANNELS} outputs (background, head); got num_classes={num_classes}")
        if task == "segment" and num_classes < 2:
            raise ValueError(f"a segment head needs num_classes >= 2 (background included), got {num_classes}")
        return SegmentHead(cfg, num_classes, variant=head_kwargs.get("variant", "light"), feature_size=head_kwargs.get("feature_size"))
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def head_kwargs_of(head: nn.Module) -> dict:
    """The JSON-able ``**head_kwargs`` that rebuild ``head`` with :func:`build_head`
    (``num_classes`` is not included: it is ``len(labels)``)."""
    if isinstance(head, ClassifyHead):
        kw = {"hidden": head.hidden, "dropout": head.dropout, "stages": list(head.stages) if head.stages is not None else None}
        if head.proj_dim > 0:
            kw["proj_dim"] = head.proj_dim
        return kw
    if isinstance(head, SegmentHead):
        return {"variant": head.variant, "feature_size": head.feature_size}
    raise TypeError(f"not an echocare head: {type(head).__name__}")


def num_outputs(head: nn.Module) -> int:
    """Classes (classify) or output channels (segment/hc) of a head."""
    if isinstance(head, ClassifyHead):
        return head.num_classes
    if isinstance(head, SegmentHead):
        return head.out_channels
    raise TypeError(f"not an echocare head: {type(head).__name__}")
