"""INT8 accuracy drop of a *segmentation* task model (issue 4: "Dice drop at most 0.01").

What it measures (all on this machine, in this process): how much foreground Dice a ``segment``
task model loses when its exported ONNX graph is quantized to INT8 with NNCF (OpenVINO), and
optionally with ONNX Runtime QDQ U8S8, against the same FP32 graph on OpenVINO f32, on held-out
real HC18 fetal-head images (the filled head outline is the mask).

1. one pool of HC18 images (``hc18:PATH?limit=train+calib+val&seed=S``) is split into train,
   calibration and validation with :func:`echocare.data.split.split_train_val` (whole patients,
   near-duplicates kept together); the three key sets and patient sets are checked disjoint;
2. a ``segment`` head (variant ``light``: encoder maps 2, 3, 4) is trained, non-DP (noise 0,
   Adam, MONAI Dice + cross-entropy per image: :func:`fed.dp.train_head` + ``MapsHead`` +
   ``PerImageSegLoss``, as a federation round does), on the maps of the FROZEN encoder
   (seeded random init ``load_encoder(config, None, seed=0)``: no pretrained EchoCare weights
   are available offline, so absolute Dice is far below what EchoCare's pretrained encoder gives;
   the FP32-vs-INT8 *drop* is what is measured);
3. the task model is saved, exported to ONNX (parity-checked), quantized from the calibration
   images, and FP32 vs INT8 are evaluated on the validation images with
   :func:`edge.build.evaluate.metrics_from_outputs`; :func:`edge.build.gate.check_gate` gives the drop and the
   verdict (Dice bound 0.01; the HC MAE gate, bound 1 mm, is shown for information).

Also printed: an all-foreground baseline Dice (to show what the head learned beyond "predict
everything"), pixel agreement and Dice between the FP32 and INT8 masks, and the standard error
of the paired per-image Dice differences (how much of the drop is sampling noise).

Run it (from the repo root; data from ``$ECHOFLEET_SHARED_DATA``, default ``../shared/data``)::

    .venv/bin/python bench/bench_edge_segment.py --config echocare-tiny --train 24 --val 16 --calib 8 --epochs 10   # quick look, ~1 min
    .venv/bin/python bench/bench_edge_segment.py --json-out /tmp/seg_bench.json   # full echocare config

The full config takes about 15-25 minutes on 2 CPU cores (encoder maps in PyTorch ~1.6 s/image,
ONNX export + parity 1-2 min, NNCF 3-5 min, ORT QDQ several more; ``--no-qdq`` skips it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common import Steps, split_pool

SHARED = Path(os.environ.get("ECHOFLEET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HC18 = SHARED / "hc18"
LABELS = ["background", "head"]
console = Console(highlight=False, width=170)


def encoder_maps(config: str, train_d, work: Path):
    """(maps the light head needs, masks (N, S, S) {0, 1}) of the training images, from the frozen encoder
    (PyTorch, via the federation's feature cache :func:`fed.features.map_features`)."""
    from echocare.models.heads import build_head
    from echocare.preprocess import PreprocessSpec
    from fed.features import EncoderRef, map_features

    head = build_head("segment", config, len(LABELS), variant="light")
    arrays, kept = map_features(train_d, EncoderRef(config, None, None, 0), PreprocessSpec(), work / "features",
                                tuple(head.needs), bool(head.needs_image))
    if len(kept) != len(train_d):
        raise RuntimeError(f"{len(train_d) - len(kept)} training images unreadable: {train_d.problems[-3:]}")
    xs = tuple(np.asarray(arrays[f"map{i}"], np.float32) for i in head.needs)
    return xs, (np.asarray(arrays["mask"]) > 0).astype(np.int64)


def train_segment_head(config: str, maps: tuple, masks: np.ndarray, epochs: int, lr: float, batch: int, seed: int):
    """A light ``segment`` head trained (non-DP: noise 0, Adam) on cached maps; returns (head, train Dice, stats)."""
    import torch

    from echocare import metrics as M
    from echocare.models.heads import build_head
    from fed.dp import DPConfig, MapsHead, PerImageSegLoss, train_head

    torch.manual_seed(seed)
    head = build_head("segment", config, len(LABELS), variant="light")
    xs = tuple(torch.from_numpy(m) for m in maps)
    y = torch.from_numpy(masks)
    model = MapsHead(head)
    stats = train_head(model, xs, y, DPConfig(epochs=epochs, batch_size=batch, lr=lr, noise_multiplier=0.0,
                                              optimizer="adam", seed=seed), loss_fn=PerImageSegLoss())
    head.eval()
    with torch.no_grad():
        pred = torch.cat([model(*(x[i:i + 16] for x in xs)).argmax(1) for i in range(0, len(y), 16)])
    return head, float(M.dice(pred.numpy(), y.numpy())), stats


def per_image_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from echocare import metrics as M

    return np.array([M.dice(p, t) for p, t in zip(pred, truth)])


def main(
    config: str = typer.Option("echocare", help="Encoder config (echocare | echocare-small | echocare-tiny)."),
    train: int = typer.Option(80, help="HC18 images to train the segmentation head on."),
    val: int = typer.Option(60, help="Held-out HC18 images for the accuracy gate."),
    calib: int = typer.Option(32, help="HC18 calibration images for INT8 quantization (disjoint from train and val)."),
    epochs: int = typer.Option(40, help="Head training epochs (non-DP, Adam)."),
    lr: float = typer.Option(3e-3, help="Head learning rate."),
    batch: int = typer.Option(8, help="Head training batch size."),
    seed: int = typer.Option(0, help="Seed of the HC18 pool selection, the split and the head init."),
    qdq: bool = typer.Option(True, help="Also quantize with ONNX Runtime QDQ U8S8 and evaluate it."),
    json_out: Optional[Path] = typer.Option(None, help="Write all numbers to this JSON file."),
) -> None:
    from dataclasses import asdict

    from echocare.models.heads import head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model
    from echocare.preprocess import PreprocessSpec
    from edge.device import postprocess as post
    from edge.device.backends import open_session
    from edge.build.evaluate import load_eval_set, metrics_from_outputs, predict_all
    from edge.build.export import export_task_model
    from edge.build.gate import check_gate
    from edge.build.quantize import QuantizeConfig, quantize

    if not (HC18 / "training_set").is_dir():
        console.print(f"[red]HC18 not found at {HC18}[/] (set ECHOFLEET_SHARED_DATA)")
        raise typer.Exit(2)
    work = Path(tempfile.mkdtemp(prefix="bench-edge-seg-"))
    t_all = time.perf_counter()
    timed = Steps(console)
    timings = timed.timings

    console.print(f"config {config}; encoder = seeded random init (load_encoder({config!r}, None, seed=0)): "
                  "no pretrained EchoCare weights offline, so absolute Dice is low; the FP32 -> INT8 drop is the measurement")
    pre = PreprocessSpec()
    pool_spec = f"hc18:{HC18}?limit={train + calib + val}&seed={seed}"
    site, parts = timed("split HC18 pool (patients, near-duplicates)", lambda: split_pool(pool_spec, train, calib, val, seed))
    console.print(f"pool {pool_spec}: train {len(parts['train'])}, calib {len(parts['calib'])}, val {len(parts['val'])} images; "
                  f"keys and patients pairwise disjoint (checked)")

    # All pool images preprocessed once (hc task: masks + hc_mm + pixel size), then cut by key.
    ev_all = timed("load + preprocess pool", lambda: load_eval_set(pool_spec, "hc", LABELS, pre))
    if len(ev_all) != len(site.samples) or ev_all.masks is None:
        raise RuntimeError(f"{len(site.samples) - len(ev_all)} pool images unusable: {[p.reason for p in ev_all.problems][:3]}")
    if not np.array_equal(ev_all.hc_mm, [s.meta["hc_mm"] for s in site.samples]):
        raise RuntimeError("the preprocessed pool is not aligned with the pool's samples")
    row = {s.key: i for i, s in enumerate(site.samples)}
    idx = {k: np.array([row[s.key] for s in d.samples]) for k, d in parts.items()}
    ev = replace(ev_all, inputs=ev_all.inputs[idx["val"]], masks=ev_all.masks[idx["val"]],
                 hc_mm=ev_all.hc_mm[idx["val"]], pixel_mm=ev_all.pixel_mm[idx["val"]], problems=[])
    cal = ev_all.inputs[idx["calib"]]

    maps, train_masks = timed("encoder maps (torch, train images)", lambda: encoder_maps(config, parts["train"], work))
    head, train_dice, stats = timed("train head", lambda: train_segment_head(config, maps, train_masks, epochs, lr, batch, seed))
    console.print(f"head trained: {stats['steps']} steps, final-epoch mean loss {stats['loss']:.3f}, train Dice {train_dice:.4f}")
    spec = TaskModelSpec(config, None, None, 0, "segment", LABELS, head_kwargs_of(head),
                         provenance={"bench": f"light segment head trained non-DP on {len(parts['train'])} HC18 images "
                                              f"({epochs} epochs, Adam lr {lr}); encoder seeded random init"})
    model_dir = work / "model"
    save_task_model(model_dir, spec, head.state_dict())
    exp = timed("export + parity", lambda: export_task_model(model_dir, work / "export", samples=ev.inputs[:2]))
    console.print(exp.parity.describe())

    variants = {"nncf": QuantizeConfig("nncf")}
    if qdq:
        variants["qdq-u8s8"] = QuantizeConfig("qdq", activations="asymmetric")
    qs = {k: timed(f"quantize {k}", lambda c=c, k=k: quantize(exp.onnx_path, cal, work / k, c)) for k, c in variants.items()}

    # FP32 reference on OpenVINO f32; each INT8 model on the backend it ships on.
    outs = {"fp32": timed("evaluate fp32", lambda: predict_all(open_session(exp.onnx_path, "openvino", inference_precision="f32").run, ev.inputs, 4))}
    for k, q in qs.items():
        backend = "openvino" if q.format == "openvino-ir" else "onnxruntime"
        outs[k] = timed(f"evaluate {k}", lambda q=q, b=backend: predict_all(
            open_session(q.model_path, b, inference_precision="f32", graph_precision="int8").run, ev.inputs, 4))
    acc = {k: metrics_from_outputs(o, ev) for k, o in outs.items()}
    masks = {k: post.foreground(post.masks_from_logits(o, pre.size)) for k, o in outs.items()}
    dices = {k: per_image_dice(m, ev.masks) for k, m in masks.items()}
    gates = {k: check_gate("segment", acc["fp32"], acc[k], candidate_name=k) for k in qs}
    hc_gates = {k: check_gate("hc", acc["fp32"], acc[k], candidate_name=k) for k in qs}
    extra = {}
    for k in qs:
        d = dices["fp32"] - dices[k]
        extra[k] = {"pixel_agreement": float((masks[k] == masks["fp32"]).mean()),
                    "dice_vs_fp32_masks": float(per_image_dice(masks[k], masks["fp32"]).mean()),
                    "paired_drop_se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan,
                    "max_image_drop": float(d.max())}
    baseline = float(per_image_dice(np.ones_like(ev.masks), ev.masks).mean())

    t = Table(title=f"{config}: {len(ev)} held-out HC18 images, light segment head trained on {len(parts['train'])} "
                    f"(train Dice {train_dice:.4f}); all-foreground baseline Dice {baseline:.4f}")
    for col in ("model", "Dice", "HC MAE mm", "HC failed", "pixels = fp32", "Dice vs fp32 masks", "Dice gate (segment)", "HC gate (info)"):
        t.add_column(col)
    t.add_row("fp32 (openvino f32)", f"{acc['fp32']['dice']:.4f}", f"{acc['fp32']['hc_mae_mm']:.2f}",
              f"{acc['fp32']['hc_failed']:.0f}", "-", "-", "-", "-")
    for k in qs:
        t.add_row(k, f"{acc[k]['dice']:.4f}", f"{acc[k]['hc_mae_mm']:.2f}", f"{acc[k]['hc_failed']:.0f}",
                  f"{100 * extra[k]['pixel_agreement']:.2f}%", f"{extra[k]['dice_vs_fp32_masks']:.4f}",
                  gates[k].reason, f"drop {hc_gates[k].drop:+.2f} mm ({'within' if hc_gates[k].passed else 'over'} 1 mm)")
    console.print(t)
    for k in qs:
        console.print(f"{k}: paired per-image Dice drop SE {extra[k]['paired_drop_se']:.4f}, worst image {extra[k]['max_image_drop']:+.4f}")

    g = gates["nncf"]
    console.print(f"[{'green' if g.passed else 'red'}]{'MET' if g.passed else 'MISSED'}[/] Dice drop <= 0.01: NNCF INT8 (OpenVINO) "
                  f"Dice {g.candidate:.4f} vs FP32 {g.fp32:.4f}, drop {g.drop:+.4f} on {len(ev)} HC18 images "
                  f"({config}, random-init encoder, trained light head)")
    console.print(f"total {time.perf_counter() - t_all:.0f} s; work files in {work}")
    if json_out:
        json_out.write_text(json.dumps({
            "config": config, "pool_spec": pool_spec, "encoder": "seeded random init (seed 0), no pretrained weights",
            "counts": {k: len(d) for k, d in parts.items()}, "split_keys": {k: [s.key for s in d.samples] for k, d in parts.items()},
            "head": {**head_kwargs_of(head), "epochs": epochs, "lr": lr, "batch": batch, "train_dice": train_dice, **stats},
            "all_foreground_baseline_dice": baseline, "accuracy": acc, "agreement": extra,
            "gates": {k: g.to_dict() for k, g in gates.items()}, "hc_gates": {k: g.to_dict() for k, g in hc_gates.items()},
            "quantize_seconds": {k: q.seconds for k, q in qs.items()}, "timings": timings,
            "check": {"check": "NNCF INT8 Dice drop <= 0.01", "drop": gates["nncf"].drop, "met": gates["nncf"].passed},
            "parity": asdict(exp.parity)}, indent=2, default=str))


if __name__ == "__main__":
    typer.run(main)
