"""DICOM ultrasound (single- and multi-frame) with pydicom, imported lazily.

Privacy: only image-describing attributes are ever read. Headers are parsed with
``specific_tags`` (rows, columns, frames, photometric interpretation, bit depth, rescale,
window, palette, ultrasound calibration regions) and pixels are decoded with
:func:`pydicom.pixels.pixel_array` from the path, which reads only what decoding needs. No
patient, study or device identifier is read into a :class:`Sample`'s key, meta or anything else.

Pixel handling, per frame, to uint8:

- ``MONOCHROME2``: rescale slope/intercept, then the first VOI window when present, else the
  frame's min..max, mapped linearly to 0..255;
- ``MONOCHROME1``: the same, inverted (0 = white in the file);
- ``RGB``: as is (16-bit scaled down);
- ``YBR_FULL`` / ``YBR_FULL_422``: decoded raw and converted with
  :func:`pydicom.pixels.convert_color_space`; ``YBR_RCT`` / ``YBR_ICT`` (JPEG 2000) come out of
  the decoder as RGB already;
- ``PALETTE COLOR``: :func:`pydicom.pixels.apply_color_lut`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from echocare.data.base import Problem, Sample, SiteData, UnreadableImage
from echocare.data.video import evenly_spaced

#: Attributes read from a header (by keyword). Nothing else is parsed into memory.
HEADER_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "SequenceOfUltrasoundRegions",
)

#: What may appear in ``Sample.meta`` for a DICOM frame.
META_KEYS = ("frame", "n_frames", "photometric", "modality", "pixel_size_mm")

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError as e:  # pragma: no cover - pydicom is the `dicom` extra
        raise ImportError("reading DICOM needs pydicom: pip install 'echofleet[dicom]'") from e
    return pydicom


def is_dicom_file(path: Path) -> bool:
    """``.dcm``/``.dicom`` files, and suffix-less files with the ``DICM`` preamble."""
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path):
    """The image-describing attributes only (a pydicom Dataset). Raises UnreadableImage."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise UnreadableImage(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "Rows" not in ds or "Columns" not in ds or "PhotometricInterpretation" not in ds:
        raise UnreadableImage(path, "DICOM file has no image (Rows/Columns/PhotometricInterpretation missing)")
    return ds


def _pixel_size_mm(ds) -> float | None:
    """Pixel size from the first ultrasound calibration region in cm units, if it fits the image."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    r = regions[0]
    try:
        if int(r.PhysicalUnitsXDirection) != 3 or int(r.PhysicalUnitsYDirection) != 3:
            return None
        if int(r.RegionLocationMaxX1) >= int(ds.Columns) or int(r.RegionLocationMaxY1) >= int(ds.Rows):
            return None  # region drawn for another resolution: do not trust it
        dx, dy = float(r.PhysicalDeltaX) * 10.0, float(r.PhysicalDeltaY) * 10.0
    except (AttributeError, ValueError, TypeError):
        return None
    return dx if dx > 0 and abs(dx - dy) <= 0.01 * dx else None


def _window(a: np.ndarray, ds) -> np.ndarray:
    """Monochrome frame -> uint8: modality rescale, then the first VOI window or min..max."""
    a = a.astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    a = a * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if w > 1:
            out = ((a - (c - 0.5)) / (w - 1) + 0.5) * 255.0  # DICOM PS3.3 C.11.2.1.2 linear window
            return np.clip(out, 0, 255).round().astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return ((a - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def decode_frame(path: Path, header, index: int | None) -> np.ndarray:
    """One frame as uint8 HxW (monochrome) or HxWx3 (color). Raises UnreadableImage."""
    _pydicom()
    from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

    pi = str(header.PhotometricInterpretation).strip().upper()
    try:
        raw = pixel_array(str(path), index=index, raw=True)
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            out = _window(raw, header)
            return 255 - out if pi == "MONOCHROME1" else out
        if pi == "PALETTE COLOR":
            rgb = apply_color_lut(raw, header)
            bits = int(header.RedPaletteColorLookupTableDescriptor[2])
            return (rgb >> (bits - 8)).astype(np.uint8) if bits > 8 else rgb.astype(np.uint8)
        if pi in ("YBR_FULL", "YBR_FULL_422"):
            raw = convert_color_space(raw, pi, "RGB")
        elif pi not in ("RGB", "YBR_RCT", "YBR_ICT"):
            raise UnreadableImage(path, f"unsupported photometric interpretation {pi!r}")
        if raw.dtype != np.uint8:
            hi = float(raw.max())
            raw = (raw.astype(np.float64) / (hi if hi > 0 else 1.0) * 255.0).round().astype(np.uint8)
        return raw
    except UnreadableImage:
        raise
    except Exception as e:  # pydicom raises many types (NotImplementedError, RuntimeError, ...) for bad pixel data
        raise UnreadableImage(path, f"cannot decode DICOM pixels ({type(e).__name__}: {e})") from None


def read_dicom(path: Path, spec: str, opts) -> SiteData:
    """A DICOM file, or a folder of them (recursively): one sample per frame.

    Labels: when every file of a folder lies in a sub-folder, the first sub-folder is the class;
    otherwise the files are unlabeled. ``opts.frames`` keeps that many evenly spaced frames per
    file (default: all). Frames of one file share a group.
    """
    from echocare.data.readers import select_limit

    if not path.exists():
        raise FileNotFoundError(f"dicom: path not found: {path}")
    if path.is_file():
        root, files = path.parent, [path]
    else:
        root, files = path, sorted(p for p in path.rglob("*") if is_dicom_file(p))
    rels = [f.relative_to(root) for f in files]
    labeled = path.is_dir() and bool(rels) and all(len(r.parts) >= 2 for r in rels)
    problems: list[Problem] = []
    items: list[tuple[Path, str, object, int]] = []
    for f, rel in zip(files, rels):
        try:
            header = read_header(f)
            n = int(header.get("NumberOfFrames", 1) or 1)
        except UnreadableImage as e:
            problems.append(Problem(e.path, e.reason))
            continue
        items.append((f, rel.as_posix(), header, n))
    samples: list[Sample] = []
    for f, key, header, n in items:
        label = key.split("/")[0] if labeled else None
        meta_base = {
            "n_frames": n,
            "photometric": str(header.PhotometricInterpretation),
            "modality": str(header.get("Modality", "")) or None,
        }
        px_mm = _pixel_size_mm(header)
        if px_mm is not None:
            meta_base["pixel_size_mm"] = px_mm
        multi = "NumberOfFrames" in header
        for i in evenly_spaced(n, opts.frames or 0):
            samples.append(
                Sample(
                    f"{key}#{i}" if multi else key,
                    label,
                    (lambda f=f, h=header, i=(i if multi else None): decode_frame(f, h, i)),
                    None,
                    key,
                    {**meta_base, "frame": i},
                )
            )
    classes = sorted({s.label for s in samples if s.label is not None})
    return SiteData(spec, classes, select_limit(samples, opts.limit, opts.seed), problems, "classify" if classes else None)
