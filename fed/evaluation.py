"""Evaluate a task model on any data spec — a plain function that runs wherever the data is.

Used by ``echofleet evaluate`` and by sites for acceptance checks. Returns the task's metrics:
``auroc`` and ``balanced_accuracy`` (classify), ``dice`` (segment, hc), ``hc_mae_mm`` (hc).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from echocare.data.base import SiteData, UnreadableImage
from echocare.preprocess import PreprocessSpec, apply_geometry_to_mask, preprocess_image


def evaluate_model(model, spec, data: SiteData, batch_size: int = 16, progress=None) -> dict:
    """Run ``model`` (a TaskModel) over ``data``; unreadable images are skipped and counted."""
    import torch

    from echocare.metrics import auroc_macro_ovr, balanced_accuracy, dice, hc_mae_mm

    pp = PreprocessSpec.from_dict(spec.preprocess) if spec.preprocess else PreprocessSpec()
    index = {name: i for i, name in enumerate(spec.labels)}
    outs, ys, masks, pred_hc, true_hc, skipped = [], [], [], [], [], 0
    batch, geoms, samples = [], [], []

    def flush():
        if not batch:
            return
        with torch.inference_mode():
            o = model(torch.from_numpy(np.stack(batch))).float()
        if spec.task == "classify":
            outs.append(torch.softmax(o, 1).numpy())
        else:
            pred = o.argmax(1).numpy().astype(np.uint8)
            for p, g, s in zip(pred, geoms, samples):
                m = s.mask()
                masks.append((p, None if m is None else apply_geometry_to_mask(m, g)))
                if spec.task == "hc" and "pixel_size_mm" in s.meta:
                    from echocare.hc import measured_hc_mm

                    pred_hc.append(measured_hc_mm(p, g.output_pixel_mm(float(s.meta["pixel_size_mm"]))))
                    true_hc.append(float(s.meta["hc_mm"]))
        batch.clear(), geoms.clear(), samples.clear()

    for s in data.samples:
        if spec.task == "classify" and s.label not in index:
            skipped += 1
            continue
        try:
            x, g = preprocess_image(s.image(), pp)
        except UnreadableImage:
            skipped += 1
            continue
        batch.append(x), geoms.append(g), samples.append(s)
        if spec.task == "classify":
            ys.append(index[s.label])
        if len(batch) >= batch_size:
            flush()
        if progress:
            progress(1)
    flush()
    result: dict = {"n": len(ys) if spec.task == "classify" else len(masks), "skipped": skipped}
    if spec.task == "classify" and ys:
        probs = np.concatenate(outs)
        y = np.array(ys)
        result["auroc"] = float(auroc_macro_ovr(y, probs, len(spec.labels)))
        result["balanced_accuracy"] = float(balanced_accuracy(y, probs.argmax(1)))
    elif masks:
        pairs = [(p, t) for p, t in masks if t is not None]
        if pairs:
            result["dice"] = float(dice(np.stack([p for p, _ in pairs]) > 0, np.stack([t for _, t in pairs]) > 0))
        if pred_hc:
            result["hc_mae_mm"] = float(hc_mae_mm(np.array(pred_hc), np.array(true_hc)))
    return result


def evaluate_run(run_dir: str | Path, data_spec: str, progress=None) -> dict:
    """Load ``RUN_DIR/global`` (or a task-model directory) and evaluate it on ``data_spec``."""
    from echocare.data import open_data
    from echocare.models.task_model import load_task_model

    path = Path(run_dir)
    model_dir = path / "global" if (path / "global" / "model.json").exists() else path
    if not (model_dir / "model.json").exists():
        raise FileNotFoundError(f"{run_dir}: no global model (expected {path / 'global' / 'model.json'})")
    model, spec = load_task_model(model_dir)
    model.eval()
    return evaluate_model(model, spec, open_data(data_spec), progress=progress)
