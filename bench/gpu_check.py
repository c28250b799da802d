"""The prepared GPU check: what a hospital's NVIDIA GPU does for echofleet, in one run of < 5 minutes.

Measured side by side in the same process:

  peak        bf16 dense matmul TFLOP/s of this GPU (torch.matmul on 8192^2 matrices, best of 3)
  throughput  full ``echocare`` feature extraction (all five maps, pooled), images/s at a few batch
              sizes under bf16 autocast, and as a fraction of the measured matmul peak
              (FLOPs from PyTorch's FLOP counter, 1 MAC = 2 FLOP); the batch size
              echocare.device.fit_batch_size picks from free memory; preprocessing images/s on one core
  cosine      pooled features of real BUSI images: GPU bf16 autocast (and GPU fp32) vs CPU fp32,
              per image; passes when every image's cosine >= echocare.device.AUTOCAST_MIN_COSINE
  dp-head     one DP-SGD epoch of a classification head on cached-size features, GPU vs CPU
              (linear head: closed-form clipping; MLP head: Opacus ghost clipping); a path that fails
              on the GPU is reported with its error, not hidden

Target on one H200-class GPU: >= 1500 images/s (about 40 % of its bf16 peak).

Without a usable CUDA GPU it says so and runs a CPU-only smoke of the same code paths with
``echocare-tiny`` (tiny batches, bf16 autocast on the CPU), then exits 0.

The encoder is the seeded random init (speed and the bf16-vs-fp32 agreement do not depend on
the weights much; pass ``--checkpoint echocare_encoder.pth`` for the released weights).

Usage::

    python bench/gpu_check.py                      # on the GPU machine; ~3-4 min
    python bench/gpu_check.py --json gpu.json --batches 64,128,256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")


def find_busi(explicit: str | None) -> Path | None:
    """BUSI's ``Dataset_BUSI_with_GT`` under --data, $ECHOFLEET_SHARED_DATA, ./shared/data, ../shared/data or /work/shared/data."""
    roots = [explicit] if explicit else []
    roots += [os.environ.get("ECHOFLEET_SHARED_DATA"), REPO / "shared" / "data", REPO.parent / "shared" / "data", "/work/shared/data"]
    for r in roots:
        if not r:
            continue
        r = Path(r)
        for cand in (r, r / "Dataset_BUSI_with_GT", r / "busi" / "Dataset_BUSI_with_GT"):
            if (cand / "benign").is_dir():
                return cand
    return None


@dataclass
class Plan:
    """What one run measures (the GPU plan, or the CPU smoke)."""

    config: str
    batches: list[int]
    matmul_n: int
    images: int  # real images for the cosine check
    dp_rows: int  # feature rows for the DP head epoch
    min_seconds: float  # time each throughput point at least this long
    smoke: bool


@dataclass
class Report:
    device: dict
    plan: dict
    versions: dict
    results: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device) -> None:
    if device.is_cuda:
        import torch

        torch.cuda.synchronize(device.index)


# ---------------------------------------------------------------------------------------------- peak


def matmul_peak(device, n: int, dtype_name: str) -> float:
    """Best TFLOP/s of ``torch.matmul`` on n x n matrices (2 n^3 FLOP each), best of 3 timed runs."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n, device=device.torch_device, dtype=dtype)
    b = torch.randn(n, n, device=device.torch_device, dtype=dtype)
    c = torch.empty(n, n, device=device.torch_device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync(device)
    reps, best = (20 if device.is_cuda else 3), 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


# ---------------------------------------------------------------------------------------------- throughput


def encoder_throughput(encoder, device, batches: list[int], gflop_per_image: float, peak_tflops: float,
                       min_seconds: float, budget: Budget) -> list[dict]:
    """images/s of encode + pool at each batch size under the device's autocast (inputs in [0, 1])."""
    import torch

    from echocare.models.encoder import encode, pooled_features

    rows = []
    for b in batches:
        if budget.left() < 20:
            rows.append({"batch": b, "skipped": "time budget"})
            continue
        x = torch.rand(b, 3, 256, 256, device=device.torch_device)
        try:
            with torch.inference_mode(), device.autocast_context():
                for _ in range(2):  # warm-up (kernel selection, allocator)
                    pooled_features(encode(encoder, x))
                sync(device)
                n, t = 0, time.perf_counter()
                while n < 3 or (time.perf_counter() - t < min_seconds and n < 50):
                    pooled_features(encode(encoder, x))
                    n += 1
                sync(device)
                dt = time.perf_counter() - t
        except RuntimeError as e:  # out of memory at a large batch: report it, keep the smaller ones
            rows.append({"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            if device.is_cuda:
                torch.cuda.empty_cache()
            continue
        ips = n * b / dt
        achieved = ips * gflop_per_image / 1e3  # TFLOP/s
        rows.append({"batch": b, "images_per_s": round(ips, 1), "achieved_tflops": round(achieved, 2),
                     "peak_fraction": round(achieved / peak_tflops, 3) if peak_tflops else None})
        del x
    return rows


def preprocess_rate(images: list[np.ndarray], spec) -> float:
    """Preprocessing images/s on one CPU core (the numpy pipeline every site runs before the encoder)."""
    from echocare.preprocess import preprocess_image

    t = time.perf_counter()
    for im in images:
        preprocess_image(im, spec)
    return len(images) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- cosine


def load_images(busi: Path | None, n: int, notes: list[str]) -> tuple[list[np.ndarray], str]:
    from echocare.data import open_data

    spec = f"busi:{busi}?limit={n}&seed=0" if busi else f"phantom:{n}?seed=0"
    if busi is None:
        notes.append("BUSI not found (--data, $ECHOFLEET_SHARED_DATA, ../shared/data): cosine measured on phantoms")
    data = open_data(spec)
    return [img for _, img in data.iter_images()], spec


def pooled_on(encoder, x: np.ndarray, device, batch: int) -> np.ndarray:
    from echocare.device import run_frozen
    from echocare.models.encoder import encode, pooled_features

    return run_frozen(encoder, x, device, batch, lambda m, xb: pooled_features(encode(m, xb)))


def feature_cosines(cpu_fp32: np.ndarray, other: np.ndarray, config: str) -> dict:
    """Per-image cosine over the whole pooled vector and per stage (min and mean)."""
    from echocare.device import AUTOCAST_MIN_COSINE, autocast_agrees
    from echocare.models.encoder import pooled_columns

    ok, worst, mean = autocast_agrees(cpu_fp32, other)
    stages = {}
    for s in range(5):
        cols = pooled_columns(config, [s])
        _, w, m = autocast_agrees(cpu_fp32[:, cols], other[:, cols])
        stages[f"map{s}"] = {"min": round(w, 5), "mean": round(m, 5)}
    return {"min": round(worst, 5), "mean": round(mean, 5), "passes": ok, "tolerance": AUTOCAST_MIN_COSINE, "per_stage": stages}


# ---------------------------------------------------------------------------------------------- site path


def site_path(config: str, checkpoint: str | None, images: list, device) -> dict:
    """The site's feature extraction as a federation round runs it (fed.features.pooled_features on
    ``device``): the precision decision it records and images/s including that probe, into a
    throw-away cache."""
    import tempfile

    from echocare.data.base import SiteData
    from echocare.models.encoder import checkpoint_sha256, preprocess_spec
    from fed.features import EncoderRef, pooled_features

    class _Img:  # a sample whose image is already in memory
        def __init__(self, i: int, img):
            self.key, self.label, self.meta, self._img = f"img{i}", "x", {}, img

        def image(self):
            return self._img

    data = SiteData(spec="gpu-check", samples=[_Img(i, im) for i, im in enumerate(images)], classes=["x"])
    ref = EncoderRef(config, checkpoint, checkpoint_sha256(checkpoint) if checkpoint else None, 0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        try:
            x, kept = pooled_features(data, ref, preprocess_spec(config), Path(tmp), batch_size=64, device=device)
        except Exception as e:  # report, do not hide
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        seconds = time.perf_counter() - t
        records = [json.loads(p.read_text()) for p in Path(tmp).glob("precision-*.json")]
    return {"images": len(kept), "dim": int(x.shape[1]) if x.ndim == 2 else 0, "seconds": round(seconds, 2),
            "images_per_s_incl_probe": round(len(kept) / seconds, 1), "precision": records[0] if records else "fp32"}


# ---------------------------------------------------------------------------------------------- DP head


def dp_epoch_seconds(device_str: str, x: np.ndarray, y: np.ndarray, hidden: int) -> dict:
    """One DP-SGD epoch (sigma 1, C 1, batch 256) of a 3-class head on ``x`` placed on ``device_str``."""
    import torch

    from echocare.models.heads import build_head
    from fed.dp import DPConfig, train_head

    head = build_head("classify", "echocare", 3, hidden=hidden).to(device_str)
    xt, yt = torch.from_numpy(x).to(device_str), torch.from_numpy(y).to(device_str)
    # train_head moves head and data to cfg.device (the site policy's device): name it, else it is the CPU
    cfg = DPConfig(epochs=1, batch_size=256, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, device=device_str)
    try:
        t = time.perf_counter()
        out = train_head(head, xt, yt, cfg)
        if device_str.startswith("cuda"):
            torch.cuda.synchronize()
        return {"seconds": round(time.perf_counter() - t, 3), "steps": out["steps"]}
    except Exception as e:  # the fed side may not run on this device yet: say so
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


# ---------------------------------------------------------------------------------------------- main


def run(plan: Plan, device, busi: Path | None, checkpoint: str | None, budget: Budget) -> Report:
    import torch

    from echocare.device import fit_batch_size
    from echocare.models.encoder import encode, get_config, load_encoder, measure_forward, preprocess_spec
    from echocare.preprocess import preprocess_batch

    import monai

    rep = Report(device=device.to_dict(), plan=plan.__dict__,
                 versions={"torch": torch.__version__, "cuda": torch.version.cuda, "monai": monai.__version__,
                           "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
                           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    res = rep.results
    print(device.message)

    # 1. the card's own peak, measured now
    res["matmul_peak_tflops"] = {"bf16": round(matmul_peak(device, plan.matmul_n, "bf16"), 1)}
    print(f"matmul peak: {res['matmul_peak_tflops']['bf16']} TFLOP/s bf16 (n={plan.matmul_n})")

    # 2. the encoder on the CPU first: GFLOP/image and the fp32 reference features
    encoder, sha = load_encoder(plan.config, checkpoint, seed=0)
    gflop, _ = measure_forward(encoder, plan.config)
    res["gflop_per_image"] = round(gflop, 2)
    res["encoder"] = {"config": plan.config, "checkpoint_sha256": sha or "none (seeded random init)"}
    images, data_spec = load_images(busi, plan.images, rep.notes)
    spec = preprocess_spec(plan.config)
    res["preprocess_images_per_s_one_core"] = round(preprocess_rate(images, spec), 1)
    x = preprocess_batch(images, spec)
    t = time.perf_counter()
    cpu_dev = type(device)("cpu", "cpu", "cpu", None, "cpu fp32 reference")
    ref = pooled_on(encoder, x, cpu_dev, 8)
    res["cpu_fp32_images_per_s"] = round(len(x) / (time.perf_counter() - t), 2)
    print(f"CPU fp32 reference on {len(x)} images of {data_spec}: {res['cpu_fp32_images_per_s']} images/s")

    # 3. throughput on the device
    encoder = encoder.to(device.torch_device)
    peak = res["matmul_peak_tflops"]["bf16"]
    res["throughput"] = encoder_throughput(encoder, device, plan.batches, gflop, peak, plan.min_seconds, budget)
    for row in res["throughput"]:
        print("throughput", row)

    def step(n: int) -> None:
        with torch.inference_mode(), device.autocast_context():
            encode(encoder, torch.rand(n, 3, 256, 256, device=device.torch_device))

    res["fit_batch_size"] = fit_batch_size(device, step, probe=4 if device.is_cuda else 2, max_batch=1024)
    print(f"fit_batch_size picks {res['fit_batch_size']}")

    # 4. the device's features vs the CPU fp32 reference, per image
    batch = min(64, max(plan.batches))
    res["cosine_vs_cpu_fp32"] = {"data": data_spec, "images": len(x)}
    res["cosine_vs_cpu_fp32"][device.autocast or "fp32"] = feature_cosines(ref, pooled_on(encoder, x, device, batch), plan.config)
    if device.autocast:
        fp32_dev = type(device)(device.requested, device.torch_device, device.device_class, None, "fp32 on the device")
        res["cosine_vs_cpu_fp32"]["fp32"] = feature_cosines(ref, pooled_on(encoder, x, fp32_dev, batch), plan.config)
    print("cosine vs CPU fp32:", json.dumps({k: v for k, v in res["cosine_vs_cpu_fp32"].items() if isinstance(v, dict)}))
    del encoder
    if device.is_cuda:
        torch.cuda.empty_cache()

    # 5. the site's own path (fed.features.pooled_features, what a hospital runs in a round): precision
    #    probe, batch fitted to free memory, feature cache; images/s end to end on these images
    if budget.left() >= 30:
        res["site_path"] = site_path(plan.config, checkpoint, images, device)
        print("site path (fed.features.pooled_features):", json.dumps(res["site_path"]))
    else:
        rep.notes.append("site path skipped: time budget")

    # 6. DP head epoch, device vs CPU, on features of the full config's width
    if budget.left() < 15:
        rep.notes.append("DP head epoch skipped: time budget")
        return rep
    rng = np.random.default_rng(0)
    dim = sum(get_config("echocare").feature_channels)
    xf = rng.standard_normal((plan.dp_rows, dim)).astype(np.float32)
    yf = rng.integers(0, 3, plan.dp_rows).astype(np.int64)
    res["dp_head_epoch"] = {"rows": plan.dp_rows, "dim": dim}
    for name, hidden in (("linear", 0), ("mlp256-opacus", 256)):
        if budget.left() < 15:
            rep.notes.append(f"DP head epoch {name} skipped: time budget")
            continue
        row = {"cpu": dp_epoch_seconds("cpu", xf, yf, hidden)}
        if device.is_cuda:
            row[device.torch_device] = dp_epoch_seconds(device.torch_device, xf, yf, hidden)
            a, b = row["cpu"].get("seconds"), row[device.torch_device].get("seconds")
            if a and b:
                row["speedup"] = round(a / b, 2)
        res["dp_head_epoch"][name] = row
        print("DP head epoch", name, row)
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,64,128,256", help="batch sizes for the throughput (GPU)")
    p.add_argument("--images", type=int, default=48, help="real BUSI images for the cosine check (GPU)")
    p.add_argument("--data", default=None, help="BUSI folder (Dataset_BUSI_with_GT, or a shared data root)")
    p.add_argument("--checkpoint", default=None, help="released echocare_encoder.pth (default: seeded random init)")
    p.add_argument("--budget-s", type=float, default=280, help="stop starting new measurements after this long")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N (cpu forces the smoke)")
    args = p.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    from echocare.device import ComputeDevice, DeviceError, resolve_device

    budget = Budget(args.budget_s)
    try:
        device = resolve_device(args.device)
    except (DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.is_cuda:
        plan = Plan("echocare", [int(b) for b in args.batches.split(",") if b.strip()], 8192, args.images, 8000, 3.0, smoke=False)
        checkpoint = args.checkpoint
    else:
        print(f"no usable CUDA GPU ({device.message}): nothing to measure here. "
              "Running a CPU-only smoke of every code path with echocare-tiny instead (not a measurement).")
        plan = Plan("echocare-tiny", [2, 4], 256, 4, 512, 0.0, smoke=True)
        checkpoint = None
        # the GPU path's autocast, exercised on the CPU
        device = ComputeDevice(device.requested, "cpu", "cpu", "bfloat16", "CPU smoke with bf16 autocast", fell_back=True)
    rep = run(plan, device, find_busi(args.data), checkpoint, budget)
    rep.results["wall_s"] = round(time.perf_counter() - budget.start, 1)
    if not plan.smoke:
        best = max((r.get("images_per_s", 0) for r in rep.results["throughput"]), default=0)
        rep.results["target"] = {"images_per_s": 1500, "best": best, "met": best >= 1500}
    for n in rep.notes:
        print("note:", n)
    print(f"done in {rep.results['wall_s']} s" + (" (CPU smoke: no GPU numbers)" if plan.smoke else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rep.__dict__, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
