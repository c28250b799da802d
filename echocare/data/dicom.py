"""DICOM ultrasound (single- and multi-frame) with pydicom, imported lazily.

Privacy: only image-describing attributes are ever read. Headers are parsed with
``specific_tags`` (rows, columns, frames, photometric interpretation, bit depth, rescale,
window, palette, ultrasound calibration regions) and pixels are decoded with
:func:`pydicom.pixels.pixel_array` from the path, which reads only what decoding needs. No
patient, study or device identifier is read into a :class:`Sample`'s key, meta or anything else,
with one exception: ``PatientID`` is read on its own (:func:`patient_pseudonym`) and kept only as a
salted hash in ``meta["patient"]`` (and the sample's group), so that a site can give per-patient
differential privacy and keep a patient's files in one split (docs/privacy.md). That pseudonym
stays on the site like everything else here; the identifier itself is not kept.

Pixel handling, per frame, to uint8:

- ``MONOCHROME2``: rescale slope/intercept, then the first VOI window when present, else the
  frame's min..max, mapped linearly to 0..255;
- ``MONOCHROME1``: the same, inverted (0 = white in the file);
- ``RGB``: as is (16-bit scaled down);
- ``YBR_FULL`` / ``YBR_FULL_422``: decoded raw and converted with
  :func:`pydicom.pixels.convert_color_space`; ``YBR_RCT`` / ``YBR_ICT`` (JPEG 2000) come out of
  the decoder as RGB already;
- ``PALETTE COLOR``: :func:`pydicom.pixels.apply_color_lut`.

Bad files never stop a dataset: a header that cannot be read, or whose image attributes are
not usable (``NumberOfFrames`` not a positive whole number or claiming more frames than the file
can hold, ``Rows``/``Columns`` of 0, a bit depth or samples-per-pixel that does not fit the
photometric interpretation, ...), becomes one :class:`~echocare.data.base.Problem` naming the file
and the reason, and the file is skipped; a frame that fails to decode raises
:class:`~echocare.data.base.UnreadableImage` naming the file, the frame and the reason.
"""

from __future__ import annotations

import math
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
META_KEYS = ("frame", "n_frames", "photometric", "modality", "pixel_size_mm", "patient")
#: The one patient attribute read, separately, only to form a pseudonym (:func:`patient_pseudonym`).
PATIENT_KEYWORD = "PatientID"

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
    except Exception as e:  # pydicom raises many types for a damaged file; one bad file must not stop the rest
        raise UnreadableImage(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "Rows" not in ds or "Columns" not in ds or "PhotometricInterpretation" not in ds:
        raise UnreadableImage(path, "DICOM file has no image (Rows/Columns/PhotometricInterpretation missing)")
    return ds


def patient_pseudonym(path: Path) -> str | None:
    """A site-local pseudonym of the file's ``PatientID`` (16 hex digits of a salted sha256), or None
    when the file names no patient. Only this attribute is parsed; the identifier is not kept. Files
    and frames of one patient get one pseudonym: the unit of per-patient DP (docs/privacy.md)."""
    import hashlib

    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=[PATIENT_KEYWORD])
        value = str(ds.get(PATIENT_KEYWORD, "") or "").strip()
    except Exception:  # an unreadable attribute: no patient (the image may still be readable)
        return None
    if not value:
        return None
    return hashlib.sha256(b"echofleet-patient\x00" + value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


#: Samples per pixel each supported photometric interpretation needs.
_SAMPLES_FOR = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
}


def _header_value(ds, keyword: str):
    """``ds.keyword`` or None when absent (pydicom returns an invalid value as its text, or raises
    under a strict configuration: then a ValueError naming the attribute)."""
    try:
        return ds.get(keyword)
    except Exception as e:  # a strict pydicom configuration raises on invalid values
        raise ValueError(f"{keyword} is invalid ({type(e).__name__}: {e})") from None


def _whole(ds, keyword: str, default: int | None = None, low: int = 1) -> int:
    """An integer attribute (US or IS) that must be a whole number >= ``low``; ValueError otherwise."""
    value = _header_value(ds, keyword)
    if value is None:
        if default is None:
            raise ValueError(f"{keyword} is missing")
        return default
    text = str(value).strip()
    if not text.lstrip("+").isdigit() or int(text) < low:
        raise ValueError(f"{keyword} {text!r} is not a whole number >= {low}")
    return int(text)


def check_header(path: Path, ds) -> int:
    """Validate the attributes the reader uses; return the number of frames. Raises UnreadableImage.

    Checks: ``NumberOfFrames`` (when present) a whole number >= 1 and not more frames than the
    file can hold; ``Rows``/``Columns`` >= 1; ``BitsAllocated`` 1, 8, 16, 32 or 64 and
    ``BitsStored`` between 1 and it (both present, as decoding needs them); ``SamplesPerPixel``
    what the photometric interpretation needs (1 for monochrome and palette, 3 for RGB/YBR) and,
    for uncompressed colour, ``PlanarConfiguration`` 0 or 1; palette files carry their lookup
    tables; the file is large enough for the pixels the header claims.
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    encapsulated = bool(ts) and ts.is_encapsulated
    try:
        n = _whole(ds, "NumberOfFrames", default=1)
        rows, cols = _whole(ds, "Rows"), _whole(ds, "Columns")
        pi = str(_header_value(ds, "PhotometricInterpretation") or "").strip().upper()
        if pi not in _SAMPLES_FOR:
            raise ValueError(f"unsupported PhotometricInterpretation {pi!r} (supported: {', '.join(_SAMPLES_FOR)})")
        spp = _whole(ds, "SamplesPerPixel")
        if spp != _SAMPLES_FOR[pi]:
            raise ValueError(f"PhotometricInterpretation {pi} needs SamplesPerPixel {_SAMPLES_FOR[pi]}, the file says {spp}")
        bits = _whole(ds, "BitsAllocated")
        if bits not in (1, 8, 16, 32, 64):
            raise ValueError(f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
        stored = _whole(ds, "BitsStored")
        if stored > bits:
            raise ValueError(f"BitsStored {stored} exceeds BitsAllocated {bits}")
        if spp == 3 and not encapsulated and _whole(ds, "PlanarConfiguration", low=0) > 1:
            raise ValueError(f"PlanarConfiguration {_header_value(ds, 'PlanarConfiguration')} is not 0 or 1")
        if pi == "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" not in ds:
            raise ValueError("PALETTE COLOR image without its palette lookup tables")
    except ValueError as e:
        raise UnreadableImage(path, f"unusable DICOM header: {e}") from None
    size = path.stat().st_size
    # Native pixels: every frame's bytes are in the file; encapsulated: each frame needs at least an 8-byte item.
    need = n * 8 if encapsulated else -(-n * rows * cols * spp * bits // 8)
    if need > size:
        raise UnreadableImage(
            path,
            f"unusable DICOM header: {n} frame(s) of {rows}x{cols}x{spp} at {bits} bits need at least {need} bytes, "
            f"the file has {size} (NumberOfFrames, Rows, Columns, SamplesPerPixel or BitsAllocated wrong, or pixels missing)",
        )
    return n


def _pixel_size_mm(ds) -> float | None:
    """Pixel size from the first ultrasound calibration region in cm units, if it fits the image."""
    try:
        regions = ds.get("SequenceOfUltrasoundRegions")
        if not regions:
            return None
        r = regions[0]
        if int(r.PhysicalUnitsXDirection) != 3 or int(r.PhysicalUnitsYDirection) != 3:
            return None
        if int(r.RegionLocationMaxX1) >= int(ds.Columns) or int(r.RegionLocationMaxY1) >= int(ds.Rows):
            return None  # region drawn for another resolution: do not trust it
        dx, dy = float(r.PhysicalDeltaX) * 10.0, float(r.PhysicalDeltaY) * 10.0
    except Exception:  # any malformed calibration means "pixel size unknown", never a failed read
        return None
    return dx if math.isfinite(dx) and dx > 0 and abs(dx - dy) <= 0.01 * dx else None


def _text(ds, keyword: str) -> str | None:
    """A short text attribute, or None when absent, empty or unreadable."""
    try:
        return str(ds.get(keyword, "") or "").strip() or None
    except Exception:
        return None


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
    out = _decode_frame(path, header, index)
    rows, cols = int(header.Rows), int(header.Columns)
    if out.dtype != np.uint8 or out.shape[:2] != (rows, cols) or not (out.ndim == 2 or (out.ndim == 3 and out.shape[2] == 3)):
        where = f"frame {index}: " if index is not None else ""
        raise UnreadableImage(path, f"{where}decoded pixels have shape {out.shape}, the header says {rows}x{cols}")
    return out


def _decode_frame(path: Path, header, index: int | None) -> np.ndarray:
    _pydicom()
    from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

    pi = str(header.PhotometricInterpretation).strip().upper()
    where = f"frame {index}: " if index is not None else ""
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
        raise UnreadableImage(path, f"{where}cannot decode DICOM pixels ({type(e).__name__}: {e})") from None


def read_dicom(path: Path, spec: str, opts) -> SiteData:
    """A DICOM file, or a folder of them (recursively): one sample per frame.

    Labels: when every file of a folder lies in a sub-folder, the first sub-folder is the class;
    otherwise the files are unlabeled. ``opts.frames`` keeps that many evenly spaced frames per
    file (default: all). Frames of one file share a group; so do all files of one patient (same
    ``PatientID`` pseudonym).
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
            n = check_header(f, header)
        except UnreadableImage as e:
            problems.append(Problem(e.path, e.reason))
            continue
        except OSError as e:  # the file vanished or became unreadable between listing and reading
            problems.append(Problem(str(f), f"cannot read file ({type(e).__name__}: {e})"))
            continue
        items.append((f, rel.as_posix(), header, n))
    samples: list[Sample] = []
    for f, key, header, n in items:
        label = key.split("/")[0] if labeled else None
        meta_base = {
            "n_frames": n,
            "photometric": str(header.PhotometricInterpretation),
            "modality": _text(header, "Modality"),
        }
        px_mm = _pixel_size_mm(header)
        if px_mm is not None:
            meta_base["pixel_size_mm"] = px_mm
        patient = patient_pseudonym(f)
        if patient:
            meta_base["patient"] = patient
        multi = "NumberOfFrames" in header
        for i in evenly_spaced(n, opts.frames or 0):
            samples.append(
                Sample(
                    f"{key}#{i}" if multi else key,
                    label,
                    (lambda f=f, h=header, i=(i if multi else None): decode_frame(f, h, i)),
                    None,
                    f"patient:{patient}" if patient else key,
                    {**meta_base, "frame": i},
                )
            )
    classes = sorted({s.label for s in samples if s.label is not None})
    return SiteData(spec, classes, select_limit(samples, opts.limit, opts.seed), problems, "classify" if classes else None)
