"""Helpers the benchmark scripts share: timed steps, and disjoint parts of one data pool."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from rich.console import Console

T = TypeVar("T")


class Steps:
    """Run named steps with a spinner, print and remember how long each took (``timings``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        t = time.perf_counter()
        with self.console.status(name):
            out = fn()
        self.timings[name] = time.perf_counter() - t
        self.console.print(f"{name}: {self.timings[name]:.0f} s")
        return out


def split_pool(pool_spec: str, train: int, calib: int, val: int, seed: int = 0):
    """(site, {"train", "calib", "val"}) from one pool, disjoint by image key and by group (patient,
    near-duplicates; checked), so no figure is measured on an image the model was fitted or calibrated on."""
    from echocare.data import open_data
    from echocare.data.split import split_train_val

    site = open_data(pool_spec)
    total = train + calib + val
    rest, val_d = split_train_val(site, val_fraction=val / total, seed=seed)
    train_d, cal_d = split_train_val(rest, val_fraction=calib / (train + calib), seed=seed + 1)
    parts = {"train": train_d, "calib": cal_d, "val": val_d}
    keys = {k: {s.key for s in d.samples} for k, d in parts.items()}
    groups = {k: {s.group or s.key for s in d.samples} for k, d in parts.items()}
    for a, b in (("train", "calib"), ("train", "val"), ("calib", "val")):
        if keys[a] & keys[b] or groups[a] & groups[b]:
            raise RuntimeError(f"{a} and {b} overlap: keys {sorted(keys[a] & keys[b])[:5]}, groups {sorted(groups[a] & groups[b])[:5]}")
    return site, parts
