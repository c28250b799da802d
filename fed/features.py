"""Images -> frozen-encoder features, through the site's feature cache.

This runs wherever the images are (a hospital, or a researcher's simulated hospital). The same
functions serve training (fed/), calibration and acceptance evaluation at the sites (edge/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from echocare.data.base import SiteData, UnreadableImage
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
    differs is an error. Without a checkpoint: the seeded random initialisation, ``config-seedN``."""
    if not ref.checkpoint:
        return f"{ref.config}-seed{ref.seed}"
    from echocare.models.encoder import checkpoint_sha256

    sha = checkpoint_sha256(ref.checkpoint)
    if ref.sha256 and sha != ref.sha256.lower():
        raise RuntimeError(f"encoder checkpoint {ref.checkpoint} has sha256 {sha}, the federation expects {ref.sha256}")
    return f"{ref.config}-{sha[:16]}"


@lru_cache(maxsize=1)
def _encoder(ref: EncoderRef):
    """Load the frozen encoder once per process (a site process may serve many rounds)."""
    from echocare.models.encoder import load_encoder

    model, sha = load_encoder(ref.config, ref.checkpoint, seed=ref.seed)
    if ref.sha256 and sha and sha != ref.sha256:
        raise RuntimeError(f"encoder checkpoint {ref.checkpoint} has sha256 {sha}, the federation expects {ref.sha256}")
    return model


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


def _problem(e: UnreadableImage):
    from echocare.data.base import Problem

    return Problem(e.path, e.reason)


def pooled_features(data: SiteData, ref: EncoderRef, spec: PreprocessSpec, cache_root: Path,
                    batch_size: int = 16, progress=None) -> tuple[np.ndarray, list]:
    """Pooled multi-scale features (N, D) float32 for every readable sample, and those samples.

    Computed once per image and cached; later calls read the cache. ``progress(n)`` is called as
    images are processed.
    """
    import torch

    from echocare.models.encoder import encode, pooled_features as pool

    cache = FeatureCache(cache_root, f"{site_encoder_key(ref)}-{spec.digest()}-pooled")
    kept, keys = [], []

    def items():
        for s, img, _ in _load_all(data, with_mask=False):
            k = image_hash(img)
            kept.append(s)
            keys.append(k)
            yield k, img

    def compute(images):
        x = torch.from_numpy(np.stack([preprocess_image(im, spec)[0] for im in images]))
        with torch.inference_mode():
            return {"pooled": pool(encode(_encoder(ref), x)).float().numpy()}

    cache.ensure(items(), compute, batch_size=batch_size, on_batch=progress)
    if not keys:
        return np.zeros((0, 0), np.float32), []
    return cache.read(keys)["pooled"].astype(np.float32), kept


def map_features(data: SiteData, ref: EncoderRef, spec: PreprocessSpec, cache_root: Path, needs: tuple[int, ...],
                 needs_image: bool, batch_size: int = 8, progress=None) -> tuple[dict[str, np.ndarray], list]:
    """The encoder maps a segmentation decoder consumes (only those), plus the preprocessed mask.

    Returns ({"map{i}": (N, C_i, H_i, W_i), "mask": (N, S, S) uint8, "f32_scale": (N,),
    ["image": (N, 3, S, S)]}, samples).
    """
    import torch

    from echocare.models.encoder import encode

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
            maps = encode(_encoder(ref), x)
        out = {f"map{i}": maps[i].float().numpy() for i in needs}
        out["mask"] = np.stack(ms)
        out["f32_scale"] = np.asarray(scales, np.float32)  # output pixels per source pixel (mm conversion)
        if needs_image:
            out["image"] = x.numpy()
        return out

    cache.ensure(items(), compute, batch_size=batch_size, on_batch=progress)
    if not keys:
        return {}, []
    return cache.read(keys), kept


# -- the public whitening projection of classification heads ----------------------------------------
DEFAULT_REFERENCE = "phantom:300?profiles=linear-a,convex-b,linear-c&seed=9001"


def public_projection(ref: EncoderRef, spec: PreprocessSpec, dim: int, cache_dir: Path,
                      reference: str = DEFAULT_REFERENCE) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), matrix (D, dim)) whitening projection of the encoder's pooled features on PUBLIC
    reference images (echofleet's phantoms): their mean and top principal directions, whitened.

    The coordinator computes it to set a classification head's fixed buffers; a site recomputes it
    to verify the buffers of a head it is asked to evaluate (docs/privacy.md). No site data is
    involved, so it costs no privacy budget."""
    mean, matrix = _projection(ref, spec.to_json(), dim, str(cache_dir), reference)
    return mean.copy(), matrix.copy()


@lru_cache(maxsize=4)
def _projection(ref: EncoderRef, spec_json: str, dim: int, cache_dir: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
    from echocare.data import open_data

    spec = PreprocessSpec.from_json(spec_json)
    data = open_data(reference)
    x, _ = pooled_features(data, ref, spec, Path(cache_dir))
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
