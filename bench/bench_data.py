"""Data-layer speed, as ratios measured side by side in one run.

1. Crop region search: the run-based connected-component labelling in
   :func:`echocare.preprocess._largest_component` vs. the pixel-by-pixel breadth-first search it
   replaced (kept below as the baseline), on the foreground masks of real frames (phantoms when
   ../shared/data is absent). Both must return the same region.
2. Phantom generation: milliseconds per image per profile vs. the 20 ms goal.
3. Whole preprocessing (decode excluded) per image, for scale.

Absolute numbers depend on the machine and on what else runs on it (the dev box is shared)::

    .venv/bin/python bench/bench_data.py
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from rich.console import Console
from rich.table import Table

from echocare.phantom import CLASSES, PROFILES, PhantomGenerator, generate
from echocare.preprocess import PreprocessSpec, _largest_component, preprocess_image, to_gray_uint8

SHARED = Path(os.environ.get("ECHOFLEET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PHANTOM_GOAL_MS = 20.0


def bfs_largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The baseline: per-pixel BFS labelling (the first implementation of the crop)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_n, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        cur += 1
        labels[y0, x0] = cur
        n, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            n += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = cur
                    queue.append((yy, xx))
        if n > best_n:
            best, best_n = cur, n
    return None if best == 0 else labels == best


def search_masks(images: list[np.ndarray], spec: PreprocessSpec) -> list[np.ndarray]:
    """The small closed foreground masks the crop searches (same steps as find_image_region)."""
    out = []
    for img in images:
        gray = to_gray_uint8(img)
        h, w = gray.shape
        f = min(1.0, spec.crop_search_px / max(h, w))
        small = Image.fromarray(gray).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX)
        small = small.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
        out.append(np.asarray(small) > spec.crop_threshold)
    return out


def sample_images() -> tuple[str, list[np.ndarray]]:
    files = sorted((SHARED / "busi" / "Dataset_BUSI_with_GT" / "benign").glob("*).png"))[:20]
    files += sorted((SHARED / "hc18" / "training_set").glob("*HC.png"))[:20]
    if files:
        return "BUSI + HC18 frames", [np.asarray(Image.open(p)) for p in files]
    return "phantoms", [generate(i, list(PROFILES)[i % 3], CLASSES[i % 3]).image for i in range(40)]


def timed(fn, items, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return best / len(items)


def main() -> None:
    console = Console()
    spec = PreprocessSpec()
    source, images = sample_images()
    masks = search_masks(images, spec)
    for m in masks:
        a, b = _largest_component(m), bfs_largest_component(m)
        assert (a is None and b is None) or np.array_equal(a, b), "run-based labelling disagrees with BFS"
    t_runs = timed(_largest_component, masks)
    t_bfs = timed(bfs_largest_component, masks, repeat=1)
    t_pre = timed(lambda im: preprocess_image(im, spec), images)

    table = Table(title=f"crop region search on {len(masks)} {source}")
    for col in ("method", "ms / image", "speed-up vs BFS"):
        table.add_column(col, justify="right")
    table.add_row("BFS per pixel (baseline)", f"{t_bfs * 1e3:.2f}", "1.0x")
    table.add_row("run-based union-find", f"{t_runs * 1e3:.2f}", f"{t_bfs / t_runs:.1f}x")
    table.add_row("whole preprocess_image", f"{t_pre * 1e3:.2f}", "")
    console.print(table)

    ph = Table(title=f"phantom generation (goal {PHANTOM_GOAL_MS:.0f} ms / image)")
    for col in ("profile", "frame", "ms / image", "goal / measured"):
        ph.add_column(col, justify="right")
    for name, p in PROFILES.items():
        make = PhantomGenerator()
        make(0, name, "benign")  # warm-up (and the profile's scan conversion map)
        t = timed(lambda i: make(i, name, CLASSES[i % 3]), list(range(15)), repeat=1)
        ph.add_row(name, f"{p.frame_hw[0]}x{p.frame_hw[1]}", f"{t * 1e3:.1f}", f"{PHANTOM_GOAL_MS / (t * 1e3):.2f}")
    console.print(ph)


if __name__ == "__main__":
    main()
