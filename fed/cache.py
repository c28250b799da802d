"""Site-side feature cache: the frozen encoder runs once per image, later rounds read from disk.

Entries are keyed by (the sha256 the site computes of its own encoder checkpoint, or the seeded
random-init config; see ``fed.features.site_encoder_key``) + preprocessing spec digest +
what is cached (e.g. pooled features, or the maps a segmentation decoder needs) — the cache folder
name — and, inside, by the hash of each image's decoded pixels. Changing the encoder, the
preprocessing or the image changes the key, so stale features are never read.

Storage is compact and bounded in memory: float16 ``.npy`` shards opened memory-mapped. A shard is
written to a temporary folder, fsynced, then renamed into place, so a crash mid-write leaves no
partial entry that could later be read; a damaged shard is detected (shape/row-count check),
reported and recomputed.

Privacy meaning: features are derived from patient images and never leave the site; this folder
belongs to the hospital's state directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from echocare.atomic import fsync_dir

log = logging.getLogger(__name__)


def image_hash(img: np.ndarray) -> str:
    """Content hash of decoded pixels (format independent: same pixels, same key)."""
    a = np.ascontiguousarray(img)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fsync_dir(path)
    except OSError:  # some filesystems cannot fsync a folder; the rename itself is still atomic
        pass


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0
    corrupt_shards: list[str] = field(default_factory=list)


class FeatureCache:
    """Features for one (encoder, preprocessing, kind) key, stored under ``root/<key>/shard-*/``."""

    def __init__(self, root: str | Path, key: str, shard_rows: int = 256):
        self.dir = Path(root) / key
        self.shard_rows = shard_rows
        self.stats = CacheStats()
        self._index: dict[str, tuple[Path, int]] = {}
        self._load_index()

    # -- reading -------------------------------------------------------------------------------
    def _load_index(self) -> None:
        self._index.clear()
        if not self.dir.exists():
            return
        for shard in sorted(self.dir.glob("shard-*")):
            try:
                keys = json.loads((shard / "index.json").read_text())
                for name in json.loads((shard / "arrays.json").read_text()):
                    arr = np.load(shard / f"{name}.npy", mmap_mode="r")
                    if arr.shape[0] != len(keys):
                        raise ValueError(f"{name}.npy has {arr.shape[0]} rows for {len(keys)} keys")
            except Exception as e:  # any damage: drop the shard, it will be recomputed
                log.warning("feature cache shard %s is damaged (%s); it will be recomputed", shard, e)
                self.stats.corrupt_shards.append(str(shard))
                shutil.rmtree(shard, ignore_errors=True)
                continue
            for row, k in enumerate(keys):
                self._index[k] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def read(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Stack the cached arrays for ``keys`` (in order). Reads only those rows from the mmaps."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            shard, row = self._index[k]
            by_shard.setdefault(shard, []).append((i, row))
        out: dict[str, np.ndarray] = {}
        for shard, pairs in by_shard.items():
            names = json.loads((shard / "arrays.json").read_text())
            for name in names:
                arr = np.load(shard / f"{name}.npy", mmap_mode="r")
                if name not in out:
                    out[name] = np.empty((len(keys), *arr.shape[1:]), arr.dtype)
                idx = np.array([p[0] for p in pairs])
                rows = np.array([p[1] for p in pairs])
                out[name][idx] = arr[rows]
        return out

    # -- writing -------------------------------------------------------------------------------
    def write_shard(self, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Atomically add one shard (temp folder, fsync, rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, arr in arrays.items():
                if arr.shape[0] != len(keys):
                    raise ValueError(f"array {name} has {arr.shape[0]} rows for {len(keys)} keys")
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, arr)
                    f.flush()
                    os.fsync(f.fileno())
            for fname, obj in (("arrays.json", sorted(arrays)), ("index.json", keys)):
                with open(tmp / fname, "w") as f:
                    json.dump(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
            final = self.dir / f"shard-{uuid.uuid4().hex}"
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for row, k in enumerate(keys):
            self._index[k] = (final, row)

    def ensure(self, items: Iterable[tuple[str, np.ndarray]], compute: Callable[[list[np.ndarray]], dict[str, np.ndarray]],
               batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> None:
        """Compute and store what is missing. ``items`` yields (key, image); ``compute`` maps a list
        of images to {name: array with one row per image} (stored as float16 unless integer or the
        name starts with ``f32_``)."""
        pending_keys: list[str] = []
        pending_imgs: list[np.ndarray] = []
        buf_keys: list[str] = []
        buf: dict[str, list[np.ndarray]] = {}

        def flush_compute() -> None:
            if not pending_imgs:
                return
            out = compute(pending_imgs)
            for name, arr in out.items():
                arr = np.asarray(arr)
                if arr.dtype.kind == "f" and not name.startswith("f32_"):
                    arr = arr.astype(np.float16)
                buf.setdefault(name, []).append(arr)
            buf_keys.extend(pending_keys)
            self.stats.computed += len(pending_imgs)
            if on_batch:
                on_batch(len(pending_imgs))
            pending_keys.clear()
            pending_imgs.clear()

        def flush_shard() -> None:
            if buf_keys:
                self.write_shard(list(buf_keys), {n: np.concatenate(v) for n, v in buf.items()})
                buf_keys.clear()
                buf.clear()

        seen: set[str] = set()
        for key, img in items:
            if key in self._index or key in seen:
                self.stats.hits += 1
                if on_batch:
                    on_batch(1)
                continue
            seen.add(key)
            pending_keys.append(key)
            pending_imgs.append(img)
            if len(pending_imgs) >= batch_size:
                flush_compute()
                if len(buf_keys) >= self.shard_rows:
                    flush_shard()
        flush_compute()
        flush_shard()
