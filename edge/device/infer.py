"""Run a loaded bundle on files a scanner hands over; one result per file (``echofleet edge infer``).

Torch-free. Each file goes through :func:`edge.device.inputs.read_frames` (stills, DICOM, clips);
a file that cannot be decoded becomes a result with an ``error`` (the others still run).

- classify: ``probabilities`` (mean over a clip's frames), ``label``, and ``per_frame_labels``
  for clips;
- segment / hc: a mask PNG per frame, at the input's own size, written to ``masks_dir``
  (``<stem>[_f<frame>]_mask.png``, crash-safe), its ``foreground_fraction``, and for hc the head
  circumference ``hc_mm`` when the pixel size is known.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from echocare.atomic import atomic_write_bytes
from echocare.data.base import UnreadableImage
from edge.device.inputs import Frame, read_frames
from edge.device.runtime import BundleRuntime


@dataclass
class InferResults:
    """One dict per input file, in order; ``failed`` counts the files that could not be read."""

    results: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if "error" in r]

    @property
    def succeeded(self) -> list[dict]:
        return [r for r in self.results if "error" not in r]


def infer_files(rt: BundleRuntime, paths: list[Path], *, masks_dir: Path, pixel_mm: float | None = None,
                max_frames: int = 16) -> InferResults:
    """Run ``rt`` on every file of ``paths`` (see the module docstring for what a result holds)."""
    out = InferResults()
    for path in paths:
        try:
            frames = read_frames(path, max_frames=max_frames)
        except UnreadableImage as e:
            out.results.append({"input": str(path), "error": e.reason})
            continue
        preds = rt.predict([f.image for f in frames], pixel_mm=[f.pixel_mm or pixel_mm for f in frames])
        out.results.append(_summarise(rt.task, Path(path), frames, preds, masks_dir))
    return out


def write_mask_png(mask: np.ndarray, path: Path) -> Path:
    """A {0,1} mask as an 8-bit PNG (0 / 255), written atomically."""
    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _summarise(task: str, path: Path, frames: list[Frame], preds: list[dict], masks_dir: Path) -> dict:
    """One result per input file (clips: mean probabilities / per-frame masks)."""
    r: dict = {"input": str(path), "frames": len(frames)}
    if task == "classify":
        labels = list(preds[0]["probabilities"])
        mean = np.mean([[p["probabilities"][k] for k in labels] for p in preds], axis=0)
        r["probabilities"] = {k: float(v) for k, v in zip(labels, mean)}
        r["label"] = labels[int(np.argmax(mean))]
        if len(preds) > 1:
            r["per_frame_labels"] = [p["label"] for p in preds]
        return r
    masks_dir.mkdir(parents=True, exist_ok=True)
    r["masks"], r["foreground_fraction"] = [], []
    for f, p in zip(frames, preds):
        suffix = f"_f{f.frame}" if f.frame is not None else ""
        png = write_mask_png(p["mask"], masks_dir / f"{path.stem}{suffix}_mask.png")
        r["masks"].append(str(png))
        r["foreground_fraction"].append(p["foreground_fraction"])
    if task == "hc":
        r["hc_mm"] = [p.get("hc_mm") for p in preds]
        if all(v is None for v in r["hc_mm"]):
            r["note"] = "no pixel size: pass --pixel-mm (or use DICOM with an ultrasound calibration region) for HC in mm"
    return r
