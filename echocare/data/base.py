"""What every reader returns: a :class:`SiteData` of lazily loaded :class:`Sample` s.

Privacy meaning: a ``Sample.key`` (a site-relative path) and everything in ``Sample.meta`` stay on
the site. Nothing in this module is ever put into a federated message; only arrays derived from
pixels (and then only head parameters) are used downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


class UnreadableImage(Exception):
    """A file could not be decoded. ``str(e)`` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Problem:
    """A file that was skipped, and why (reported by readers and by ``site check``)."""

    path: str
    reason: str


@dataclass
class Sample:
    """One image (one frame for clips), loaded on demand.

    - ``key``: site-local identifier (relative path, ``#frame`` for clip frames). Never leaves the site.
    - ``label``: class name, or None for unlabeled / segmentation-only data.
    - ``group``: samples with the same group always land in the same split (clip, patient, near-dup).
    - ``meta``: e.g. ``pixel_size_mm``, ``hc_mm``, ``profile`` (phantom device), ``frame``.
    - ``cache``: values derived from the pixels (e.g. the near-duplicate fingerprint), filled on
      demand so that the site check and the split decode each image once. Not part of equality.
    """

    key: str
    label: str | None
    load_image: Callable[[], np.ndarray]
    load_mask: Callable[[], np.ndarray | None] | None = None
    group: str | None = None
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def image(self) -> np.ndarray:
        """uint8 HxW (gray) or HxWx3 (RGB). Raises :class:`UnreadableImage`."""
        return self.load_image()

    def mask(self) -> np.ndarray | None:
        """uint8 HxW {0, 255} at the image's resolution, or None. Raises :class:`UnreadableImage`."""
        return self.load_mask() if self.load_mask else None


@dataclass
class SiteData:
    """A site's data as one reader sees it."""

    spec: str  # the data spec string it came from (e.g. ``busi:/data/BUSI``)
    classes: list[str]
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    task_hint: str | None = None  # "classify" | "segment" | "hc"

    def __len__(self) -> int:
        return len(self.samples)

    def iter_images(self) -> Iterator[tuple[Sample, np.ndarray]]:
        """Yield (sample, image); an unreadable file is recorded in ``problems`` and skipped."""
        for s in self.samples:
            try:
                yield s, s.image()
            except UnreadableImage as e:
                self.problems.append(Problem(e.path, e.reason))

    def subset(self, indices) -> "SiteData":
        return SiteData(self.spec, list(self.classes), [self.samples[i] for i in indices], list(self.problems), self.task_hint)
