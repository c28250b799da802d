"""The EchoCare encoder: MONAI's 2-D SwinTransformer (v2), named configs, strict checkpoint loading.

The released EchoCare encoder is ``monai.networks.nets.swin_unetr.SwinTransformer`` built with
``use_v2=True, spatial_dims=2, in_chans=3, embed_dim=128, depths=(2, 2, 18, 2),
num_heads=(4, 8, 16, 32), window_size=(8, 8), patch_size=(2, 2), mlp_ratio=4.0, qkv_bias=True``
(config ``"echocare"``, ~120.2 M parameters, ~202 GFLOP per 256x256 image). Nothing here
re-implements it: :func:`build_encoder` only calls MONAI with a named :class:`EncoderConfig`.

Input: what :func:`preprocess_spec` gives for the config -- gray replicated to 3 channels,
values in [0, 1], no mean/std (the upstream usage feeds ``torch.rand(1, 3, 256, 256)``).

``forward(x, normalize=True)`` returns five feature maps (strides 2, 4, 8, 16, 32); for the
official config at 256x256 they are 128@128², 256@64², 512@32², 1024@16² and 2048@8².

Checkpoints (``echocare_encoder.pth``) are plain state dicts with MONAI's key names plus a
``mask_token`` left over from masked-image pretraining. Only ``echocare`` has released weights;
``echocare-small`` and ``echocare-tiny`` are random-init configs (CPU demos, tests), and loading
the released file into them is refused with that explanation. The official layout (358 keys
and their shapes, from MONAI's construction of ``echocare``) is stored next to this module
(``official_layout.json``, :func:`official_layout`); a test compares MONAI's current
construction with it, so a MONAI release that renames or reshapes a key fails loudly. :func:`load_encoder` drops the
``mask_token``, strips an explicit wrapper/prefix only when *every* key carries it (and logs that
it did), and then loads **strictly**: a missing or unexpected key or a shape mismatch raises a
:class:`CheckpointError` naming the config and the first mismatches. There is never a silent
partial load.

Downsampling: MONAI's ``"merging"`` (the default) and ``"mergingv2"`` are the same operation in
2-D (``PatchMerging`` defers to ``PatchMergingV2`` for 4-D input) and have identical parameters,
so the choice does not affect checkpoints; we use the default.

torch and MONAI are imported inside the functions that need them, so the configs (and
``echofleet model list``) are available without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from echocare.preprocess import PreprocessSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: Number of feature maps the encoder returns (patch embedding + four Swin stages).
NUM_FEATURE_MAPS = 5

#: Keys that pretraining leaves in the encoder state dict and that the encoder does not use.
PRETRAINING_ONLY_KEYS = ("mask_token",)

#: Wrappers we unwrap (``{"state_dict": {...}}`` etc.), tried in this order.
WRAPPER_KEYS = ("state_dict", "model")

#: Key prefixes we strip, but only when every key of the checkpoint carries the same one.
STRIPPABLE_PREFIXES = ("module.", "encoder.", "swinViT.", "backbone.")

#: The only config with released weights (the EchoCare project's ``echocare_encoder.pth``).
RELEASED_CONFIG = "echocare"

#: The stored layout of the released encoder (key -> shape), written by :func:`write_official_layout`.
OFFICIAL_LAYOUT_FILE = Path(__file__).with_name("official_layout.json")

#: Pooling choices for a classification head: which of the five maps are pooled (None = all).
#: ``"last"`` pools only the stride-32 map, as the FETUS 2026 challenge baseline does.
POOLING: dict[str, tuple[int, ...] | None] = {"all": None, "last": (NUM_FEATURE_MAPS - 1,)}


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not match the encoder config it is loaded into."""


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of one SwinTransformer-v2 encoder (all passed to MONAI as they are).

    ``img_size`` is the input side the model is meant for (inputs must be divisible by
    ``patch_size * 2**4`` = 32).
    """

    name: str
    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: tuple[int, int] = (8, 8)
    patch_size: tuple[int, int] = (2, 2)
    mlp_ratio: float = 4.0
    in_chans: int = 3
    img_size: int = 256

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the five maps: ``embed_dim * (1, 2, 4, 8, 16)``."""
        return tuple(self.embed_dim * 2**i for i in range(NUM_FEATURE_MAPS))

    @property
    def feature_strides(self) -> tuple[int, ...]:
        """Stride of each map w.r.t. the input: ``patch * (1, 2, 4, 8, 16)`` = (2, 4, 8, 16, 32)."""
        return tuple(self.patch_size[0] * 2**i for i in range(NUM_FEATURE_MAPS))

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the coarsest stride)."""
        return self.feature_strides[-1]

    def feature_shapes(self, img_size: int | None = None) -> list[tuple[int, int, int]]:
        """(C, H, W) of the five maps for a square input of side ``img_size`` (default: the config's)."""
        s = img_size or self.img_size
        return [(c, s // st, s // st) for c, st in zip(self.feature_channels, self.feature_strides)]

    def to_dict(self) -> dict:
        return asdict(self)

    def preprocess_spec(self) -> PreprocessSpec:
        """The input this encoder family was pretrained on (see :func:`preprocess_spec`)."""
        return PreprocessSpec(size=self.img_size)


ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    # The released model (Swin-B-like width, 18 blocks in stage 3).
    "echocare": EncoderConfig("echocare", 128, (2, 2, 18, 2), (4, 8, 16, 32)),
    # Same family, Swin-T-like: a third of the parameters, a third of the FLOPs.
    "echocare-small": EncoderConfig("echocare-small", 96, (2, 2, 6, 2), (3, 6, 12, 24)),
    # For tests and the CPU demo: one block per stage, 24 channels (~1.9 M params, ~2.6 GFLOP).
    "echocare-tiny": EncoderConfig("echocare-tiny", 24, (1, 1, 1, 1), (1, 2, 4, 8)),
}


def get_config(name: str | EncoderConfig) -> EncoderConfig:
    """The named config (an :class:`EncoderConfig` is returned as it is)."""
    if isinstance(name, EncoderConfig):
        return name
    try:
        return ENCODER_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown encoder config {name!r}; known configs: {', '.join(ENCODER_CONFIGS)}") from None


def preprocess_spec(config: str | EncoderConfig) -> PreprocessSpec:
    """The preprocessing every ``echocare*`` config uses: EchoCare's own input (gray replicated
    to 3 channels, values in [0, 1], ``mean=0``, ``std=1``, letterboxed to ``img_size``)."""
    return get_config(config).preprocess_spec()


# --------------------------------------------------------------------------------------------
# Building


def build_encoder(config: str | EncoderConfig, seed: int | None = 0) -> "nn.Module":
    """A MONAI SwinTransformer for ``config`` in train mode, randomly initialised.

    With an int ``seed`` the initialisation is deterministic (the global RNG is forked, so the
    caller's random state is left untouched); ``seed=None`` draws from the global RNG.
    """
    import torch
    from monai.networks.nets.swin_unetr import SwinTransformer

    cfg = get_config(config)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        return SwinTransformer(
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            window_size=cfg.window_size,
            patch_size=cfg.patch_size,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            spatial_dims=2,
            downsample="merging",
            use_v2=True,
        )


def layout_of(model_or_config: "nn.Module | str | EncoderConfig") -> dict[str, tuple[int, ...]]:
    """Key -> shape of an encoder's state dict (a config is built first: ~0.5 GB for ``echocare``)."""
    model = model_or_config if not isinstance(model_or_config, (str, EncoderConfig)) else build_encoder(model_or_config)
    return {k: tuple(int(d) for d in v.shape) for k, v in model.state_dict().items()}


@lru_cache(maxsize=1)
def official_layout() -> dict[str, tuple[int, ...]]:
    """The released encoder's layout as stored in ``official_layout.json`` (358 keys, in order)."""
    doc = json.loads(OFFICIAL_LAYOUT_FILE.read_text())
    return {k: tuple(shape) for k, shape in doc["keys"]}


def write_official_layout(path: str | Path = OFFICIAL_LAYOUT_FILE) -> dict:
    """(Re)write the stored layout from MONAI's current construction of ``echocare``.

    Only for a deliberate update after checking that the released file still loads; the test
    suite compares the construction with the stored file and fails on any difference.
    """
    import monai

    from echocare.atomic import atomic_write_bytes

    layout = layout_of(RELEASED_CONFIG)
    doc = {
        "config": RELEASED_CONFIG,
        "built_with": f"monai {monai.__version__}: monai.networks.nets.swin_unetr.SwinTransformer(use_v2=True, spatial_dims=2, ...)",
        "pretraining_only_keys": list(PRETRAINING_ONLY_KEYS),
        "num_keys": len(layout),
        "num_values": sum(_numel(s) for s in layout.values()),
        "keys": [[k, list(s)] for k, s in layout.items()],
    }
    text = "{\n" + ",\n".join(
        f" {json.dumps(k)}: " + (json.dumps(v) if k != "keys" else "[\n" + ",\n".join("  " + json.dumps(e) for e in v) + "\n ]")
        for k, v in doc.items()
    ) + "\n}\n"
    atomic_write_bytes(Path(path), text.encode())
    return doc


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def is_released_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` (normalised: no wrapper, prefix or ``mask_token``) has exactly the
    released encoder's key names (its shapes are checked by the strict load)."""
    return set(state_dict) == set(official_layout())


def freeze(module: "nn.Module") -> "nn.Module":
    """Eval mode and ``requires_grad=False`` on every parameter; returns the module."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --------------------------------------------------------------------------------------------
# Checkpoints


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are ~0.5 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """The sha256 of a checkpoint (local path or ``hf://`` in the local cache), computed once per
    process and file version (path, size, mtime), for the run to pin at its first load.

    The coordinator records it in the run config (``encoder-sha256``); every site passes it to
    :func:`load_encoder` as ``expected_sha256`` and so proves it loaded the same file.
    Raises :class:`CheckpointError` for a missing file or an uncached ``hf://`` name.
    """
    path = resolve_checkpoint(checkpoint)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
        log.info("checkpoint %s: sha256 %s (pin this in the run)", path, _SHA_MEMO[key])
    return _SHA_MEMO[key]


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local path for ``checkpoint``; ``hf://org/repo/file`` is looked up in the local
    Hugging Face cache only (never downloaded). Raises :class:`CheckpointError`."""
    text = str(checkpoint)
    if text.startswith("hf://"):
        parts = text[len("hf://") :].split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise CheckpointError(f"{text}: expected hf://ORG/REPO/FILE")
        repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            raise CheckpointError(
                f"{text}: huggingface_hub is not installed, so the Hugging Face cache cannot be read; "
                f"download the file (e.g. `huggingface-cli download {repo_id} {filename}`) and pass its local path"
            ) from None
        found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
        if not isinstance(found, str):
            raise CheckpointError(
                f"{text}: not in the local Hugging Face cache (this tool never downloads); "
                f"run `huggingface-cli download {repo_id} {filename}` first or pass a local path"
            )
        return Path(found)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def read_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """The raw tensors of a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file.

    torch files are read with ``weights_only=True`` (no arbitrary code). Wrappers are not
    removed here (see :func:`normalize_state_dict`). A truncated or corrupt file raises
    :class:`CheckpointError` naming it.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a damaged file
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated, corrupt, or not a weights-only state dict): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj  # type: ignore[return-value]


def normalize_state_dict(obj: Mapping[str, Any], source: str = "<state dict>") -> dict[str, "torch.Tensor"]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}``, drop ``mask_token``, strip a prefix
    shared by all keys (``module.``, ``encoder.``, ``swinViT.``, ``backbone.``). Every change is logged.
    """
    import torch

    sd: Mapping[str, Any] = obj
    while not all(isinstance(v, torch.Tensor) for v in sd.values()):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if wrapper is None:
            bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:5]
            raise CheckpointError(
                f"{source}: not a state dict: entries {bad} are not tensors "
                f"(and there is no {' / '.join(repr(k) for k in WRAPPER_KEYS)} wrapper)"
            )
        log.warning("%s: using the tensors under the %r key of the checkpoint", source, wrapper)
        sd = sd[wrapper]
    out = dict(sd)
    changed = True
    while changed:
        changed = False
        keys = [k for k in out if k not in PRETRAINING_ONLY_KEYS]
        for prefix in STRIPPABLE_PREFIXES:
            if keys and all(k.startswith(prefix) for k in keys):
                log.warning("%s: stripped the prefix %r shared by all %d keys", source, prefix, len(keys))
                out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
                changed = True
                break
    for k in PRETRAINING_ONLY_KEYS:
        if k in out:
            log.info("%s: dropped %r (used only by pretraining)", source, k)
            del out[k]
    return out


def _shape(t: Any) -> str:
    return "[" + ",".join(str(int(s)) for s in t.shape) + "]"


def guess_config(state_dict: Mapping[str, "torch.Tensor"]) -> str | None:
    """The known config whose embed width and block counts match ``state_dict``, if any.

    Only used to make mismatch errors helpful ("... looks like config 'echocare'").
    """
    w = state_dict.get("patch_embed.proj.weight")
    if w is None or getattr(w, "ndim", 0) != 4:
        return None
    depths = []
    for stage in range(1, 5):
        blocks = {k.split(".")[3] for k in state_dict if k.startswith(f"layers{stage}.0.blocks.")}
        depths.append(len(blocks))
    for name, cfg in ENCODER_CONFIGS.items():
        if cfg.embed_dim == int(w.shape[0]) and tuple(depths) == cfg.depths and cfg.in_chans == int(w.shape[1]):
            return name
    return None


def check_state_dict(config: str | EncoderConfig, model: "nn.Module", state_dict: Mapping[str, "torch.Tensor"], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``model``'s keys and shapes."""
    cfg = get_config(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {_shape(state_dict[k])} vs {_shape(v)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return

    def first(items: list[str], n: int = 3) -> str:
        return ", ".join(items[:n]) + (", ..." if len(items) > n else "")

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({first(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} ({first(unexpected)})")
    if mismatched:
        problems.append(f"shape mismatch {first(mismatched, 2)}" + (f" ({len(mismatched)} in all)" if len(mismatched) > 2 else ""))
    if cfg.name != RELEASED_CONFIG and is_released_layout(state_dict):
        raise CheckpointError(
            f"checkpoint {source} is the released EchoCare encoder (config {RELEASED_CONFIG!r}, {len(state_dict)} keys); "
            f"config {cfg.name} has no released weights (only {RELEASED_CONFIG!r} does; echocare-small and echocare-tiny "
            f"are random-init configs for CPU demos and tests): use --config {RELEASED_CONFIG}, or no checkpoint"
        )
    msg = f"checkpoint {source} does not match config {cfg.name}: " + "; ".join(problems)
    guess = guess_config(state_dict)
    if guess and guess != cfg.name:
        msg += f" (it looks like config {guess!r})"
    raise CheckpointError(msg)


def load_state_dict_strict(encoder: "nn.Module", config: str | EncoderConfig, state_dict: Mapping[str, Any], source: str = "<state dict>") -> None:
    """Normalise (see :func:`normalize_state_dict`), check every key and shape, load strictly."""
    sd = normalize_state_dict(state_dict, source)
    check_state_dict(config, encoder, sd, source)
    encoder.load_state_dict(sd, strict=True)


def load_encoder(
    config: str | EncoderConfig,
    checkpoint: str | Path | None = None,
    seed: int | None = 0,
    expected_sha256: str | None = None,
) -> tuple["nn.Module", str | None]:
    """The encoder in eval mode with frozen parameters, and the checkpoint's sha256.

    Without a checkpoint the weights are the seeded random init of :func:`build_encoder`
    and the sha256 is ``None``. With one (local path, ``.safetensors`` or torch file, or
    ``hf://org/repo/file`` already in the local HF cache) it is loaded strictly; any problem
    raises :class:`CheckpointError`.
    """
    cfg = get_config(config)
    if checkpoint is None:
        return freeze(build_encoder(cfg, seed=seed)), None
    path = resolve_checkpoint(checkpoint)
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(f"{path}: sha256 {digest} differs from the expected {expected_sha256} (a different or modified file)")
    raw = read_state_dict(path)
    encoder = build_encoder(cfg, seed=seed)
    load_state_dict_strict(encoder, cfg, raw, source=str(path))
    log.info("loaded %s into config %s (sha256 %s)", path, cfg.name, digest[:12])
    return freeze(encoder), digest


# --------------------------------------------------------------------------------------------
# Using the encoder


def check_input(x: "torch.Tensor", config: str | EncoderConfig | None = None) -> None:
    """Raise ``ValueError`` unless ``x`` is (N, 3, H, W) with H and W multiples of 32."""
    multiple = get_config(config).input_multiple if config is not None else 32
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"encoder input must be (N, 3, H, W), got {tuple(x.shape)}")
    h, w = int(x.shape[2]), int(x.shape[3])
    if h % multiple or w % multiple:
        raise ValueError(f"encoder input height and width must be multiples of {multiple}, got {h}x{w}")


def encode(encoder: "nn.Module", x: "torch.Tensor") -> list["torch.Tensor"]:
    """The five feature maps, each layer-normalised by MONAI (``forward(x, normalize=True)``).

    Which maps a head uses is the head's choice: EchoCare publishes no fine-tuning code, so there
    is no official protocol to follow. Our classification head pools all five by default;
    ``pooling="last"`` (:data:`POOLING`) pools only the stride-32 map, as the FETUS 2026
    challenge baseline on the released weights does. Segmentation heads take the maps they list.

    Gradients are recorded only if the caller enables them (wrap in ``torch.no_grad()`` for
    feature extraction).
    """
    import torch

    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        check_input(x)
    return list(encoder(x, normalize=True))


def pooled_features(maps: Sequence["torch.Tensor"], stages: Sequence[int] | None = None) -> "torch.Tensor":
    """Global average pool of each map (all five, or the ``stages`` indices), concatenated: (N, D).

    With all stages, ``D = sum(config.feature_channels)`` (3968 for ``echocare``).
    """
    import torch

    chosen = list(maps) if stages is None else [maps[i] for i in stages]
    return torch.cat([m.mean(dim=(-2, -1)) for m in chosen], dim=1)


def pooled_dim(config: str | EncoderConfig, stages: Sequence[int] | None = None) -> int:
    """Width of :func:`pooled_features` for ``config``."""
    ch = get_config(config).feature_channels
    return sum(ch) if stages is None else sum(ch[i] for i in stages)


def pooled_columns(config: str | EncoderConfig, stages: Sequence[int] | None = None) -> list[int]:
    """Columns of the all-five pooled vector (:func:`pooled_features` with ``stages=None``) that
    hold ``stages``' pooled maps, in ``stages`` order: ``all_five[:, pooled_columns(cfg, s)]``
    equals ``pooled_features(maps, s)``. A feature cache of all five serves every pooling."""
    ch = get_config(config).feature_channels
    if stages is None:
        return list(range(sum(ch)))
    starts = [sum(ch[:i]) for i in range(len(ch))]
    cols: list[int] = []
    for i in stages:
        if not 0 <= int(i) < len(ch):
            raise ValueError(f"stage {i} out of range: the encoder has maps 0..{len(ch) - 1}")
        cols.extend(range(starts[i], starts[i] + ch[i]))
    return cols


def pooling_stages(pooling: str) -> tuple[int, ...] | None:
    """``"all"`` -> None (every map), ``"last"`` -> (4,). Raises ValueError naming the choices."""
    try:
        return POOLING[pooling]
    except KeyError:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING)}") from None


def count_params(module: "nn.Module", trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def measure_forward(
    encoder: "nn.Module", config: str | EncoderConfig, img_size: int | None = None
) -> tuple[float, list[tuple[int, ...]]]:
    """One forward on a zero image (batch 1) under ``torch.utils.flop_counter.FlopCounterMode``.

    Returns (GFLOP per image, the five output shapes). FLOPs follow PyTorch's counter: one
    multiply-accumulate = 2 FLOP; matmuls and convolutions are counted, element-wise ops
    (norms, activations, softmax) are not.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_config(config)
    s = img_size or cfg.img_size
    x = torch.zeros(1, cfg.in_chans, s, s)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        maps = encode(encoder, x)
    return counter.get_total_flops() / 1e9, [tuple(int(d) for d in m.shape) for m in maps]


def gflops_per_image(config: str | EncoderConfig, encoder: "nn.Module | None" = None, img_size: int | None = None) -> float:
    """Forward GFLOP for one ``img_size`` image (1 MAC = 2 FLOP; see :func:`measure_forward`).

    Builds the encoder (seeded random weights: FLOPs do not depend on them) unless one is given.
    """
    enc = encoder if encoder is not None else freeze(build_encoder(config, seed=0))
    return measure_forward(enc, config, img_size)[0]
