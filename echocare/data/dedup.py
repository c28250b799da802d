"""Identical and near-identical images: content hashes, a perceptual hash, and grouping.

Two images belong together when

- their decoded pixels are identical (SHA-256 of shape + pixels), or
- their 64-bit difference hashes (dHash of the cropped ultrasound region, 9x8 grayscale, black
  background around a fan filled in, see :func:`content_dhash`) differ in at most
  ``max_hamming`` bits (default 8), or
- they already share an explicit ``Sample.group`` (clip, patient).

Groups are the connected components of those links (union-find). dHash compares brightness
gradients between neighbouring cells, so a brightened, re-compressed, rescaled or re-bordered
copy keeps (almost) the same hash. On real BUSI the distance to the nearest other image is
bimodal: 0-8 bits for re-saved / re-annotated copies of one acquisition, 11+ bits otherwise,
which is where the default threshold comes from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from echocare.data.base import Problem, Sample, SiteData, UnreadableImage
from echocare.preprocess import PreprocessSpec, find_image_region, to_gray_uint8

#: Default Hamming threshold (bits out of 64) below which two dHashes mean "near duplicate".
DEFAULT_MAX_HAMMING = 8

_CACHE_KEY = "fingerprint"


@dataclass(frozen=True)
class Fingerprint:
    """What the grouping needs to know about one image."""

    sha256: str  # decoded pixels (and shape): identical images only
    dhash: int  # 64-bit difference hash of the image content (:func:`content_dhash`)
    shape: tuple[int, int]  # (H, W) of the image


def _border_background(dark: np.ndarray) -> np.ndarray:
    """The dark pixels connected to the border (4-neighbourhood): black corners around a fan."""
    bg = np.zeros_like(dark)
    bg[[0, -1], :] = dark[[0, -1], :]
    bg[:, [0, -1]] |= dark[:, [0, -1]]
    while True:
        grown = bg.copy()
        grown[1:] |= bg[:-1]
        grown[:-1] |= bg[1:]
        grown[:, 1:] |= bg[:, :-1]
        grown[:, :-1] |= bg[:, 1:]
        grown &= dark
        if np.array_equal(grown, bg):
            return bg
        bg = grown


def content_dhash(gray: np.ndarray, spec: PreprocessSpec | None = None) -> int:
    """dHash of the ultrasound content only.

    The image is cropped to its image region, shrunk to 64x64, and the black background that
    touches the border (the corners around a convex fan) is filled with the content's mean
    before hashing. Without that fill, the fan outline alone makes unrelated images of one
    convex probe look alike; dark structures inside the image (cysts, shadows) are kept.
    """
    spec = spec or PreprocessSpec()
    y0, y1, x0, x1 = find_image_region(gray, spec)
    thumb = np.asarray(Image.fromarray(gray[y0:y1, x0:x1]).resize((64, 64), Image.BOX), np.float32)
    background = _border_background(thumb <= spec.crop_threshold)
    if (~background).any():
        thumb = np.where(background, thumb[~background].mean(), thumb)
    small = np.asarray(Image.fromarray(thumb, "F").resize((9, 8), Image.BOX))
    return int(np.packbits((small[:, 1:] > small[:, :-1]).ravel()).view(">u8")[0])


def fingerprint_image(img: np.ndarray) -> Fingerprint:
    """Fingerprint of a decoded image (uint8 HxW or HxWx3)."""
    a = np.ascontiguousarray(img)
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
    gray = to_gray_uint8(a)
    lifted = gray - gray.min()  # a copy with a raised black level hashes like the original
    return Fingerprint(h.hexdigest(), content_dhash(lifted), (int(gray.shape[0]), int(gray.shape[1])))


def sample_fingerprint(sample: Sample, image: np.ndarray | None = None) -> Fingerprint:
    """The sample's fingerprint, computed once and kept in ``sample.cache``.

    Pass ``image`` when it is already decoded. Raises :class:`UnreadableImage`.
    """
    fp = sample.cache.get(_CACHE_KEY)
    if fp is None:
        fp = fingerprint_image(sample.image() if image is None else image)
        sample.cache[_CACHE_KEY] = fp
    return fp


def hamming_pairs(hashes: Sequence[int], max_hamming: int, chunk: int = 1024) -> list[tuple[int, int]]:
    """All index pairs (i < j) whose 64-bit hashes differ in at most ``max_hamming`` bits."""
    h = np.array([np.uint64(x) for x in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), chunk):
        block = h[start : start + chunk]
        dist = np.bitwise_count(block[:, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_hamming)
        ii = ii + start
        keep = ii < jj
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return pairs


class UnionFind:
    """Disjoint sets over 0..n-1; the smallest index of a set is its root."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


@dataclass
class Grouping:
    """Result of :func:`group_samples`, for the samples that could be read."""

    samples: list[Sample]  # readable samples, in input order
    group_of: list[int]  # group id per sample (index of the group's first sample): all links
    content_group_of: list[int]  # the same, from content links only (identical or near-identical pixels)
    exact_duplicates: int  # samples whose pixels equal those of an earlier sample
    near_duplicate_pairs: int  # pairs within the dHash threshold whose pixels differ
    problems: list[Problem]  # unreadable samples (left out)

    def groups(self) -> dict[int, list[int]]:
        """group id -> indices into ``samples`` (all links)."""
        return _members(self.group_of)

    def content_groups(self) -> list[list[int]]:
        """Sets of two or more samples with identical or near-identical pixels."""
        return [m for m in _members(self.content_group_of).values() if len(m) > 1]


def _members(group_of: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        out.setdefault(g, []).append(i)
    return out


def group_samples(
    samples: Iterable[Sample],
    max_hamming: int = DEFAULT_MAX_HAMMING,
    on_sample: Callable[[], None] | None = None,
) -> Grouping:
    """Group samples by explicit group, identical pixels and near-identical dHash (union-find).

    Unreadable samples are left out and reported in ``problems``. ``on_sample`` is called after
    each sample (progress bars).
    """
    readable: list[Sample] = []
    fps: list[Fingerprint] = []
    problems: list[Problem] = []
    for s in samples:
        try:
            fps.append(sample_fingerprint(s))
            readable.append(s)
        except UnreadableImage as e:
            problems.append(Problem(e.path, e.reason))
        if on_sample:
            on_sample()
    n = len(readable)
    content, combined = UnionFind(n), UnionFind(n)
    first_with_sha: dict[str, int] = {}
    first_with_group: dict[str, int] = {}
    exact = 0
    for i, (s, fp) in enumerate(zip(readable, fps)):
        j = first_with_sha.setdefault(fp.sha256, i)
        if j != i:
            exact += 1
            content.union(i, j)
            combined.union(i, j)
        if s.group is not None:
            combined.union(i, first_with_group.setdefault(s.group, i))
    near = 0
    for i, j in hamming_pairs([fp.dhash for fp in fps], max_hamming):
        near += fps[i].sha256 != fps[j].sha256
        content.union(i, j)
        combined.union(i, j)
    return Grouping(readable, combined.roots(), content.roots(), exact, near, problems)


def assign_near_duplicate_groups(data: SiteData, max_hamming: int = DEFAULT_MAX_HAMMING) -> None:
    """Set ``Sample.group`` of every readable sample to its content group (in place).

    The group name is the key of the group's first sample, so it is stable and readable. Samples
    that cannot be decoded keep their group (None) and are recorded in ``data.problems``.
    """
    grouping = group_samples(data.samples, max_hamming)
    for s, g in zip(grouping.samples, grouping.group_of):
        s.group = grouping.samples[g].group or grouping.samples[g].key
    data.problems.extend(grouping.problems)
