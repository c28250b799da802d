"""Encoder forward throughput vs. this machine's matmul peak, fp32 and bf16, measured in one run.

For each encoder config: images/s at batch 1 and batch 16 (smaller batch and fewer repetitions
for the full ``echocare`` config, which needs ~200 GFLOP per image), the GFLOP/s that achieves
(FLOPs from PyTorch's FLOP counter, 1 MAC = 2 FLOP), and that as a fraction of the peak of
``torch.matmul`` on large square matrices measured in the same run, in the same dtype. bf16 runs
under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Numbers are ratios measured side by side; absolute values depend on the machine and on what
else runs on it (the dev box is shared). Examples::

    .venv/bin/python bench/bench_encoder.py --quick
    .venv/bin/python bench/bench_encoder.py --configs echocare-tiny,echocare-small --json out.json
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

DTYPES = ("fp32", "bf16")


@dataclass
class Row:
    config: str
    dtype: str
    batch: int
    images_per_s: float
    gflops_per_image: float
    achieved_gflops: float
    peak_gflops: float

    @property
    def fraction_of_peak(self) -> float:
        return self.achieved_gflops / self.peak_gflops


def _autocast(dtype: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _timed(fn, reps: int, min_seconds: float) -> float:
    """Seconds per call: one warm-up call, then at least ``reps`` timed calls lasting at least
    ``min_seconds`` in all; returns the fastest call (the least disturbed by other processes on
    a shared machine)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: str, n: int, min_seconds: float) -> float:
    """GFLOP/s of ``torch.matmul`` on two n x n matrices of ``dtype`` (2 n³ FLOP per product)."""
    import torch

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(tdt)
    b = torch.randn(n, n, generator=g).to(tdt)
    seconds = _timed(lambda: torch.matmul(a, b), reps=3, min_seconds=min_seconds)
    return 2 * n**3 / seconds / 1e9


def plan(config: str, quick: bool) -> list[tuple[int, int]]:
    """(batch, repetitions) per config: the full model gets a smaller batch and fewer repetitions."""
    if config == "echocare":
        return [(1, 1), (2, 1)] if quick else [(1, 2), (4, 1)]
    return [(1, 3), (4, 2)] if quick else [(1, 5), (16, 2)]


def main(
    configs: str = typer.Option("echocare,echocare-small,echocare-tiny", help="Comma-separated encoder configs."),
    quick: bool = typer.Option(False, "--quick", help="Smaller batches, fewer repetitions (about a minute on 2 cores)."),
    dtypes: str = typer.Option("fp32,bf16", help="Comma-separated: fp32, bf16 (autocast)."),
    matmul_n: int = typer.Option(2048, help="Side of the square matrices for the matmul peak."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
) -> None:
    """Measure encoder images/s and the fraction of the matmul peak it reaches."""
    import torch

    from echocare.models.encoder import get_config, load_encoder, measure_forward

    if threads:
        torch.set_num_threads(threads)
    names = [c.strip() for c in configs.split(",") if c.strip()]
    dts = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dts:
        if d not in DTYPES:
            raise typer.BadParameter(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}", param_hint="--dtypes")
    cfgs = [get_config(n) for n in names]
    console = Console(width=max(110, Console().width))  # the table is wider than 80 columns
    min_s = 0.5 if quick else 2.0
    peaks = {d: matmul_peak(d, matmul_n, min_s) for d in dts}  # measured again at the end: the max counts
    rows: list[Row] = []
    steps = sum(len(plan(c.name, quick)) for c in cfgs) * len(dts)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=steps)
        for cfg in cfgs:
            encoder, _ = load_encoder(cfg, None, seed=0)
            gflops, _ = measure_forward(encoder, cfg)
            for d in dts:
                for batch, reps in plan(cfg.name, quick):
                    progress.update(task, description=f"{cfg.name} {d} batch {batch}")
                    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size)

                    def forward() -> None:
                        with torch.inference_mode(), _autocast(d):
                            encoder(x, normalize=True)

                    seconds = _timed(forward, reps=reps, min_seconds=0.0 if cfg.name == "echocare" else min_s)
                    ips = batch / seconds
                    rows.append(Row(cfg.name, d, batch, ips, gflops, ips * gflops, peaks[d]))
                    progress.advance(task)
    for d in dts:
        peaks[d] = max(peaks[d], matmul_peak(d, matmul_n, min_s))
    for r in rows:
        r.peak_gflops = peaks[r.dtype]

    table = Table(
        title=f"encoder forward at 256x256, {torch.get_num_threads()} threads (torch {torch.__version__})",
        caption="GF = GFLOP (1 MAC = 2 FLOP); peak = torch.matmul on square matrices, same dtype, same run",
    )
    table.add_column("config", no_wrap=True)
    table.add_column("dtype")
    for col in ("batch", "img/s", "ms/img", "GF/img", "GF/s", "peak GF/s", "of peak"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.config,
            r.dtype,
            str(r.batch),
            f"{r.images_per_s:.2f}",
            f"{1000 / r.images_per_s:.0f}",
            f"{r.gflops_per_image:.1f}",
            f"{r.achieved_gflops:.1f}",
            f"{r.peak_gflops:.0f}",
            f"{r.fraction_of_peak:.2f}",
        )
    console.print(table)
    if "fp32" in dts and "bf16" in dts:
        ratio = Table(title="bf16 (autocast) speed-up over fp32, same config and batch")
        for col in ("config", "batch", "bf16 / fp32 images/s"):
            ratio.add_column(col)
        by = {(r.config, r.dtype, r.batch): r for r in rows}
        for (c, d, b), r in by.items():
            if d == "bf16" and (c, "fp32", b) in by:
                ratio.add_row(c, str(b), f"{r.images_per_s / by[(c, 'fp32', b)].images_per_s:.2f}x")
        ratio.caption = f"matmul peak bf16 / fp32: {peaks['bf16'] / peaks['fp32']:.1f}x"
        console.print(ratio)
    if json_out:
        json_out.write_text(json.dumps({"peaks_gflops": peaks, "rows": [asdict(r) | {"fraction_of_peak": r.fraction_of_peak} for r in rows]}, indent=2))


if __name__ == "__main__":
    typer.run(main)
