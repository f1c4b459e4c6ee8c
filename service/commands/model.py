"""Researcher and operator commands around the model: train, evaluate, export, selftest, bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cinesr.service.cli import UsageError, app, err, out, progress_bar

Backend = Annotated[str, typer.Option(help="auto|tensorrt|onnx|torch (auto: first that loads, fastest first).")]
Device = Annotated[str, typer.Option(help="auto|cpu|cuda.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model bundle folder, or tiny/base (random "
                                                              "weights); default: the bundled model.")]


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Training config: tiny, base, or a YAML file.")] = "tiny",
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder (checkpoints, logs, bundle).")]
    = Path("cinesr-train"),
    stage: Annotated[str, typer.Option(help="autoencoder | denoiser | decoder | refine | distill | both.")] = "both",
    init_from: Annotated[list[Path] | None, typer.Option(help="A bundle or ResShift/LDM checkpoint(s) to start "
                                                              "from (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUTPUT/checkpoints when present.")] = True,
    max_steps: Annotated[int | None, typer.Option(help="Cap every stage at this many steps (smoke runs).")] = None,
) -> None:
    """Train the autoencoder, the denoiser and/or a few-step student (distill); resumable; logs JSONL and
    curves into OUTPUT."""
    from cinesr.model.train import train as run_training

    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def show(stage_name: str, step: int, total: int, metrics: dict) -> None:
            if stage_name not in tasks:
                tasks[stage_name] = bar.add_task(stage_name, total=total)
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "steps_per_s", "val_psnr") if k in metrics)
            bar.update(tasks[stage_name], completed=step, description=f"{stage_name} {shown}")

        bundle = run_training(config, output, stage=stage, init_from=init_from or None, resume=resume,
                              progress=show, max_steps=max_steps)
    out.print(f"bundle -> {bundle}", soft_wrap=True, highlight=False)


@app.command()
def evaluate(
    data: Annotated[list[str], typer.Option(help="Folder of ground-truth cine studies (DSB layout or one folder per "
                                                 "patient), or phantom:<seeds>[:<generator>], e.g. phantom:100-109 "
                                                 "or phantom:0-4:mrphantom; repeat for several sources (rows per "
                                                 "source).")],
    model: ModelOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where evaluation.md/json and figures go.")]
    = Path("cinesr-eval"),
    acquisition: Annotated[list[str] | None, typer.Option(
        help="realesrgan, bicubic, area and/or kspace (default all four).")] = None,
    protocol: Annotated[list[str] | None, typer.Option(help="paper and/or sequence (default both).")] = None,
    split: Annotated[str | None, typer.Option(help="Only patients of this split (train/val/test).")] = None,
    max_patients: Annotated[int | None, typer.Option(help="At most this many patients per source.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the acquisitions and of the sampler's noise.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, max=15, help="Sampler steps (default: the bundle's).")] = None,
    consistency: Annotated[str | None, typer.Option(help="both|auto|area|kspace|off (default: the bundle's).")] = None,
    backend: Annotated[str | None, typer.Option(help="Run the windows through this inference engine "
                                                     "(auto|tensorrt|onnx|torch); default: the bundle's networks "
                                                     "in torch, as `cinesr superresolve --backend torch`.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    phantom_slices: Annotated[int, typer.Option(min=1, help="Slices per synthetic patient (phantom: data).")] = 3,
    phantom_frames: Annotated[int, typer.Option(min=8, help="Frames per cycle of synthetic patients.")] = 32,
    phantom_size: Annotated[int, typer.Option(min=32, help="Matrix of synthetic ground truth.")] = 256,
) -> None:
    """Acquire ground-truth cine, run the baseline and the model through the shipped path, print a table
    like the paper's Table 1 (plus temporal error), per source."""
    from cinesr.model.bundle import load_bundle
    from cinesr.model.evaluate import ACQUISITIONS, PROTOCOLS, markdown_table
    from cinesr.model.evaluate import evaluate as run_evaluation
    from cinesr.model.pipeline import Options

    for name, given, known in (("acquisition", acquisition, ACQUISITIONS), ("protocol", protocol, PROTOCOLS)):
        for value in given or ():
            if value not in known:
                raise UsageError(f"unknown {name} {value!r} (one of {', '.join(known)})")
    bundle = load_bundle(model, device=device)
    try:
        options = Options.from_mapping(bundle.meta.get("inference"), steps=steps, seed=seed, consistency=consistency)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    runner = None
    if backend is not None:
        from cinesr.worker.inference.engines import EngineUnavailable, create_engine

        try:
            runner = create_engine(backend=backend, device=device, model=bundle.path)
        except (EngineUnavailable, ValueError) as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
        runner.set_steps(options.steps, options.sampler, options.temperature)
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)

        def show(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"evaluating {what}")

        report = run_evaluation(data, bundle, output, acquisitions=tuple(acquisition or ACQUISITIONS),
                                protocols=tuple(protocol or PROTOCOLS), seed=seed, split=split,
                                max_patients=max_patients, options=options, runner=runner, progress=show,
                                phantom={"slices": phantom_slices, "frames": phantom_frames, "size": phantom_size})
    out.print(markdown_table(report), soft_wrap=True, highlight=False)
    out.print(f"report -> {output}", soft_wrap=True, highlight=False)


@app.command()
def export(
    model: ModelOpt = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Bundle folder to write the graphs into "
                                                                       "(default: the model's cache folder).")]
    = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma list of batch sizes for TensorRT profiles.")] = "1,4,8",
    tensorrt: Annotated[bool, typer.Option(help="Also build TensorRT engines where TensorRT and a GPU exist.")]
    = True,
) -> None:
    """Write encoder.onnx, unet.onnx, decoder.onnx for a model bundle; build TensorRT engines where possible."""
    from cinesr.worker.inference.engines.parity import export_tensorrt
    from cinesr.worker.inference.graphs import export_bundle

    sizes = _int_list(batch_sizes, "--batch-sizes")
    folder = export_bundle(model, output, batch_sizes=sizes)
    out.print(f"onnx -> {folder}", soft_wrap=True, highlight=False)
    if tensorrt:
        built = export_tensorrt(model if output is None else folder, batch_sizes=sizes)
        out.print(f"tensorrt: {'built ' + str(built.get('plans')) if built.get('built') else built.get('reason')}",
                  soft_wrap=True, highlight=False)


@app.command()
def selftest(backend: Backend = "auto", device: Device = "auto", model: ModelOpt = None) -> None:
    """Check an inference backend against onnxruntime on CPU (operators: run on each GPU node type)."""
    from cinesr.worker.inference.engines.parity import selftest as run_selftest

    result = run_selftest(backend=backend, device=device, model=model)
    out.print_json(json.dumps(result, default=str))
    if not result.get("ok"):
        err.print(f"cinesr: error: selftest failed: {result.get('failures')}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def bench(
    model: ModelOpt = None,
    device: Device = "auto",
    slices: Annotated[int, typer.Option(min=1, help="Slices of the synthetic series timed.")] = 2,
    frames: Annotated[int, typer.Option(min=2, help="Low-resolution frames per slice.")] = 4,
    size: Annotated[int, typer.Option(min=16, help="Low-resolution matrix size.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per stage (the median is reported).")] = 3,
    steps: Annotated[str | None, typer.Option(help="Sampler step counts to time, e.g. 1,15 (default: every "
                                                    "count the bundle serves, its default first).")] = None,
    results: Annotated[Path, typer.Option(help="Folder for the JSON record.")] = Path("bench/results"),
) -> None:
    """Time each stage and a whole series per backend and step count, side by side; JSON with machine, commit
    and versions."""
    from cinesr.bench.engines import run_bench, summary, write_report

    counts = _int_list(steps, "--steps") if steps else None
    report = run_bench(model=model, device=device, slices=slices, frames=frames, size=size, steps=counts,
                       repeats=repeats)
    out.print(summary(report), soft_wrap=True, highlight=False)
    out.print(f"recorded -> {write_report(report, results)}", soft_wrap=True, highlight=False)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} must be a comma list of integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} needs at least one positive integer")
    return values
