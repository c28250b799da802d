"""Decoding image files into the arrays :class:`~echocare.data.base.Sample` promises (numpy + Pillow).

Every failure becomes :class:`~echocare.data.base.UnreadableImage` naming the file and the
reason, so a reader never crashes on one bad file: :meth:`SiteData.iter_images` records it and
moves on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from echocare.data.base import UnreadableImage

#: File name endings read as still images (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Integer or float pixels of any range -> uint8, scaled by the image's own min..max."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return ((a - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def pil_to_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> uint8 HxW (gray) or HxWx3 (RGB). Alpha is dropped."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _to_uint8(np.asarray(im))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file completely. Raises :class:`UnreadableImage` (missing, truncated, not an image)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decodes every byte: a truncated file fails here, not later
                arr = pil_to_array(im)
    except Image.UnidentifiedImageError:
        raise UnreadableImage(path, "not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    except Exception as e:  # a Pillow plugin may raise anything (struct.error, IndexError, ...) on a crafted file
        raise UnreadableImage(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise UnreadableImage(path, "image has no pixels")
    return np.ascontiguousarray(arr)


def read_mask_union(paths: Sequence[str | Path]) -> np.ndarray:
    """Several mask files of one image -> their union, uint8 HxW {0, 255}.

    Any non-zero pixel (in any channel) is foreground. Masks of different sizes raise
    :class:`UnreadableImage` naming the offending file.
    """
    union: np.ndarray | None = None
    first: Path | None = None
    for p in paths:
        m = read_image(p)
        fg = m.max(axis=2) > 0 if m.ndim == 3 else m > 0
        if union is None:
            union, first = fg, Path(p)
        elif fg.shape != union.shape:
            raise UnreadableImage(p, f"mask size {fg.shape[::-1]} differs from {first.name} {union.shape[::-1]} (W x H)")
        else:
            union |= fg
    if union is None:
        raise ValueError("read_mask_union needs at least one path")
    return union.astype(np.uint8) * 255


def image_loader(path: Path) -> Callable[[], np.ndarray]:
    """A zero-argument loader for :class:`Sample` (keeps the path, decodes on demand)."""
    return lambda: read_image(path)


def mask_loader(paths: Sequence[Path]) -> Callable[[], np.ndarray] | None:
    """A zero-argument mask loader (union of ``paths``), or None when there is no mask file."""
    paths = list(paths)
    return (lambda: read_mask_union(paths)) if paths else None
