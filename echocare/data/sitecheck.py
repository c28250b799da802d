"""``site check``: what a hospital's data looks like before it joins a federation.

Reads every image once and reports counts per class and per split (the leak-free
:func:`~echocare.data.split.split_train_val`), unreadable files with the reason (every reader
reports each bad file, manifest row or frame as a :class:`~echocare.data.base.Problem` and skips
it; ``problem_files`` counts the distinct files), identical and
near-identical images, image sizes, mask coverage and mask/image size mismatches.

Blocking problems (the site cannot train as is): no readable image, a class without a readable
image, a mask whose size differs from its image's. Everything else is a warning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from echocare.atomic import atomic_write_bytes
from echocare.data.base import Problem, SiteData, UnreadableImage
from echocare.data.dedup import DEFAULT_MAX_HAMMING, group_samples, sample_fingerprint
from echocare.data.split import split_train_val

UNLABELED = "(unlabeled)"


@dataclass
class SiteReport:
    """The result of :func:`check_site` (JSON-serialisable through :meth:`to_dict`)."""

    spec: str
    task_hint: str | None
    classes: list[str]
    listed: int  # samples the reader listed
    readable: int  # samples whose image decoded
    per_class: dict[str, int]  # readable images per class
    per_split: dict[str, dict[str, int]]  # {"train": {class: n}, "val": {class: n}}
    problems: list[Problem]  # unreadable files and listing problems, with the reason
    exact_duplicates: list[list[str]]  # keys of images with identical pixels, per set
    near_duplicate_groups: list[list[str]]  # keys of identical or near-identical images, per group
    cross_label_groups: list[list[str]]  # near-duplicate groups whose images carry different labels
    sizes: dict[str, dict[str, float]]  # {"height"|"width": {"min", "median", "max"}}
    masks: dict[str, float]  # with_mask, non_empty, coverage, mean_lesion_fraction
    mask_mismatches: list[dict]  # {"key", "image": [h, w], "mask": [h, w]}
    problem_files: int = 0  # distinct files among ``problems`` (a multi-frame file may fail frame by frame)
    blocking: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blocking

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def write_json(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the report (plus ``extra`` top-level keys, e.g. the CLI's compute-device check)
        atomically (a crash leaves any previous file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=1).encode(), 0o600)


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}


def check_site(
    data: SiteData,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    on_progress: Callable[[int, int], None] | None = None,
) -> SiteReport:
    """Read every sample once and build the :class:`SiteReport`. ``on_progress(done, total)`` per sample."""
    problems: list[Problem] = list(data.problems)
    readable_idx: list[int] = []
    heights: list[int] = []
    widths: list[int] = []
    with_mask = non_empty = 0
    fractions: list[float] = []
    mismatches: list[dict] = []
    total = len(data.samples)
    for i, s in enumerate(data.samples):
        try:
            h, w = sample_fingerprint(s).shape  # decodes once; cached for the grouping and the split below
        except UnreadableImage as e:
            problems.append(Problem(e.path, e.reason))
        else:
            readable_idx.append(i)
            heights.append(h)
            widths.append(w)
            try:
                m = s.mask()
            except UnreadableImage as e:
                problems.append(Problem(e.path, f"mask: {e.reason}"))
                m = None
            if m is not None:
                with_mask += 1
                if m.shape[:2] != (h, w):
                    mismatches.append({"key": s.key, "image": [h, w], "mask": list(m.shape[:2])})
                else:
                    fg = (m.max(axis=2) if m.ndim == 3 else m) > 0
                    if fg.any():
                        non_empty += 1
                        fractions.append(float(fg.mean()))
        if on_progress:
            on_progress(i + 1, total)
    readable = data.subset(readable_idx)
    readable.problems = []

    def label_name(label: str | None) -> str:
        return UNLABELED if label is None else label

    class_names = list(data.classes) or ([UNLABELED] if readable.samples else [])
    per_class = {c: 0 for c in class_names}
    for s in readable.samples:
        per_class[label_name(s.label)] = per_class.get(label_name(s.label), 0) + 1

    grouping = group_samples(readable.samples, max_hamming)
    near = [[grouping.samples[i].key for i in g] for g in grouping.content_groups()]
    cross = [
        [grouping.samples[i].key for i in g]
        for g in grouping.content_groups()
        if len({grouping.samples[i].label for i in g}) > 1
    ]
    by_sha: dict[str, list[str]] = {}
    for s in grouping.samples:
        by_sha.setdefault(sample_fingerprint(s).sha256, []).append(s.key)
    exact = [keys for keys in by_sha.values() if len(keys) > 1]

    per_split: dict[str, dict[str, int]] = {"train": {c: 0 for c in class_names}, "val": {c: 0 for c in class_names}}
    if readable.samples:
        train, val = split_train_val(readable, val_fraction, seed, max_hamming)
        for name, part in (("train", train), ("val", val)):
            for s in part.samples:
                per_split[name][label_name(s.label)] = per_split[name].get(label_name(s.label), 0) + 1

    n_read = len(readable_idx)
    report = SiteReport(
        spec=data.spec,
        task_hint=data.task_hint,
        classes=list(data.classes),
        listed=total,
        readable=n_read,
        per_class=per_class,
        per_split=per_split,
        problems=problems,
        exact_duplicates=exact,
        near_duplicate_groups=near,
        cross_label_groups=cross,
        sizes={"height": _stats(heights), "width": _stats(widths)},
        masks={
            "with_mask": with_mask,
            "non_empty": non_empty,
            "coverage": non_empty / n_read if n_read else 0.0,
            "mean_lesion_fraction": float(np.mean(fractions)) if fractions else 0.0,
        },
        mask_mismatches=mismatches,
        problem_files=len({p.path for p in problems}),
    )
    _judge(report)
    return report


def _judge(r: SiteReport) -> None:
    """Fill ``blocking`` and ``warnings``."""
    if r.readable == 0:
        r.blocking.append(f"no readable images ({r.listed} listed)")
    for c in r.classes:
        if r.per_class.get(c, 0) == 0:
            r.blocking.append(f"class {c!r} has no readable images")
    if r.mask_mismatches:
        first = r.mask_mismatches[0]
        r.blocking.append(
            f"{len(r.mask_mismatches)} mask(s) differ in size from their image "
            f"(e.g. {first['key']}: image {first['image'][0]}x{first['image'][1]}, mask {first['mask'][0]}x{first['mask'][1]}, HxW)"
        )
    if r.problems:
        r.warnings.append(
            f"{len(r.problems)} problem(s) in {r.problem_files} file(s): skipped (unreadable, unusable or unmatched), "
            "listed under problems with the reason"
        )
    if r.exact_duplicates:
        r.warnings.append(f"{sum(len(g) - 1 for g in r.exact_duplicates)} image(s) are exact copies of another")
    if r.near_duplicate_groups:
        n = sum(len(g) for g in r.near_duplicate_groups)
        r.warnings.append(f"{len(r.near_duplicate_groups)} near-duplicate group(s) hold {n} images; the split keeps each group together")
    if r.cross_label_groups:
        r.warnings.append(f"{len(r.cross_label_groups)} near-duplicate group(s) carry different labels (label conflicts?)")
    for c in r.classes:
        if r.per_class.get(c, 0) > 0 and r.per_split["val"].get(c, 0) == 0:
            r.warnings.append(f"class {c!r} has no validation images (too few groups to split)")
