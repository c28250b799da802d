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


@site_app.command("check")
def check(
    data_spec: Annotated[str, typer.Argument(help=SPEC_HELP, metavar="DATA_SPEC")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON to this file.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the leak-free split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    show_problems: Annotated[int, typer.Option(min=0, help="How many skipped files to list.")] = 20,
) -> None:
    """Read every image of DATA_SPEC once and report what a federation needs to know.

    Counts per class and per split (train/val of the leak-free split that keeps near-duplicates
    together), unreadable files with the reason, exact and near duplicates, image sizes, mask
    coverage and mask/image size mismatches. Exits with 1 on blocking problems (no readable
    image, an empty class, a mask of the wrong size), 2 on a bad data spec.

    DATA_SPEC is KIND:PATH[?options]. Kinds: busi, hc18, pocus, folder (one sub-folder per
    class), csv (path,label[,mask] manifest), dicom (file or folder), phantom:N. Options:
    limit=N, seed=S, frames=K (pocus, dicom), profiles=a,b (phantom).
    Example: busi:/data/Dataset_BUSI_with_GT?limit=90
    """
    from echocare.data import open_data
    from echocare.data.sitecheck import check_site

    console = Console()
    if not 0.0 <= val_fraction < 1.0:
        raise fail(f"--val-fraction {val_fraction:g}: must be at least 0 and below 1", 2)
    if json_out is not None:
        problem = "is a folder" if json_out.is_dir() else unwritable_folder(json_out.parent)
        if problem:
            raise fail(f"--json {json_out}: {problem}", 2)
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
    if json_out:
        report.write_json(json_out)
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
