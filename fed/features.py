"""Images -> frozen-encoder features, through the site's feature cache.

This runs wherever the images are (a hospital, or a researcher's simulated hospital). The same
functions serve training (fed/), calibration and acceptance evaluation at the sites (edge/).

The encoder runs on the site's compute device (policy ``device``: ``auto``, ``cpu``, ``cuda``,
``cuda:N``; :func:`site_device`), batched to the GPU's free memory. On a GPU the features are
extracted under bf16 (or fp16) autocast only when a probe batch of the site's own images agrees
with fp32 to :data:`echocare.device.AUTOCAST_MIN_COSINE` (cosine, every image); otherwise in fp32.
The precision is part of the cache key: fp32 and bf16 features are different caches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from echocare.atomic import atomic_write_bytes
from echocare.data.base import SiteData, UnreadableImage
from echocare.device import (AUTOCAST_MIN_COSINE, ComputeDevice, autocast_agrees, fit_batch_size, resolve_device,
                             run_frozen)
from echocare.models.encoder import CheckpointError
from echocare.preprocess import PreprocessSpec, apply_geometry_to_mask, preprocess_image
from fed.cache import FeatureCache, image_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderRef:
    """Which frozen encoder produced the features (part of every cache key and checkpoint)."""

    config: str
    checkpoint: str | None = None
    sha256: str | None = None
    seed: int = 0



def site_encoder_key(ref: EncoderRef) -> str:
    """The feature-cache key of ``ref`` **as this machine sees it**: with a checkpoint, the sha256
    the site computes of its own file (never the coordinator's word, never a ``config-seedN``
    fallback that would read features of another encoder); a coordinator-announced sha256 that
    differs raises :class:`EncoderMismatch`. Without a checkpoint: the seeded random
    initialisation, ``config-seedN``."""
    if not ref.checkpoint:
        return f"{ref.config}-seed{ref.seed}"
    from echocare.models.encoder import checkpoint_sha256

    try:
        sha = checkpoint_sha256(ref.checkpoint)
    except Exception as e:  # missing or unreadable: the same refusal as a mismatch (EncoderMismatch)
        raise EncoderMismatch(ref.checkpoint, f"unreadable ({e})", ref.sha256 or "") from e
    if ref.sha256 and sha != ref.sha256.lower():
        raise EncoderMismatch(ref.checkpoint, sha, ref.sha256)
    return f"{ref.config}-{sha[:16]}"


class EncoderMismatch(CheckpointError, RuntimeError):
    """The checkpoint the run names is not one this site can use: no file there, not readable, its
    sha256 is not the pinned one, or it does not load as the encoder.

    Privacy meaning: a site opens only its own checkpoint (policy ``encoder_checkpoint``,
    ``fed.task.site_encoder``), never a path the run names; before that field, the path was the
    coordinator's choice and could name **any** file on the site's machine (an image of its
    dataset, its ledger). Every failure (including "this site has no checkpoint") is the same
    refusal, ``public_reason``, which names only the coordinator's own pinned hash: never the site's
    hash of the file (that told the sha256 of any file the coordinator named: an exact, uncharged
    test of whether a known image is in the site's data) and never which of the failures it was
    (missing vs mismatch vs matching-but-not-a-checkpoint was the same test, one bit at a time).
    The site's hash and the cause are in the exception's text, for the site's own log."""

    def __init__(self, checkpoint: str, site_sha256: str, expected_sha256: str):
        super().__init__(f"encoder checkpoint {checkpoint} refused: {site_sha256}; "
                         f"the federation expects {expected_sha256 or '(no pinned sha256)'}")
        self.public_reason = ("encoder checkpoint refused: this site has no usable encoder checkpoint with the "
                              f"pinned sha256 {expected_sha256 or '(none pinned)'} "
                              "(details in the site's own log)")


@lru_cache(maxsize=8)
def site_device(request: str = "auto", precision: str = "auto") -> ComputeDevice:
    """The site's compute device for its policy's ``device``, resolved once per process (so the
    choice, and an ``auto`` fallback to the CPU, is logged once). Raises
    :class:`echocare.device.DeviceError` when an explicit ``cuda``/``cuda:N`` cannot be used."""
    device = resolve_device(request, precision)
    (log.warning if device.fell_back else log.info)("%s", device.message)
    return device


#: Images handed to a GPU at once (then run in batches that fit its free memory).
GPU_CHUNK = 512
#: The default device of every function here: the CPU, fp32.
CPU = ComputeDevice("cpu", "cpu", "cpu", None, "device cpu (fp32)")


@lru_cache(maxsize=2)
def _encoder(ref: EncoderRef, torch_device: str = "cpu"):
    """Load the frozen encoder once per process and device (a site process may serve many rounds).

    With a checkpoint, ``load_encoder`` checks the file's sha256 against the pinned ``ref.sha256``,
    so every site proves it loaded the same file (a mismatch raises, naming both hashes)."""
    from echocare.models.encoder import load_encoder

    try:
        model, _sha = load_encoder(ref.config, ref.checkpoint, seed=ref.seed,
                                   expected_sha256=ref.sha256 if ref.checkpoint else None)
    except Exception as e:  # a named file that does not load: the one refusal (EncoderMismatch), not a site error
        if not ref.checkpoint or isinstance(e, EncoderMismatch):
            raise
        raise EncoderMismatch(ref.checkpoint, str(e), ref.sha256 or "") from e
    return model.to(torch_device)


def _encode_pooled(module, xb):
    from echocare.models.encoder import encode, pooled_features as pool

    return pool(encode(module, xb))


def precision_tag(device: ComputeDevice) -> str:
    """The feature dtype's part of a cache key: ``""`` in fp32 (the key caches always had),
    ``"-bfloat16"`` / ``"-float16"`` under autocast."""
    return f"-{device.autocast}" if device.autocast else ""


def feature_precision(device: ComputeDevice, ref: EncoderRef, spec: PreprocessSpec, images: list[np.ndarray],
                      cache_root: Path, min_cosine: float = AUTOCAST_MIN_COSINE) -> tuple[ComputeDevice, dict]:
    """The device to extract cached features with, and the evidence.

    ``device`` itself when it runs in fp32, or when its autocast features of ``images`` (a probe
    batch of the site's own images) agree with fp32 to ``min_cosine`` on every image; else the same
    device in fp32. The decision and the measured cosines are recorded in
    ``<cache_root>/precision-<encoder>-<spec>-<device>-<dtype>.json`` and read back on later calls,
    so the probe runs once per encoder, preprocessing, device and dtype."""
    if device.autocast is None or not images:
        return device, {}
    name = f"precision-{site_encoder_key(ref)}-{spec.digest()}-{device.device_class.replace(':', '_')}-{device.autocast}.json"
    record = Path(cache_root) / name
    if record.exists():
        result = json.loads(record.read_text())
    else:
        x = np.stack([preprocess_image(im, spec)[0] for im in images])
        module = _encoder(ref, device.torch_device)
        fp32 = run_frozen(module, x, replace(device, autocast=None), len(x), _encode_pooled)
        reduced = run_frozen(module, x, device, len(x), _encode_pooled)
        ok, cmin, cmean = autocast_agrees(fp32, reduced, min_cosine)
        result = {"device_class": device.device_class, "autocast": device.autocast, "probe_images": len(x),
                  "min_cosine": cmin, "mean_cosine": cmean, "required_min_cosine": min_cosine, "use_autocast": ok}
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record, json.dumps(result, indent=1).encode())
        if ok:
            log.info("features in %s autocast on %s: cosine to fp32 min %.5f, mean %.5f over %d probe images (>= %g)",
                     device.autocast, device.device_class, cmin, cmean, len(x), min_cosine)
        else:
            log.warning("%s autocast features differ from fp32 on %s (min cosine %.5f < %g over %d probe images): "
                        "extracting in fp32", device.autocast, device.device_class, cmin, min_cosine, len(x))
    return (device if result["use_autocast"] else replace(device, autocast=None)), result


def _load_all(data: SiteData, with_mask: bool):
    """Yield (sample, image, mask) for readable samples; record problems for the rest."""
    for s in data.samples:
        try:
            img = s.image()
            mask = s.mask() if with_mask else None
        except UnreadableImage as e:
            data.problems.append(_problem(e))
            log.warning("skipping unreadable image %s", e)
            continue
        yield s, img, mask


def _probe_images(data: SiteData, n: int) -> list[np.ndarray]:
    """The first ``n`` readable images (unreadable ones are skipped here and recorded by :func:`_load_all`)."""
    out: list[np.ndarray] = []
    for s in data.samples:
        if len(out) >= n:
            break
        try:
            out.append(s.image())
        except UnreadableImage:
            continue
    return out


def _problem(e: UnreadableImage):
    from echocare.data.base import Problem

    return Problem(e.path, e.reason)


def pooled_features(data: SiteData, ref: EncoderRef, spec: PreprocessSpec, cache_root: Path,
                    batch_size: int = 16, progress=None, device: ComputeDevice | None = None,
                    probe_images: int = 8, min_cosine: float = AUTOCAST_MIN_COSINE) -> tuple[np.ndarray, list]:
    """Pooled multi-scale features (N, D) float32 for every readable sample, and those samples.

    Computed once per image and cached; later calls read the cache. ``progress(n)`` is called as
    images are processed. ``device`` (default: the CPU in fp32) runs the encoder; on a GPU the
    batch size is fitted to its free memory, and autocast is used only where
    :func:`feature_precision` found it faithful (cosine to fp32 >= ``min_cosine`` on every one of
    ``probe_images`` of these images).
    """
    device = device or CPU
    if device.autocast is not None:
        device, _ = feature_precision(device, ref, spec, _probe_images(data, probe_images), cache_root, min_cosine)
    cache = FeatureCache(cache_root, f"{site_encoder_key(ref)}-{spec.digest()}-pooled{precision_tag(device)}")
    kept, keys = [], []

    def items():
        for s, img, _ in _load_all(data, with_mask=False):
            k = image_hash(img)
            kept.append(s)
            keys.append(k)
            yield k, img

    # The encoder is loaded only when an image is not cached yet. On a GPU the images come in chunks of
    # 512 and run in batches fitted to its free memory (measured once, on a probe of 4 blank images).
    fitted: list[int] = []

    def compute(images):
        x = np.stack([preprocess_image(im, spec)[0] for im in images])
        module = _encoder(ref, device.torch_device)
        if not fitted:
            blank = np.zeros((1, *x.shape[1:]), np.float32)
            fitted.append(fit_batch_size(device, lambda n: run_frozen(module, np.repeat(blank, n, 0), device, n, _encode_pooled),
                                         probe=4, max_batch=GPU_CHUNK, cpu_batch=len(x)))
        return {"pooled": run_frozen(module, x, device, fitted[0], _encode_pooled)}

    if device.is_cuda:
        batch_size = GPU_CHUNK
    cache.ensure(items(), compute, batch_size=batch_size, on_batch=progress)
    if not keys:
        return np.zeros((0, 0), np.float32), []
    return cache.read(keys)["pooled"].astype(np.float32), kept


def map_features(data: SiteData, ref: EncoderRef, spec: PreprocessSpec, cache_root: Path, needs: tuple[int, ...],
                 needs_image: bool, batch_size: int = 8, progress=None,
                 device: ComputeDevice | None = None) -> tuple[dict[str, np.ndarray], list]:
    """The encoder maps a segmentation decoder consumes (only those), plus the preprocessed mask.

    The encoder runs on ``device`` (default: the CPU) in fp32: no autocast for maps (their
    agreement with fp32 is not checked per map yet).

    Returns ({"map{i}": (N, C_i, H_i, W_i), "mask": (N, S, S) uint8, "f32_scale": (N,),
    ["image": (N, 3, S, S)]}, samples).
    """
    import torch

    from echocare.models.encoder import encode

    dev = device or CPU
    kind = "maps" + "-".join(map(str, needs)) + ("-img" if needs_image else "")
    cache = FeatureCache(cache_root, f"{site_encoder_key(ref)}-{spec.digest()}-{kind}", shard_rows=64)
    kept, keys = [], []

    def items():
        for s, img, mask in _load_all(data, with_mask=True):
            k = image_hash(img) + ("" if mask is None else image_hash(mask)[:16])
            kept.append(s)
            keys.append(k)
            yield k, (img, mask)

    def compute(pairs):
        xs, ms, scales = [], [], []
        for img, mask in pairs:
            x, g = preprocess_image(img, spec)
            xs.append(x)
            scales.append(g.scale)
            ms.append(np.zeros((spec.size, spec.size), np.uint8) if mask is None else apply_geometry_to_mask(mask, g))
        x = torch.from_numpy(np.stack(xs))
        with torch.inference_mode():
            maps = encode(_encoder(ref, dev.torch_device), x.to(dev.torch_device))
        out = {f"map{i}": maps[i].float().cpu().numpy() for i in needs}
        out["mask"] = np.stack(ms)
        out["f32_scale"] = np.asarray(scales, np.float32)  # output pixels per source pixel (mm conversion)
        if needs_image:
            out["image"] = x.numpy()
        return out

    cache.ensure(items(), compute, batch_size=batch_size, on_batch=progress)
    if not keys:
        return {}, []
    return cache.read(keys), kept


def select_pooled(x: np.ndarray, config: str, stages: tuple[int, ...] | None) -> np.ndarray:
    """The columns of cached all-five pooled features ``x`` that a head pooling ``stages`` reads
    (None: all of them). One cache serves every pooling."""
    if stages is None or x.size == 0:
        return x
    from echocare.models.encoder import pooled_columns

    return x[:, pooled_columns(config, stages)]


# -- the public whitening projection of classification heads ----------------------------------------
DEFAULT_REFERENCE = "phantom:300?profiles=linear-a,convex-b,linear-c&seed=9001"


def public_projection(ref: EncoderRef, spec: PreprocessSpec, dim: int, cache_dir: Path,
                      reference: str = DEFAULT_REFERENCE,
                      stages: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), matrix (D, dim)) whitening projection of the encoder's pooled features on PUBLIC
    reference images (echofleet's phantoms): their mean and top principal directions, whitened.
    ``stages``: the maps the head pools (its ``stages``; None = all five, e.g. ``(4,)`` for
    ``pooling="last"``): D is their pooled width. Always computed in fp32 (on the CPU), so the
    coordinator's and every site's recomputation agree whatever device a site trains on.

    The coordinator computes it to set a classification head's fixed buffers; a site recomputes it
    to verify the buffers of a head it is asked to evaluate (docs/privacy.md). No site data is
    involved, so it costs no privacy budget."""
    mean, matrix = _projection(ref, spec.to_json(), dim, str(cache_dir), reference,
                               None if stages is None else tuple(int(i) for i in stages))
    return mean.copy(), matrix.copy()


@lru_cache(maxsize=4)
def _projection(ref: EncoderRef, spec_json: str, dim: int, cache_dir: str, reference: str,
                stages: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    from echocare.data import open_data

    spec = PreprocessSpec.from_json(spec_json)
    data = open_data(reference)
    x, _ = pooled_features(data, ref, spec, Path(cache_dir))
    x = select_pooled(x, ref.config, stages)
    if len(x) < dim + 1:
        raise ValueError(f"public reference {reference} has {len(x)} images: too few for a {dim}-dim projection")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    scale = np.sqrt(len(x) - 1) / np.maximum(s[:dim], 1e-6)
    matrix = (vt[:dim].T * scale).astype(np.float32)  # projected features have unit variance on the reference
    log.info("public projection: %d -> %d dims from %d reference images (%s)", x.shape[1], dim, len(x), reference)
    return mean.astype(np.float32), matrix


def projection_mismatch(mean: np.ndarray, matrix: np.ndarray, own_mean: np.ndarray, own_matrix: np.ndarray,
                        rtol: float = 1e-2) -> str | None:
    """Why received projection buffers differ from the site's own recomputation, or None.

    Columns may differ in sign (an SVD's sign is arbitrary; a flipped column is the same head with
    flipped weights); beyond that, 1% relative tolerance (float differences across machines)."""
    if mean.shape != own_mean.shape or matrix.shape != own_matrix.shape:
        return f"projection shapes {mean.shape}, {matrix.shape} differ from the public ones {own_mean.shape}, {own_matrix.shape}"
    mean, matrix = mean.astype(np.float64), matrix.astype(np.float64)
    if np.linalg.norm(mean - own_mean) > rtol * (np.linalg.norm(own_mean) + 1e-6):
        return "proj_mean differs from the public projection this site computed"
    signs = np.where((matrix * own_matrix).sum(0) < 0, -1.0, 1.0)
    if np.linalg.norm(matrix * signs - own_matrix) > rtol * (np.linalg.norm(own_matrix) + 1e-6):
        return "proj_matrix differs from the public projection this site computed"
    return None
