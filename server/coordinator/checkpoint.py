"""Round checkpoints of the coordinator: safetensors weights + JSON state, written atomically.

Layout::

    RUN_DIR/checkpoints/round-0003/weights.safetensors    global head after round 3
    RUN_DIR/checkpoints/round-0003/strategy.safetensors   strategy arrays (FedAdam moments), if any
    RUN_DIR/checkpoints/round-0003/state.json             round, strategy, metrics, privacy ledger, config hash
    RUN_DIR/checkpoints/LATEST                            "round-0003"

A round folder is written under a temporary name and renamed; LATEST is replaced last. A crash at
any point leaves the previous completed round as the resume point.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def config_hash(config: dict) -> str:
    """Hash of the run config fields that change the result (resume refuses a different one)."""
    ignored = {"resume", "run-dir", "sim-sites-dir", "public-cache-dir"}
    return hashlib.sha256(json.dumps({k: config[k] for k in sorted(config) if k not in ignored},
                                     sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path)) if path.exists() else {}


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    state: dict


class CheckpointStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "checkpoints"

    def save(self, rnd: int, weights: dict[str, np.ndarray], strategy_arrays: dict[str, np.ndarray], state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"round-{rnd:04d}"
        tmp = self.dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        _save_arrays(tmp / "weights.safetensors", weights)
        if strategy_arrays:
            _save_arrays(tmp / "strategy.safetensors", strategy_arrays)
        (tmp / "state.json").write_text(json.dumps({"round": rnd, **state}, indent=1, default=float))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.dir / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = self.dir / f".LATEST-{uuid.uuid4().hex[:8]}"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, self.dir / "LATEST")
        return final

    def latest(self) -> Checkpoint | None:
        marker = self.dir / "LATEST"
        if not marker.exists():
            return None
        d = self.dir / marker.read_text().strip()
        state = json.loads((d / "state.json").read_text())
        return Checkpoint(int(state["round"]), _load_arrays(d / "weights.safetensors"),
                          _load_arrays(d / "strategy.safetensors"), state)
