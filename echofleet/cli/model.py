"""CLI: ``echofleet model list`` and ``echofleet model inspect``.

torch and MONAI are imported inside the commands so ``echofleet --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

model_app = typer.Typer(no_args_is_help=True)


@model_app.command("list")
def list_configs() -> None:
    """List the encoder configs (all MONAI 2-D SwinTransformer v2, patch 2, window 8)."""
    from echocare.models.encoder import ENCODER_CONFIGS

    table = Table(
        title="EchoCare encoder configs",
        caption="all: MONAI 2-D SwinTransformer (use_v2), patch 2, window 8, map strides 2,4,8,16,32",
    )
    table.add_column("config", no_wrap=True, style="bold")
    for col in ("embed", "depths", "heads", "map channels", "input"):
        table.add_column(col, overflow="fold")
    for name, c in ENCODER_CONFIGS.items():
        table.add_row(
            name,
            str(c.embed_dim),
            ",".join(map(str, c.depths)),
            ",".join(map(str, c.num_heads)),
            ",".join(map(str, c.feature_channels)),
            f"{c.img_size}²",
        )
    Console().print(table)


@model_app.command("inspect")
def inspect(
    config: str = typer.Option("echocare", "--config", "-c", help="Encoder config name (see `echofleet model list`)."),
    checkpoint: Optional[str] = typer.Option(
        None,
        "--checkpoint",
        help="Encoder weights to load strictly: a .pth/.pt (plain MONAI state dict, `mask_token` allowed) or "
        ".safetensors file, or hf://ORG/REPO/FILE from the local Hugging Face cache. Without it: seeded random init.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (keys: config, params, sha256, gflops, output_shapes, preprocess)."
    ),
    seed: int = typer.Option(0, help="Seed of the random init when no checkpoint is given."),
) -> None:
    """Report an encoder's parameters, checkpoint sha256, GFLOP, feature-map shapes and input preprocessing.

    Builds the encoder (loading the checkpoint strictly: any missing, unexpected or mis-shaped
    key is refused with the mismatches), counts GFLOP per 256x256 image with PyTorch's FLOP
    counter (1 MAC = 2 FLOP) and lists the five feature-map shapes of a forward pass on a zero
    image (batch 1). The preprocessing is the spec the config's inputs go through (EchoCare's
    own: gray replicated to 3 channels, values in [0, 1], mean 0 and std 1).
    """
    from echocare.models.encoder import CheckpointError, count_params, get_config, load_encoder, measure_forward

    console = Console(stderr=as_json)
    try:
        cfg = get_config(config)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    try:
        with console.status(f"building {cfg.name}" + (f" and loading {checkpoint}" if checkpoint else "")):
            encoder, sha = load_encoder(cfg, checkpoint, seed=seed)
        with console.status("forward pass on a zero image"):
            gflops, shapes = measure_forward(encoder, cfg)
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(2) from None
    report = {
        "config": cfg.name,
        "params": count_params(encoder),
        "sha256": sha,
        "gflops": round(gflops, 3),
        "output_shapes": [list(s) for s in shapes],
        "preprocess": cfg.preprocess_spec().to_dict(),
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"encoder {cfg.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("config", cfg.name)
    table.add_row("checkpoint", str(Path(checkpoint)) if checkpoint else f"none (random init, seed {seed})")
    table.add_row("sha256", sha or "-")
    table.add_row("parameters", f"{report['params']:,} ({report['params'] / 1e6:.1f} M)")
    table.add_row("GFLOP / image", f"{gflops:.1f} at {cfg.img_size}x{cfg.img_size} (1 MAC = 2 FLOP)")
    for i, (s, st) in enumerate(zip(shapes, cfg.feature_strides)):
        table.add_row(f"map {i} (stride {st})", "x".join(map(str, s)))
    pre = report["preprocess"]
    table.add_row(
        "preprocessing",
        f"v{pre['version']}: gray x3, crop={pre['crop']}, {pre['resize']} to {pre['size']}x{pre['size']}, "
        f"[0, 1] then mean {pre['mean']} std {pre['std']}",
    )
    Console().print(table)
