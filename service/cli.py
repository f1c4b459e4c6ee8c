"""The `cinesr` command line. User mistakes end in one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from cinesr.model.errors import CineSRError
from cinesr.worker.logs import configure_logging
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .settings import describe_error, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="CineSR: 4x spatial and 8x temporal super-resolution of cardiac cine MRI, DICOM in and out.")
err = Console(stderr=True)
out = Console()

# The `cinesr` command as a subprocess, with this interpreter (`python -m cinesr.service.cli` would not see the
# sub-commands: they register on the imported module).
CLI = [sys.executable, "-c", "from cinesr.service.cli import main; main()"]


class UsageError(CineSRError):
    """A command-line mistake (bad option combination, missing file)."""


def progress_bar(disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, disable=disable, transient=False)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cinesr")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        out.print(f"cinesr {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
    log_level: Annotated[str, typer.Option(help="Log level for the JSON logs on stderr.")] = "WARNING",
    config: Annotated[Path | None, typer.Option(help="Settings file (YAML or KEY=VALUE); the environment wins.",
                                                envvar="CINESR_CONFIG")] = None,
) -> None:
    configure_logging(log_level)
    if config is not None:
        os.environ["CINESR_CONFIG"] = str(config)


@app.command()
def superresolve(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders (one or more cine series).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the derived series.")],
    method: Annotated[Literal["auto", "model", "baseline"], typer.Option(
        help="auto: the model when a trained bundle is installed, else the baseline; model: the latent "
             "diffusion model; baseline: optical flow in time + bicubic in space.")] = "auto",
    backend: Annotated[Literal["auto", "tensorrt", "onnx", "torch"], typer.Option(
        help="Inference engine of the model; auto: the first that loads, fastest first.")] = "auto",
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(
        help="Where the model runs; auto: cuda when a GPU is usable, else cpu.")] = "auto",
    steps: Annotated[int | None, typer.Option(min=1, max=15, help="Sampler steps (default: the model bundle's "
                                                                  "choice, 2 for the bundled model; 15 = the "
                                                                  "teacher; 1/2/4 = its distilled student).")] = None,
    seed: Annotated[int, typer.Option(help="Sampler noise seed (same seed, same output on every backend).")] = 0,
    consistency: Annotated[str | None, typer.Option(
        help="Data consistency with the acquisition: auto (kspace where the acquired frames show Gibbs ringing, "
             "else area), area, kspace, both (the mean of the two projections), or off (research only). "
             "Default: the CONSISTENCY setting, else the bundle's (auto).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model bundle folder (default: MODEL_DIR or the "
                                                              "bundled model).")] = None,
    json_summary: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (with the method, "
                                                              "backend and model bundle used); the progress bar "
                                                              "stays on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    transfer_syntax: Annotated[str | None, typer.Option(
        help="Output transfer syntax: jpeg2000-lossless, jpeg-ls-lossless, rle-lossless or explicit-little-endian "
             "(default: the OUTPUT_TRANSFER_SYNTAX setting, jpeg2000-lossless).")] = None,
    untimed_cine: Annotated[bool, typer.Option(
        "--untimed-cine", help="Read frames without cardiac timing (no TriggerTime) as one cardiac cycle in "
                               "InstanceNumber order instead of refusing them.")] = False,
    uncertainty: Annotated[int | None, typer.Option(
        min=0, max=32, metavar="DRAWS",
        help="Also write an uncertainty series per input series: the per-pixel standard deviation over DRAWS "
             "(>= 2) runs of the model with seeds seed..seed+DRAWS-1 (DRAWS times the compute). 0: none. "
             "Default: the UNCERTAINTY_DRAWS setting (0).")] = None,
) -> None:
    """Super-resolve cine series offline: one derived series per input series is written to OUTPUT."""
    from cinesr.model.cine import read_series
    from cinesr.model.instance import output_transfer_syntax
    from cinesr.worker.inference.derived import Derivation, write_derived_series
    from cinesr.worker.inference.pipeline import fidelity_warning, superresolve_series, supports_draws

    _check_output_folder(output)  # before any reading or computing
    settings = load_settings()
    floor = settings.fidelity_floor_db
    transfer_syntax = transfer_syntax or settings.output_transfer_syntax
    output_transfer_syntax(transfer_syntax)  # a mistake ends here, before any work
    if steps is None and settings.steps is not None and method != "baseline":
        from cinesr.worker.errors import PermanentError
        from cinesr.worker.queue.process import check_steps

        probe = settings.model_copy(update={"model_dir": model or settings.model_dir})
        try:  # the setting is the service's: held to the counts the bundle serves, as there
            check_steps(settings.steps, probe, "the STEPS setting: steps")
        except PermanentError as exc:
            raise UsageError(str(exc)) from None
        steps = settings.steps
    draws = settings.uncertainty_draws if uncertainty is None else uncertainty
    if draws == 1:
        raise UsageError("--uncertainty needs at least 2 draws (0: none)")
    series_list = read_series(inputs, untimed_cine=untimed_cine)  # validates everything before anything is written
    sr_method = _method(method, backend, device, steps, seed, model, consistency)
    if draws and not supports_draws(sr_method):
        raise UsageError(f"--uncertainty needs the model method (the {sr_method.name} method is deterministic)")
    derivation = Derivation(sr_method.name, sr_method.version, sr_method.parameters())
    created_output = not output.exists()
    written: list[Path] = []
    summary = []
    try:
        with progress_bar(quiet) as bar:
            for series in series_list:
                total = sr_method.units(series, draws) if draws else sr_method.units(series)
                task = bar.add_task(f"series …{series.series_uid[-12:]}", total=total)
                result = superresolve_series(series, sr_method,
                                             lambda done, total, task=task: bar.update(task, completed=done), draws)
                write_task = bar.add_task("  writing", total=sum(len(f) for f in result.frames))
                warning = fidelity_warning(result, floor)
                if warning:
                    err.print(f"cinesr: warning: series …{series.series_uid[-12:]}: {warning}", highlight=False,
                              soft_wrap=True)
                derived = write_derived_series(series, result.frames, output, derivation,
                                               lambda done, total, t=write_task: bar.update(t, completed=done),
                                               transfer_syntax=transfer_syntax, image_comments=warning)
                written.append(derived.folder)
                spread = None
                if result.uncertainty is not None:
                    spread = write_derived_series(series, result.uncertainty, output,
                                                  derivation.uncertainty_of(result.draws),
                                                  transfer_syntax=transfer_syntax, image_comments=warning)
                    written.append(spread.folder)
                summary.append({
                    "input_series_uid": series.series_uid, "output_series_uid": derived.series_uid,
                    "folder": str(derived.folder), "instances": len(derived.files),
                    "input_shape": list(series.shape),
                    "output_shape": [len(result.frames), *result.frames[0].shape],
                    "seconds": round(result.timings["compute"], 3),
                    **({"fidelity_db": result.fidelity_db, "consistency": result.consistency,
                        "fidelity_flagged": warning is not None} if result.fidelity_db is not None else {}),
                    **({"uncertainty_series_uid": spread.series_uid, "uncertainty_folder": str(spread.folder),
                        "uncertainty_draws": result.draws} if spread else {}),
                })
    except BaseException:
        for folder in written:  # nothing partial: a failed run leaves the output folder as it was
            shutil.rmtree(folder, ignore_errors=True)
        if created_output:
            shutil.rmtree(output, ignore_errors=True)
        raise
    if json_summary:
        out.print_json(json.dumps({"method": sr_method.name, **_engine_summary(sr_method), "series": summary},
                                  allow_nan=False, default=str))
    else:
        for item in summary:
            out.print(f"{item['instances']} instances ({'x'.join(map(str, item['output_shape']))}) -> "
                      f"{item['folder']}", soft_wrap=True, highlight=False)
            if "uncertainty_folder" in item:
                out.print(f"  uncertainty ({item['uncertainty_draws']} draws) -> {item['uncertainty_folder']}",
                          soft_wrap=True, highlight=False)


@app.command()
def phantom(
    output: Annotated[Path, typer.Argument(help="Folder to write <patient>/truth (and lowres) series into.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of synthetic patients.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first patient; patient k uses seed+k.")] = 0,
    slices: Annotated[int, typer.Option(min=1, help="Slice positions per study (a short-axis stack).")] = 3,
    frames: Annotated[int, typer.Option(min=2, help="Frames per cardiac cycle (ground truth).")] = 32,
    size: Annotated[int, typer.Option(min=32, help="Matrix size of the ground truth.")] = 256,
    generator: Annotated[Literal["sax", "sax-fourier", "lax", "deadleaves", "texture", "shepp-logan", "mrphantom",
                                 "motioncloud"], typer.Option(
        help="Phantom generator (cinesr.model.phantom.GENERATORS): sax (detailed short axis), sax-fourier (other "
             "shape, motion and texture models), lax (four-chamber long axis); deadleaves, texture, shepp-logan "
             "(content that is not a heart, moving like one); mrphantom, motioncloud (sources written by others, "
             "for evaluation).")] = "sax",
    degraded: Annotated[bool, typer.Option("--degraded", help="Also write the low-resolution acquisition "
                                                              "(every 8th frame, 4x smaller) as <patient>/lowres.")]
    = False,
    truth: Annotated[bool, typer.Option("--truth/--no-truth", help="Write the ground-truth series "
                                                                   "(<patient>/truth); --no-truth needs "
                                                                   "--degraded.")] = True,
) -> None:
    """Write synthetic short-axis cardiac cine studies as DICOM."""
    from cinesr.model.acquisition import write_phantom
    from cinesr.model.phantom import GENERATORS, make_study

    if generator not in GENERATORS:
        raise UsageError(f"unknown generator {generator!r} (available: {', '.join(GENERATORS)})")
    if frames % 8 and degraded:
        raise UsageError("--frames must be a multiple of 8 for --degraded (every 8th frame is kept)")
    if size % 4 and degraded:
        raise UsageError("--size must be a multiple of 4 for --degraded")
    if not (truth or degraded):
        raise UsageError("nothing to write: --no-truth without --degraded")
    with progress_bar(False) as bar:
        task = bar.add_task("phantoms", total=patients)
        for k in range(patients):
            study = make_study(seed + k, slices=slices, frames=frames, size=size, generator=generator)
            for series in write_phantom(study, output, seed=seed + k, truth=truth, lowres=degraded):
                out.print(f"{series.role}: {len(series.files)} instances -> {series.folder}", soft_wrap=True,
                          highlight=False)
            bar.update(task, advance=1)


def _check_output_folder(output: Path) -> None:
    """OUTPUT must be a folder or not exist yet (it is created), under a folder: said before minutes of work."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"{output}: {'exists' if path == output else f'{path} is'} a file, not a folder "
                                 f"(-o/--output names a folder for the derived series)")
            return


def _method(name: str, backend: str, device: str, steps: int | None, seed: int, model: str | None,
            consistency: str | None = None) -> object:
    """The SR method for the offline command (the service builds its own through worker.process)."""
    from cinesr.worker.inference.pipeline import BaselineMethod
    from cinesr.worker.queue.process import trained_model_available

    settings = load_settings()
    model = model or (str(settings.model_dir) if settings.model_dir else None)
    if name == "auto":
        name = "model" if (model or trained_model_available()) else "baseline"
        if name == "baseline":
            err.print("cinesr: no trained model bundle installed; using the baseline method", highlight=False)
    if name == "baseline":
        return BaselineMethod()
    if name != "model":
        raise UsageError(f"unknown method {name!r} (available: auto, model, baseline)")
    from cinesr.worker.inference.engines import EngineUnavailable, create_engine
    from cinesr.worker.inference.modelsr import ModelMethod

    try:
        engine = create_engine(backend=backend, device=device, model=model)
    except (EngineUnavailable, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    from cinesr.model.consistency import MODES

    if consistency is not None and consistency not in MODES:
        raise UsageError(f"unknown --consistency {consistency!r} (one of {', '.join(MODES)})")
    try:
        return ModelMethod.configured(engine, steps=steps, seed=seed, consistency=consistency or settings.consistency)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _engine_summary(method: Any) -> dict[str, Any]:
    """The backend, device and model bundle behind a method (None for the baseline), for --json."""
    engine = getattr(method, "engine", None)
    if engine is None:
        return {"backend": None, "device": None, "model_bundle": None}
    source = dict(engine.model.source or {})  # {"kind", "path" (a bundle) or "name" (a config), "sha256", ...}
    return {"backend": engine.name, "device": str(engine.device),
            "model_bundle": {"path": source.get("path"), "kind": source.get("kind"), "name": source.get("name"),
                             "version": getattr(method, "version", None), "sha256": source.get("sha256")}}


def command() -> Any:
    """The click command of the app, with help that reads well: flags show no `<bool>`, arguments their
    name in capitals instead of a Python type."""
    import typer.core
    import typer.main

    option = typer.core.TyperOption
    if not getattr(option, "_cinesr_tidy", False):
        shown = option.display_type_rich

        def display(self: Any, ctx: Any) -> str | None:
            if self.is_flag:  # flags (--help included) take no value: show no type
                return None
            text = shown(self, ctx)
            if text and text.startswith("<list[") and text.endswith("]>"):  # repeatable: <path>... not <list[Path]>
                text = f"<{text[6:-2].lower()}>..."
            return text

        option.display_type_rich = display
        option._cinesr_tidy = True
    root = typer.main.get_command(app)
    for cmd in [root, *getattr(root, "commands", {}).values()]:
        for param in cmd.params:
            if param.param_type_name == "argument":
                param.metavar = param.metavar or (param.name or "").upper()
                param.display_type_rich = lambda ctx=None: None  # the help text says what it is
    return root


def _fail(message: str, code: int) -> None:
    err.print(f"cinesr: error: {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main() -> None:
    """Entry point: run the app, turning user mistakes into one line and exit code 2."""
    from .commands import load_all

    load_all()
    try:
        command().main(prog_name="cinesr", standalone_mode=False)
    except (CineSRError, ValidationError) as exc:
        _fail(str(exc).splitlines()[0] if isinstance(exc, CineSRError) else describe_error(exc), 2)
    except typer.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:
        if isinstance(exc, _CLICK_ERROR):  # usage mistakes: missing argument, bad option value
            _fail(exc.format_message().replace("\n", " "), getattr(exc, "exit_code", 2))
        if os.environ.get("CINESR_DEBUG"):
            traceback.print_exc()
        _fail(f"{type(exc).__name__}: {exc} (set CINESR_DEBUG=1 for the traceback)", 1)


# typer bundles its own click; its usage errors all derive from this base.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")



if __name__ == "__main__":
    # Run through the imported module so that sub-commands register on the same `app` object.
    from cinesr.service.cli import main as _main

    _main()
