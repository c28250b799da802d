"""Read what a scanner hands the edge runtime: PNG/JPEG/BMP/TIFF stills, DICOM (single or multi-frame), video clips.

Torch-free. Everything goes through the data layer's own decoders (:mod:`echocare.data.images`,
:mod:`echocare.data.video`, :mod:`echocare.data.dicom`), so a scanner decodes exactly like the
hospitals did (and DICOM headers are read for image attributes only); DICOM needs
``pydicom`` (``echofleet[dicom]``), clips need ``av``. A file that cannot be decoded raises
:class:`echocare.data.base.UnreadableImage` naming the file and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echocare.data.base import UnreadableImage
from echocare.data.dicom import is_dicom_file
from echocare.data.images import read_image
from echocare.data.video import VIDEO_SUFFIXES, ClipFrames, count_frames, evenly_spaced


@dataclass
class Frame:
    """One image to run: pixels, where it came from, and its pixel size when the file says so."""

    image: np.ndarray  # uint8/uint16 HxW or HxWx3
    source: str
    frame: int | None = None  # frame index inside a clip / multi-frame DICOM
    pixel_mm: float | None = None


def read_frames(path: str | Path, *, max_frames: int = 16) -> list[Frame]:
    """All frames to run for one input file (clips: up to ``max_frames`` spread evenly)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(path, "no such file")
    suffix = path.suffix.lower()
    if is_dicom_file(path):
        return _read_dicom(path, max_frames)
    if suffix in VIDEO_SUFFIXES:
        return _read_video(path, max_frames)
    return [Frame(read_image(path), str(path))]


def _read_dicom(path: Path, max_frames: int) -> list[Frame]:
    """Frames of a DICOM file through the data layer's reader (it reads only image attributes)."""
    from echocare.data.dicom import read_dicom
    from echocare.data.readers import ReadOptions

    try:
        site = read_dicom(path, f"dicom:{path}", ReadOptions(frames=max_frames))
    except ImportError as e:  # pydicom missing
        raise UnreadableImage(path, str(e)) from None
    if site.problems:
        raise UnreadableImage(path, site.problems[0].reason)
    multi = len(site.samples) > 1 or site.samples[0].meta.get("n_frames", 1) > 1
    return [Frame(s.image(), str(path), s.meta.get("frame") if multi else None, s.meta.get("pixel_size_mm")) for s in site.samples]


def _read_video(path: Path, max_frames: int) -> list[Frame]:
    try:
        n = count_frames(path)
    except ImportError as e:
        raise UnreadableImage(path, str(e)) from None
    wanted = tuple(evenly_spaced(n, max_frames))
    clip = ClipFrames()
    return [Frame(clip.frame(path, i, wanted), str(path), i) for i in wanted]
