"""The one preprocessing implementation (numpy + Pillow, no torch).

Training, the feature cache, calibration, evaluation and the torch-free edge runtime all call
:func:`preprocess_image` with a :class:`PreprocessSpec`; the spec travels inside every checkpoint
and every edge bundle as JSON, so a scanner reproduces exactly what the hospitals trained on.

Steps, in order:

1. grayscale (ITU-R 601 luma, as Pillow's ``"L"``), whatever the input (gray, RGB, RGBA, 16-bit);
2. crop to the ultrasound image region: the largest bright connected region of a downsampled,
   morphologically closed foreground mask, its box then refined to the pixel at full resolution.
   Black borders, text and caliper bands outside the imaging sector are dropped;
3. resize to ``size x size``: ``resize="letterbox"`` (the default) keeps the aspect ratio, the
   long side becomes ``size`` and the short side is padded with black; ``resize="stretch"``
   scales each axis on its own, as the FETUS 2026 challenge baseline does with the released
   EchoCare weights (non-square output pixels: no millimetre measurements, see
   :meth:`Geometry.output_pixel_mm`);
4. replicate to 3 channels, scale to [0, 1] and normalise with ``mean``/``std``; CHW float32.

The defaults are EchoCare's own input (version 2): gray replicated to 3 channels, values in
[0, 1], ``mean=0``, ``std=1`` -- what the released encoder was pretrained on (the upstream usage
example feeds ``torch.rand(1, 3, 256, 256)``; the challenge baseline divides by 255 and nothing
else). Version 1 normalised with ImageNet's mean/std; a version-1 spec read from an old
checkpoint or bundle still carries its own mean/std and is reproduced exactly, and its
:meth:`PreprocessSpec.digest` differs, so no feature cache is shared between the two.

Masks follow the same geometry (:func:`apply_geometry_to_mask`, nearest neighbour), and the
:class:`Geometry` maps pixel sizes back to millimetres (head circumference).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageFilter


#: ImageNet statistics, what version 1 of the spec normalised with (kept for reading old specs).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: How the cropped region becomes ``size x size``.
RESIZE_MODES: tuple[str, ...] = ("letterbox", "stretch")

#: The current spec version (bumped whenever the meaning of the defaults changes).
SPEC_VERSION = 2


@dataclass(frozen=True)
class PreprocessSpec:
    """What the encoder sees. Changing any field changes :meth:`digest` (and invalidates caches).

    The defaults are EchoCare's input: values in [0, 1], no mean/std (``mean=0``, ``std=1``).
    """

    size: int = 256
    crop: bool = True
    # A pixel brighter than this (0..255) counts as part of the image region.
    crop_threshold: int = 10
    # The region's bounding box is searched on a copy whose long side is this many pixels.
    crop_search_px: int = 128
    # Regions smaller than this fraction of the frame are never taken as the image region.
    crop_min_fraction: float = 0.05
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # "letterbox" (keep the aspect ratio, pad) or "stretch" (each axis to ``size``).
    resize: str = "letterbox"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"PreprocessSpec resize={self.resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        if int(self.size) < 1:
            raise ValueError(f"PreprocessSpec size={self.size}: must be a positive number of pixels")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"PreprocessSpec mean/std need 3 values each, got {len(self.mean)} and {len(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"PreprocessSpec std={tuple(self.std)}: every value must be > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """The spec a checkpoint or bundle recorded. Fields it lacks take their defaults, except
        for a version-1 spec (written before ``resize`` existed): it letterboxed, and it always
        recorded its mean/std, so it is reproduced as it was."""
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown PreprocessSpec field(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        version = int(d.get("version", SPEC_VERSION))
        if version > SPEC_VERSION:
            raise ValueError(f"PreprocessSpec version {version} is newer than this echofleet understands ({SPEC_VERSION}); upgrade echofleet")
        if version == 1:
            d.setdefault("mean", IMAGENET_MEAN)
            d.setdefault("std", IMAGENET_STD)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        """Short stable hash of the spec (a feature-cache key component)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Geometry:
    """Where the output pixels came from: crop box in the source, scale, padding offsets."""

    src_shape: tuple[int, int]  # (H, W) of the source image
    crop: tuple[int, int, int, int]  # (y0, y1, x0, x1) in the source, end-exclusive
    scale: float  # output pixels per source pixel (along the crop's long side when stretched)
    pad: tuple[int, int]  # (top, left) offsets of the resized crop in the output
    resized: tuple[int, int]  # (h, w) of the resized crop inside the output
    size: int = 256
    extra: dict = field(default_factory=dict, compare=False)
    stretched: bool = False  # each axis scaled on its own (``resize="stretch"``)

    @property
    def scale_yx(self) -> tuple[float, float]:
        """Output pixels per source pixel along y and along x."""
        y0, y1, x0, x1 = self.crop
        if not self.stretched:
            return (self.scale, self.scale)
        return (self.resized[0] / (y1 - y0), self.resized[1] / (x1 - x0))

    def output_pixel_mm(self, source_pixel_mm: float) -> float:
        """Pixel size in mm after preprocessing, given the (square) source pixel size.

        Raises ValueError when a stretched resize made the output pixels non-square (more than
        1 % apart): one millimetre size would then be wrong along one axis.
        """
        sy, sx = self.scale_yx
        if abs(sy - sx) > 0.01 * max(sy, sx):
            raise ValueError(
                f"output pixels are not square (stretched resize: {1 / sy:.3g} x {1 / sx:.3g} source pixels); "
                "millimetre measurements need resize='letterbox'"
            )
        return source_pixel_mm / self.scale


def to_gray_uint8(img: np.ndarray) -> np.ndarray:
    """Any image array -> 2-D uint8 grayscale (601 luma; 16-bit and float are rescaled)."""
    a = np.asarray(img)
    if a.size == 0:
        raise ValueError(f"cannot preprocess an empty image of shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            raise ValueError("cannot preprocess an image with no finite pixel values")
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
        a = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255.0).round().astype(np.uint8)
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return np.asarray(Image.fromarray(np.ascontiguousarray(a[..., :3])).convert("L"))
    raise ValueError(f"cannot preprocess an image of shape {a.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the largest 4-connected True region, or None when ``mask`` is all False.

    Labels horizontal runs and joins runs that overlap between consecutive rows (union-find), so
    the Python loop runs over runs, not pixels. Among equally large regions the one whose first
    pixel comes first in raster order wins.
    """
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    run_row, run_start = np.nonzero(edges == 1)
    run_end = np.nonzero(edges == -1)[1]  # exclusive; rows come out in the same (row-major) order
    n = len(run_row)
    if n == 0:
        return None
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_row, np.arange(h + 1))
    starts, ends = run_start.tolist(), run_end.tolist()
    for y in range(1, h):
        i, i_end = int(row_first[y - 1]), int(row_first[y])
        j, j_end = int(row_first[y]), int(row_first[y + 1])
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = find(i), find(j)
                if a != b:  # the smaller index stays the root: roots are the earliest runs
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=run_end - run_start, minlength=n)
    best = int(np.argmax(sizes))
    out = np.zeros((h, w), bool)
    for k in np.nonzero(roots == best)[0]:
        out[run_row[k], run_start[k] : run_end[k]] = True
    return out


def find_image_region(gray: np.ndarray, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the ultrasound image region of a grayscale frame.

    The region is found on a small copy (fast, robust to speckle and thin text), then its box is
    refined at full resolution to the pixels brighter than ``crop_threshold`` inside the region
    grown by one small pixel, so black margins are cut to the pixel. Falls back to the whole frame
    when no region covers ``crop_min_fraction`` of it.
    """
    h, w = gray.shape
    full = (0, h, 0, w)
    if not spec.crop:
        return full
    f = min(1.0, spec.crop_search_px / max(h, w))
    sh, sw = max(1, round(h * f)), max(1, round(w * f))
    small = Image.fromarray(gray).resize((sw, sh), Image.BOX)
    # Closing (dilate then erode) joins speckle inside the sector; thin text stays apart.
    small = small.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
    fg = np.asarray(small) > spec.crop_threshold
    region = _largest_component(fg)
    if region is None or region.sum() < spec.crop_min_fraction * fg.size:
        return full
    # Grow by one small pixel and bring back to full resolution (per-axis factors: sh/h != sw/w).
    grown = Image.fromarray(region.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))
    near = np.asarray(grown.resize((w, h), Image.NEAREST)) > 0
    bright = (gray > spec.crop_threshold) & near
    rows, cols = np.nonzero(bright.any(axis=1))[0], np.nonzero(bright.any(axis=0))[0]
    if len(rows) == 0:  # cannot happen for a region found above the threshold; keep the coarse box
        ys, xs = np.nonzero(region)
        return (
            int(ys.min() * h // sh),
            min(h, -(-(int(ys.max()) + 1) * h // sh)),
            int(xs.min() * w // sw),
            min(w, -(-(int(xs.max()) + 1) * w // sw)),
        )
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def compute_geometry(gray: np.ndarray, spec: PreprocessSpec) -> Geometry:
    y0, y1, x0, x1 = find_image_region(gray, spec)
    ch, cw = y1 - y0, x1 - x0
    scale = spec.size / max(ch, cw)
    if spec.resize == "stretch":
        return Geometry(gray.shape, (y0, y1, x0, x1), scale, (0, 0), (spec.size, spec.size), spec.size, stretched=True)
    rh, rw = max(1, min(spec.size, round(ch * scale))), max(1, min(spec.size, round(cw * scale)))
    pad = ((spec.size - rh) // 2, (spec.size - rw) // 2)
    return Geometry(gray.shape, (y0, y1, x0, x1), scale, pad, (rh, rw), spec.size)


def _place(arr: np.ndarray, g: Geometry, resample: int) -> np.ndarray:
    y0, y1, x0, x1 = g.crop
    crop = Image.fromarray(np.ascontiguousarray(arr[y0:y1, x0:x1]))
    resized = np.asarray(crop.resize((g.resized[1], g.resized[0]), resample))
    out = np.zeros((g.size, g.size), arr.dtype)
    out[g.pad[0] : g.pad[0] + g.resized[0], g.pad[1] : g.pad[1] + g.resized[1]] = resized
    return out


def geometric_image(img: np.ndarray, spec: PreprocessSpec, geometry: Geometry | None = None) -> tuple[np.ndarray, Geometry]:
    """Steps 1-3: grayscale, crop, resize+pad. Returns (uint8 size x size, geometry)."""
    gray = to_gray_uint8(img)
    g = geometry or compute_geometry(gray, spec)
    return _place(gray, g, Image.BILINEAR), g


def normalize(gray_sq: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 4: uint8 HxW -> float32 3xHxW: ``(gray / 255 - mean) / std`` (EchoCare: just ``gray / 255``)."""
    x = gray_sq.astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return (np.broadcast_to(x, (3, *x.shape)) - mean) / std


def preprocess_image(img: np.ndarray, spec: PreprocessSpec | None = None) -> tuple[np.ndarray, Geometry]:
    """The full pipeline: any image -> (float32 array 3 x size x size, geometry)."""
    spec = spec or PreprocessSpec()
    sq, g = geometric_image(img, spec)
    return np.ascontiguousarray(normalize(sq, spec)), g


def apply_geometry_to_mask(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """A source-resolution mask -> uint8 {0,1} size x size in the same geometry as its image."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != tuple(g.src_shape):
        raise ValueError(f"mask shape {m.shape} does not match its image {tuple(g.src_shape)}")
    return (_place(m, g, Image.NEAREST) > 127).astype(np.uint8)


def preprocess_batch(images: list[np.ndarray], spec: PreprocessSpec | None = None) -> np.ndarray:
    """Several images -> float32 N x 3 x size x size."""
    spec = spec or PreprocessSpec()
    return np.stack([preprocess_image(im, spec)[0] for im in images]) if images else np.zeros((0, 3, spec.size, spec.size), np.float32)
