"""Frames of ultrasound clips (mp4, mov, mpeg, avi...) with PyAV, imported lazily.

A clip becomes ``frames`` evenly spaced samples. :class:`ClipFrames` decodes a clip once for
all of its selected frames and keeps only the most recent clip in memory, so iterating a site's
samples in order decodes every clip exactly once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from echocare.data.base import UnreadableImage

#: File name endings read as clips (lower case).
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mpeg", ".mpg", ".avi", ".mkv", ".webm", ".m4v")


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is part of the train extra
        raise ImportError("reading ultrasound clips needs PyAV: pip install 'echofleet[train]' (or: pip install av)") from e
    return av


def count_frames(path: str | Path) -> int:
    """Number of video frames, counted from the container's packets (no decoding). Raises UnreadableImage."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableImage(path, "no video stream in the file")
            n = sum(1 for packet in container.demux(video=0) if packet.size)
    except UnreadableImage:
        raise
    except Exception as e:  # av.FFmpegError, OSError, ValueError, or anything a damaged container provokes
        raise UnreadableImage(path, f"cannot read clip ({type(e).__name__}: {e})") from None
    if n == 0:
        raise UnreadableImage(path, "clip has no frames")
    return n


def evenly_spaced(n_frames: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over ``n_frames`` (all of them when k <= 0 or k >= n_frames)."""
    if k <= 0 or k >= n_frames:
        return list(range(n_frames))
    if k == 1:
        return [n_frames // 2]
    return sorted({int(round(i * (n_frames - 1) / (k - 1))) for i in range(k)})


class ClipFrames:
    """Decodes the wanted frames of one clip at a time (one-clip cache, owned by one reader)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._frames: dict[int, np.ndarray] = {}

    def frame(self, path: Path, index: int, wanted: tuple[int, ...]) -> np.ndarray:
        """RGB uint8 HxWx3 frame ``index`` of ``path``; decodes all ``wanted`` frames on a miss."""
        if self._path != path or index not in self._frames:
            self._frames = _decode(path, set(wanted) | {index})
            self._path = path
        if index not in self._frames:
            raise UnreadableImage(path, f"frame {index} not found (the clip decodes to fewer frames)")
        return self._frames[index]


def _decode(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    av = _import_av()
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as e:  # av.FFmpegError, OSError, ValueError, or anything a damaged stream provokes
        raise UnreadableImage(path, f"cannot decode clip ({type(e).__name__}: {e})") from None
    return out
