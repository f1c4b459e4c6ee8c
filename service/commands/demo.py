"""`cinesr demo`: synthetic cine study -> the real service path -> picture, cine GIF, metrics, timings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cinesr.service.cli import app, err, out
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

STAGES = {"phantom": "make phantom study", "service": "start service + PACS", "push": "C-STORE to service",
          "wait": "series completion", "worker": "waiting for the worker", "process": "super-resolve + export",
          "metrics": "picture + metrics", "stop": "stop service"}


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--out", help="Folder for the study, PACS, picture and logs.")]
    = Path("cinesr-demo"),
    slices: Annotated[int, typer.Option(min=1, max=16, help="Slices of the synthetic study.")] = 2,
    frames: Annotated[int, typer.Option(min=16, max=256, help="Ground-truth frames per cycle (multiple of 8; "
                                                              "the acquisition keeps every 8th).")] = 32,
    size: Annotated[int, typer.Option(min=64, max=512, help="Ground-truth matrix (multiple of 4; the "
                                                            "acquisition is 4x smaller: 64, the model grid).")] = 256,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 7,
    method: Annotated[str | None, typer.Option(help="model or baseline (default: the service's default, the "
                                                    "learned model where it loads).")] = None,
    stable_seconds: Annotated[float, typer.Option(min=0.5, help="Quiet time after which the service treats "
                                                                "the pushed series as complete.")] = 0.5,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in the folder (only what "
                                                                "a run writes there is removed); without it a "
                                                                "re-run over a previous one is refused.")]
    = False,
) -> None:
    """Make a synthetic low-resolution cine study, push it to a local CineSR service by C-STORE, receive the
    super-resolved series in a local PACS, then write a comparison picture, a cine GIF and the metrics."""
    from cinesr.service.demo import DemoError, DemoOptions, run_demo, short_method

    if method is not None and method not in ("model", "baseline"):
        raise DemoError(f"unknown method {method!r} (available: model, baseline)")
    options = DemoOptions(out=output, slices=slices, frames=frames, size=size, seed=seed, method=method,
                          stable_seconds=stable_seconds, overwrite=overwrite)
    progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.fields[note]}"),
                        TimeElapsedColumn(), console=err, disable=quiet)
    tasks: dict[str, TaskID] = {}

    def report(stage: str, done: float, total: float | None, note: str = "") -> None:
        if stage not in tasks:
            for other in tasks.values():  # earlier stages are complete once a later one starts
                task = progress.tasks[other]
                if task.total is None:
                    progress.update(other, total=1, completed=1)
                elif not task.finished:
                    progress.update(other, completed=task.total)
            tasks[stage] = progress.add_task(STAGES.get(stage, stage), total=total, note=note)
        progress.update(tasks[stage], completed=done, total=total, note=note)

    with progress:
        result = run_demo(options, report)

    table = Table(title=f"Against the ground truth ({slices} slices x {frames} frames, {size}x{size})")
    table.add_column("method")
    for name in ("PSNR (dB) ↑", "SSIM ↑", "LPIPS ↓"):
        table.add_column(name, justify="right")
    rows = (("baseline (flow + bicubic)", "baseline"), (f"CineSR ({short_method(result.method)})", "cinesr"))
    for label, key in rows:
        m = result.metrics[key]
        table.add_row(label, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['lpips']:.4f}")
    out.print(table)
    out.print(_seconds_table("End-to-end timings (last instance received -> derived series stored in PACS)",
                             result.timings, 2))
    stages = _seconds_table("The demo command, stage by stage (wall clock; also in metrics.json)", result.stages, 1)
    stages.add_row("of which model compute (in the worker)", f"{result.model_compute:.1f}")
    out.print(stages)
    out.print(f"comparison picture: {result.picture}", highlight=False, soft_wrap=True)
    out.print(f"animated cine:      {result.animation}", highlight=False, soft_wrap=True)
    out.print(f"metrics (JSON):     {result.metrics_file}", highlight=False, soft_wrap=True)
    out.print(f"derived series (as the PACS received it): {result.pacs_folder}", highlight=False, soft_wrap=True)
    out.print(f"synthetic study (truth + low-res DICOM):  {result.study_folder}", highlight=False, soft_wrap=True)
    out.print(f"service and worker logs:                  {result.logs} and {result.out / 'service-data' / 'logs'}",
              highlight=False, soft_wrap=True)


def _seconds_table(title: str, seconds: dict[str, float], digits: int) -> Table:
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, value in seconds.items():
        table.add_row(stage, f"{value:.{digits}f}")
    return table
