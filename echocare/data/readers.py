"""Readers for image folders: BUSI, folder-per-class, CSV manifests, HC18 and POCUS.

Every reader lists files up front and returns a :class:`SiteData` whose samples decode on
demand. Files and manifest rows that cannot be listed properly (a mask without its image, an
HC18 image without a CSV row or with an unreadable one, a manifest row without a path, a clip
without frames) are recorded as :class:`Problem` s naming the file (or ``MANIFEST line N``) and
the reason, and skipped; files that fail to decode are reported by :meth:`SiteData.iter_images`
(and by ``site check``) when they are read. Only a problem with the dataset as a whole (its
folder or manifest missing, a manifest without the required columns) raises. DICOM lives in
:mod:`echocare.data.dicom`, phantoms in :mod:`echocare.phantom`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from echocare.data.base import Problem, Sample, SiteData, UnreadableImage
from echocare.data.images import is_image_file, mask_loader, image_loader, read_image
from echocare.data.video import VIDEO_SUFFIXES, ClipFrames, count_frames, evenly_spaced

BUSI_CLASSES = ("benign", "malignant", "normal")
_MASK_RE = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$")


@dataclass(frozen=True)
class ReadOptions:
    """Options shared by the readers (parsed from a data spec's query string)."""

    limit: int | None = None  # keep at most this many samples (stratified, deterministic)
    seed: int = 0  # for ``limit``
    frames: int | None = None  # frames per clip / multi-frame file (None: the reader's default)


# ----------------------------------------------------------------------------- subset selection


def select_limit(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` samples: stratified by label, whole groups first, deterministic in ``seed``.

    Each label gets a share proportional to its size (largest remainder, at least one when
    ``limit`` allows). Within a label, groups (``Sample.group``, else the key) are taken in a
    seeded random order; the last group taken may be cut to fit. The original order is kept.
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit <= 0:
        return []
    by_label: dict[str | None, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    labels = sorted(by_label, key=lambda x: (x is None, x or ""))
    sizes = np.array([len(by_label[lab]) for lab in labels], float)
    quota = allocate(sizes, limit)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for lab, q in zip(labels, quota):
        groups: dict[str, list[int]] = {}
        for i in by_label[lab]:
            groups.setdefault(samples[i].group or samples[i].key, []).append(i)
        names = sorted(groups)
        for gi in rng.permutation(len(names)):
            if q <= 0:
                break
            members = groups[names[gi]][:q]
            chosen.extend(members)
            q -= len(members)
    return [samples[i] for i in sorted(chosen)]


def allocate(sizes: np.ndarray, total: int) -> list[int]:
    """Split ``total`` over strata proportionally to ``sizes`` (largest remainder, >=1 each if possible)."""
    k = len(sizes)
    if k == 0:
        return []
    exact = sizes / sizes.sum() * total
    quota = np.floor(exact).astype(int)
    if total >= k:
        quota = np.maximum(quota, 1)
    quota = np.minimum(quota, sizes.astype(int))
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quota.sum() < total and (quota < sizes).any():
        for i in order:
            if quota.sum() >= total:
                break
            if quota[i] < sizes[i]:
                quota[i] += 1
    while quota.sum() > total:
        quota[int(np.argmax(quota))] -= 1
    return quota.tolist()


# ----------------------------------------------------------------------------- helpers


def require_dir(path: Path, kind: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{kind}: path not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{kind}: expected a folder, got a file: {path}")
    return path


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _phantom_profiles(root: Path) -> dict[str, str]:
    """For folders written by ``echofleet phantom``: relative path -> device profile."""
    manifest = root / "phantom.json"
    if not manifest.is_file():
        return {}
    try:
        files = json.loads(manifest.read_text()).get("files", {})
        return {str(k): str(v["profile"]) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def list_class_folder(
    root: Path, class_dir: Path, problems: list[Problem], profiles: dict[str, str]
) -> list[Sample]:
    """Images under one class folder (recursively) with their ``NAME_mask*.png`` masks."""
    label = class_dir.name
    files = sorted(p for p in class_dir.rglob("*") if is_image_file(p))
    masks: dict[tuple[Path, str], list[Path]] = {}
    images: list[Path] = []
    for p in files:
        m = _MASK_RE.match(p.stem)
        if m:
            masks.setdefault((p.parent, m["base"]), []).append(p)
        else:
            images.append(p)
    samples = []
    claimed: set[tuple[Path, str]] = set()
    for p in images:
        mk = (p.parent, p.stem)
        claimed.add(mk)
        key = _rel(p, root)
        meta = {"profile": profiles[key]} if key in profiles else {}
        samples.append(Sample(key, label, image_loader(p), mask_loader(sorted(masks.get(mk, []), key=_mask_order)), None, meta))
    for mk, paths in sorted(masks.items()):
        if mk not in claimed:
            for p in paths:
                problems.append(Problem(str(p), "mask file without a matching image"))
    return samples


def _mask_order(p: Path) -> tuple[int, str]:
    m = re.search(r"_mask(?:_(\d+))?$", p.stem)
    return (int(m.group(1)) if m and m.group(1) else 0, p.name)


# ----------------------------------------------------------------------------- BUSI / folder / CSV


def read_busi(path: Path, spec: str, opts: ReadOptions) -> SiteData:
    """BUSI layout: ``{benign,malignant,normal}/NAME.png`` + ``NAME_mask.png`` (+ ``NAME_mask_1.png``...).

    ``path`` is ``Dataset_BUSI_with_GT`` or a folder holding it. ``Sample.group`` is the
    near-duplicate group (identical or near-identical pixels, see :mod:`echocare.data.dedup`).
    """
    from echocare.data.dedup import assign_near_duplicate_groups

    root = require_dir(path, "busi")
    if not any((root / c).is_dir() for c in BUSI_CLASSES) and (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    if not any((root / c).is_dir() for c in BUSI_CLASSES):
        raise ValueError(f"busi: {root} has none of the class folders {', '.join(BUSI_CLASSES)}")
    problems: list[Problem] = []
    profiles = _phantom_profiles(root)
    samples: list[Sample] = []
    for c in BUSI_CLASSES:
        if (root / c).is_dir():
            samples += list_class_folder(root, root / c, problems, profiles)
        else:
            problems.append(Problem(str(root / c), "class folder missing"))
    data = SiteData(spec, list(BUSI_CLASSES), select_limit(samples, opts.limit, opts.seed), problems, "classify")
    assign_near_duplicate_groups(data)
    return data


def read_folder(path: Path, spec: str, opts: ReadOptions) -> SiteData:
    """One sub-folder per class, images inside (recursively); optional ``NAME_mask*.png`` masks."""
    root = require_dir(path, "folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"folder: {root} has no class sub-folders (expected {root}/CLASS/IMAGE.png)")
    problems: list[Problem] = []
    profiles = _phantom_profiles(root)
    samples = [s for d in class_dirs for s in list_class_folder(root, d, problems, profiles)]
    return SiteData(spec, [d.name for d in class_dirs], select_limit(samples, opts.limit, opts.seed), problems, "classify")


def read_csv_manifest(path: Path, spec: str, opts: ReadOptions) -> SiteData:
    """A CSV with columns ``path,label`` and optionally ``mask`` (``;`` between several), ``group``
    and ``patient``.

    Paths are relative to the CSV's folder. An empty label means unlabeled. ``patient`` (a
    pseudonym; it never leaves the site) goes to ``meta["patient"]`` and into the group, so a
    patient's images stay in one split and the site can give per-patient DP (docs/privacy.md).
    """
    if not path.is_file():
        raise FileNotFoundError(f"csv: manifest not found: {path}")
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ValueError(f"csv: {path} lacks column(s) {missing}; needs path,label[,mask][,group], has {list(columns)}")
        rows = list(reader)
    samples = []
    problems: list[Problem] = []
    for n, row in enumerate(rows, start=2):
        rel = (row.get(columns["path"]) or "").strip()
        if not rel:
            problems.append(Problem(f"{path} line {n}", "empty path: row skipped"))
            continue
        label = (row.get(columns["label"]) or "").strip() or None
        mask_field = (row.get(columns["mask"]) or "").strip() if "mask" in columns else ""
        group = (row.get(columns["group"]) or "").strip() or None if "group" in columns else None
        patient = (row.get(columns["patient"]) or "").strip() if "patient" in columns else ""
        mask_paths = [base / m.strip() for m in mask_field.split(";") if m.strip()]
        samples.append(Sample(rel, label, image_loader(base / rel), mask_loader(mask_paths),
                              f"patient:{patient}" if patient else group, {"patient": patient} if patient else {}))
    labels = sorted({s.label for s in samples if s.label is not None})
    has_masks = any(s.load_mask for s in samples)
    hint = "classify" if labels else ("segment" if has_masks else None)
    return SiteData(spec, labels, select_limit(samples, opts.limit, opts.seed), problems, hint)


# ----------------------------------------------------------------------------- HC18

HC18_CSV = "training_set_pixel_size_and_HC.csv"
HC18_COLUMNS = ("filename", "pixel size(mm)", "head circumference (mm)")


def fill_outline(outline: np.ndarray) -> np.ndarray:
    """A drawn convex outline (e.g. HC18's 1-pixel ellipse) -> filled uint8 {0, 255} mask.

    The filled region is the convex hull of the outline pixels. This is exact for a closed
    ellipse, and also for one cut by the image border (the hull then closes along the border).
    """
    outline = np.asarray(outline) > 0
    n = int(outline.sum())
    if n < 3:
        raise ValueError(f"outline has {n} pixels, need at least 3")
    # The hull of all outline pixels is the hull of each row's leftmost and rightmost pixel.
    rows = np.nonzero(outline.any(axis=1))[0]
    left = outline[rows].argmax(axis=1)
    right = outline.shape[1] - 1 - outline[rows, ::-1].argmax(axis=1)
    hull = _convex_hull(np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]))
    if len(hull) < 3:
        raise ValueError("outline pixels are collinear")
    canvas = Image.new("L", (outline.shape[1], outline.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(int, p)) for p in hull], fill=255, outline=255)
    filled = np.asarray(canvas).copy()
    filled[outline] = 255
    return filled


def _convex_hull(points: np.ndarray) -> list[tuple[int, int]]:
    """Andrew's monotone chain; counter-clockwise, no repeated end point."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return pts

    def cross(o, a, b) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _hc18_mask(annotation: Path) -> np.ndarray:
    outline = read_image(annotation)
    if outline.ndim == 3:
        outline = outline.max(axis=2)
    try:
        return fill_outline(outline > 127)
    except ValueError as e:
        raise UnreadableImage(annotation, f"cannot fill the head outline: {e}") from None


def read_hc18(path: Path, spec: str, opts: ReadOptions) -> SiteData:
    """HC18 training set: ``training_set/NNN_HC.png`` + ``NNN_HC_Annotation.png`` and the CSV.

    ``path`` is the HC18 folder (holding ``training_set/`` and the CSV) or ``training_set``
    itself. Meta: ``pixel_size_mm``, ``hc_mm``. Group: the patient (``010_HC`` and ``010_2HC``
    are one pregnancy).
    """
    root = require_dir(path, "hc18")
    if (root / "training_set").is_dir():
        images_dir = root / "training_set"
    else:
        images_dir = root
    table = next((p for p in (root / HC18_CSV, images_dir / HC18_CSV, images_dir.parent / HC18_CSV) if p.is_file()), None)
    if table is None:
        raise FileNotFoundError(f"hc18: {HC18_CSV} not found in {root} (nor beside {images_dir})")
    rows: dict[str, tuple[float, float]] = {}
    problems: list[Problem] = []
    reported: set[str] = set()  # images whose row was bad (reported once, not again as "no row")
    with table.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in HC18_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"hc18: {table} lacks column(s) {missing}; has {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            name = (row["filename"] or "").strip()
            where = str(images_dir / name) if name else f"{table} line {n}"
            try:
                if not name:
                    raise ValueError("empty filename")
                pixel_mm, hc_mm = float(row["pixel size(mm)"]), float(row["head circumference (mm)"])
                if not (math.isfinite(pixel_mm) and pixel_mm > 0 and math.isfinite(hc_mm) and hc_mm > 0):
                    raise ValueError(f"pixel size {pixel_mm} mm and head circumference {hc_mm} mm must be positive numbers")
            except (ValueError, TypeError) as e:  # TypeError: a short row (None for a missing cell)
                problems.append(Problem(where, f"{table.name} line {n}: {e}; skipped"))
                reported.add(name)
                continue
            if name in rows:
                problems.append(Problem(where, f"{table.name} line {n}: second row for this image; the first is kept"))
                continue
            rows[name] = (pixel_mm, hc_mm)
    samples = []
    on_disk = {p.name for p in images_dir.glob("*HC.png")}
    for name in sorted(on_disk - set(rows) - reported):
        problems.append(Problem(str(images_dir / name), f"no row in {table.name}: pixel size and HC unknown"))
    for name in sorted(rows):
        pixel_mm, hc_mm = rows[name]
        img = images_dir / name
        annotation = img.with_name(img.stem + "_Annotation.png")
        patient = re.match(r"^(\d+)", name)
        samples.append(
            Sample(
                name,
                None,
                image_loader(img),
                (lambda a=annotation: _hc18_mask(a)),
                f"patient-{patient.group(1)}" if patient else name,
                {"pixel_size_mm": pixel_mm, "hc_mm": hc_mm, **({"patient": patient.group(1)} if patient else {})},
            )
        )
    return SiteData(spec, [], select_limit(samples, opts.limit, opts.seed), problems, "hc")


# ----------------------------------------------------------------------------- POCUS

POCUS_DEFAULT_FRAMES = 8


def read_pocus(path: Path, spec: str, opts: ReadOptions) -> SiteData:
    """POCUS lung ultrasound: clips and stills listed in ``manifest.tsv`` (``path``, ``label``, ``probe``...).

    Each clip gives ``frames`` evenly spaced frames (default 8), all in one group (the clip), so
    frames of a clip never land on both sides of a split. Meta: ``probe``, ``source_id``,
    ``license``, ``media`` (video/image), ``frame`` and ``n_frames`` for clips.
    """
    root = require_dir(path, "pocus")
    manifest = root / "manifest.tsv"
    if not manifest.is_file():
        raise FileNotFoundError(f"pocus: manifest not found: {manifest} (needs columns path, label)")
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"pocus: {manifest} needs columns path and label, has {reader.fieldnames}")
        rows = list(reader)
    k = POCUS_DEFAULT_FRAMES if opts.frames is None else opts.frames
    decoder = ClipFrames()
    problems: list[Problem] = []
    items: list[Sample] = []  # one per file first, so that ``limit`` picks whole files
    for n, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            problems.append(Problem(f"{manifest} line {n}", "empty path: row skipped"))
            continue
        file = root / rel
        meta = {
            "probe": (row.get("probe") or "").strip() or None,
            "source_id": (row.get("source_id") or "").strip() or None,
            "license": (row.get("license") or "").strip() or None,
            "media": "video" if file.suffix.lower() in VIDEO_SUFFIXES else "image",
        }
        items.append(Sample(rel, (row.get("label") or "").strip() or None, image_loader(file), None, rel, meta))
    items = select_limit(items, opts.limit, opts.seed)  # limit counts files here: a clip's frames stay together
    samples: list[Sample] = []
    for item in items:
        file = root / item.key
        if item.meta["media"] == "image":
            samples.append(item)
            continue
        try:
            n = count_frames(file)
        except UnreadableImage as e:
            problems.append(Problem(e.path, e.reason))
            continue
        wanted = tuple(evenly_spaced(n, k))
        for i in wanted:
            samples.append(
                Sample(
                    f"{item.key}#{i}",
                    item.label,
                    (lambda f=file, i=i, w=wanted: decoder.frame(f, i, w)),
                    None,
                    item.key,
                    {**item.meta, "frame": i, "n_frames": n},
                )
            )
    classes = sorted({s.label for s in items if s.label is not None})  # a class whose clips all fail stays listed
    return SiteData(spec, classes, samples, problems, "classify")
