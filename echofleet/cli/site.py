"""CLI: ``echofleet site check`` and ``echofleet phantom``.

Only typer and rich are imported at module level; the data layer is imported inside the
commands so that ``echofleet --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from echofleet.cli.common import fail, unwritable_folder

site_app = typer.Typer(no_args_is_help=True, help="Check a hospital's data before it joins a federation.")

SPEC_HELP = (
    "Data spec KIND:PATH[?options]. Kinds: busi, hc18, pocus, folder (one sub-folder per class), "
    "csv (path,label[,mask] manifest), dicom (file or folder), phantom:N. "
    "Options: limit=N, seed=S, frames=K (pocus/dicom), profiles=a,b (phantom). "
    "Example: busi:/data/Dataset_BUSI_with_GT?limit=90"
)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _device_check(device, encoder: str, checkpoint: Optional[str], data, probe_images: int) -> dict:
    """What the site's feature extraction would run on, and (under autocast) how faithful it is.

    In fp32 there is nothing to probe ("cpu, fp32, no autocast"). Under autocast the probe a round
    runs (``fed.features.feature_precision``: the first ``probe_images`` readable images, pooled
    features under autocast vs fp32, every image's cosine >= the threshold) runs here too, with its
    record in a temporary folder: ``site check`` writes nothing into the site's state."""
    import tempfile

    from echocare.device import AUTOCAST_MIN_COSINE
    from echocare.preprocess import PreprocessSpec
    from fed.config import RunConfig
    from fed.features import _probe_images, feature_precision

    out = {"requested": device.requested, "torch_device": device.torch_device, "device_class": device.device_class,
           "fell_back_to_cpu": device.fell_back, "message": device.message, "autocast": device.autocast}
    if device.autocast is None:
        out.update(features="fp32", decision=f"{device.device_class}, fp32, no autocast", probe=None)
        return out
    # the encoder and preprocessing a round would use (RunConfig.round_config sends PreprocessSpec())
    ref = RunConfig(encoder_config=encoder, encoder_checkpoint=checkpoint or "").encoder_ref()
    with tempfile.TemporaryDirectory(prefix="site-check-precision-") as tmp:
        used, probe = feature_precision(device, ref, PreprocessSpec(), _probe_images(data, probe_images), Path(tmp))
    if not probe:
        out.update(features="fp32", decision=f"{device.device_class}, {device.autocast} autocast not probed "
                                             "(no readable image): fp32", probe=None)
        return out
    feats = used.autocast or "fp32"
    verdict = (f"{device.autocast} autocast kept (cosine to fp32 >= {AUTOCAST_MIN_COSINE} on every probe image)"
               if probe["use_autocast"] else
               f"{device.autocast} autocast refused (min cosine below {AUTOCAST_MIN_COSINE}): fp32")
    out.update(features=feats, decision=f"{device.device_class}, {verdict}", probe=probe, encoder=encoder)
    return out


@site_app.command("check")
def check(
    data_spec: Annotated[str, typer.Argument(help=SPEC_HELP + ". Or a site policy (.toml): its data and device.",
                                             metavar="DATA_SPEC|POLICY")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON to this file.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the leak-free split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    show_problems: Annotated[int, typer.Option(min=0, help="How many skipped files to list.")] = 20,
    device_request: Annotated[Optional[str], typer.Option(
        "--device", help="Compute device to check: auto, cpu, cuda, cuda:N (default: the policy's, else auto).")] = None,
    precision: Annotated[str, typer.Option(
        help="Feature precision: auto (bf16/fp16 autocast on a GPU, fp32 on the CPU), fp32, bf16 (also on the CPU), fp16.")] = "auto",
    encoder: Annotated[str, typer.Option(help="Encoder config the autocast probe runs (the federation's).")] = "",
    checkpoint: Annotated[Optional[str], typer.Option(help="Encoder checkpoint for the probe (default: seeded random init).")] = None,
    probe_images: Annotated[int, typer.Option(min=1, help="Images in the autocast precision probe.")] = 8,
) -> None:
    """Read every image of DATA_SPEC once and report what a federation needs to know.

    Counts per class and per split (train/val of the leak-free split that keeps near-duplicates
    together), unreadable files with the reason, exact and near duplicates, image sizes, mask
    coverage and mask/image size mismatches; and the compute device the site's feature extraction
    uses: device class, precision, and under autocast the probe's cosine to fp32 (min and mean
    over the probe images; autocast is kept only at >= 0.995 on every image). Exits with 1 on
    blocking problems (no readable image, an empty class, a mask of the wrong size), 2 on a bad
    data spec, policy or device.

    DATA_SPEC is KIND:PATH[?options]. Kinds: busi, hc18, pocus, folder (one sub-folder per
    class), csv (path,label[,mask] manifest), dicom (file or folder), phantom:N. Options:
    limit=N, seed=S, frames=K (pocus, dicom), profiles=a,b (phantom).
    Example: busi:/data/Dataset_BUSI_with_GT?limit=90. A site policy file (POLICY.toml) gives
    the data spec and the device instead.
    """
    from echocare.data import open_data
    from echocare.data.sitecheck import check_site
    from echocare.device import DeviceError, resolve_device
    from echocare.models.encoder import ENCODER_CONFIGS  # torch-free
    from fed.config import RunConfig

    console = Console()
    if not 0.0 <= val_fraction < 1.0:
        raise fail(f"--val-fraction {val_fraction:g}: must be at least 0 and below 1", 2)
    if json_out is not None:
        problem = "is a folder" if json_out.is_dir() else unwritable_folder(json_out.parent)
        if problem:
            raise fail(f"--json {json_out}: {problem}", 2)
    request = device_request
    if data_spec.endswith(".toml") and Path(data_spec).is_file():
        from fed.policy import PolicyError, load_policy

        try:
            policy = load_policy(data_spec)
        except PolicyError as e:
            raise fail(str(e), 2) from None
        data_spec, request = policy.data, request or policy.device
    encoder = encoder or RunConfig().encoder_config
    if encoder not in ENCODER_CONFIGS:
        raise fail(f"--encoder {encoder}: must be one of {', '.join(ENCODER_CONFIGS)}", 2)
    if checkpoint and not Path(checkpoint).is_file():
        raise fail(f"--checkpoint {checkpoint}: file not found", 2)
    try:
        device = resolve_device(request or "auto", precision)
    except (ValueError, DeviceError) as e:
        raise fail(f"--device {request or 'auto'} --precision {precision}: {e}", 2) from None
    try:
        data = open_data(data_spec)
    except (ValueError, OSError, ImportError) as e:
        console.print(f"[red]cannot open {data_spec!r}:[/red] {e}")
        raise typer.Exit(2) from None
    with _progress(console) as progress:
        task = progress.add_task("reading images", total=len(data.samples))
        report = check_site(data, val_fraction, seed, on_progress=lambda done, total: progress.update(task, completed=done))

    overview = Table(title=f"site check: {report.spec}", show_header=False)
    overview.add_row("task hint", str(report.task_hint))
    overview.add_row("images listed / readable", f"{report.listed} / {report.readable}")
    overview.add_row("skipped files", str(len(report.problems)))
    h, w = report.sizes["height"], report.sizes["width"]
    overview.add_row("height min / median / max", f"{h['min']} / {h['median']:g} / {h['max']}")
    overview.add_row("width min / median / max", f"{w['min']} / {w['median']:g} / {w['max']}")
    m = report.masks
    overview.add_row("images with a mask file", str(m["with_mask"]))
    overview.add_row("non-empty masks (share of readable)", f"{m['non_empty']} ({m['coverage']:.1%})")
    overview.add_row("mean lesion area (non-empty masks)", f"{m['mean_lesion_fraction']:.2%}")
    overview.add_row("mask/image size mismatches", str(len(report.mask_mismatches)))
    overview.add_row("exact duplicate sets", str(len(report.exact_duplicates)))
    overview.add_row(
        "near-duplicate groups (images)",
        f"{len(report.near_duplicate_groups)} ({sum(len(g) for g in report.near_duplicate_groups)})",
    )
    overview.add_row("groups with conflicting labels", str(len(report.cross_label_groups)))
    console.print(overview)

    classes = Table(title="images per class and split")
    for col in ("class", "readable", "train", "val"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for c, n in report.per_class.items():
        style = "red" if n == 0 else None
        classes.add_row(c, str(n), str(report.per_split["train"].get(c, 0)), str(report.per_split["val"].get(c, 0)), style=style)
    console.print(classes)

    if report.problems:
        table = Table(title=f"skipped files ({len(report.problems)})")
        table.add_column("file")
        table.add_column("reason")
        for p in report.problems[:show_problems]:
            table.add_row(p.path, p.reason)
        if len(report.problems) > show_problems:
            table.add_row(f"... {len(report.problems) - show_problems} more", "(see --json)")
        console.print(table)
    for wmsg in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {wmsg}")

    dev = _device_check(device, encoder, checkpoint, data, probe_images)
    compute = Table(title="compute device (feature extraction)", show_header=False)
    compute.add_row("device", f"{dev['device_class']} ({dev['torch_device']})")
    compute.add_row("how chosen", dev["message"])
    compute.add_row("features", dev["decision"])
    if dev["probe"]:
        p = dev["probe"]
        compute.add_row("autocast cosine to fp32", f"min {p['min_cosine']:.5f}, mean {p['mean_cosine']:.5f} over "
                                                   f"{p['probe_images']} probe images (required >= {p['required_min_cosine']})")
    console.print(compute)
    if json_out:
        report.write_json(json_out, extra={"device": dev})
        console.print(f"report written to {json_out}")
    if report.blocking:
        for b in report.blocking:
            console.print(f"[bold red]blocking:[/bold red] {b}")
        raise typer.Exit(1)
    console.print("[green]ok:[/green] no blocking problems")


def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder (created; replaced only if it is an earlier phantom set).")],
    n: Annotated[int, typer.Option("--n", help="Number of images (profiles round-robin, classes balanced).")] = 120,
    profile: Annotated[
        str, typer.Option("--profile", help="Device profile: linear-a, convex-b, linear-c, a comma list, or 'all'.")
    ] = "all",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same pixels (and matches phantom:N specs).")] = 0,
) -> None:
    """Write synthetic B-mode phantoms (benign / malignant / normal) with masks in BUSI's layout.

    OUT/{benign,malignant,normal}/phantom-PROFILE-NNNNN.png plus _mask.png, SYNTHETIC.txt and
    phantom.json (all generator parameters). Read them back with busi:OUT or folder:OUT; the
    same images come from the in-memory spec phantom:N?profiles=...&seed=S.
    """
    from echocare.phantom import CLASSES, resolve_profiles, write_phantoms

    console = Console()
    try:  # bad arguments are refused before any image is made
        names = resolve_profiles(profile)
    except ValueError as e:
        raise fail(f"--profile: {e}", 2) from None
    if n < 1:
        raise fail(f"--n {n}: must be at least 1", 2)
    problem = unwritable_folder(out)
    if problem is None and out.is_dir() and any(out.iterdir()) and not (out / "phantom.json").is_file():
        problem = "exists, is not empty and is not a phantom set written by echofleet (no phantom.json); refusing to replace it"
    if problem:
        raise fail(f"OUT {out}: {problem}", 2)
    with _progress(console) as progress:
        task = progress.add_task("simulating", total=n)
        try:
            manifest = write_phantoms(out, n, names, seed, on_image=lambda _: progress.advance(task))
        except FileExistsError as e:  # appeared since the check above
            raise fail(str(e)) from None
    table = Table(title=f"{n} SYNTHETIC phantom images in {out} (seed {seed})")
    table.add_column("profile")
    for c in CLASSES:
        table.add_column(c, justify="right")
    for name in names:
        counts = [sum(1 for f in manifest["files"].values() if f["profile"] == name and f["label"] == c) for c in CLASSES]
        table.add_row(name, *map(str, counts))
    console.print(table)
    console.print(f"synthetic data, not patients: see {out / 'SYNTHETIC.txt'}; parameters in {out / 'phantom.json'}")
