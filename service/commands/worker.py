"""`cinesr worker`: one Celery worker process bound to one device."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer
from cinesr.service.cli import UsageError, app


@app.command()
def worker(
    gpu: Annotated[str | None, typer.Option(help="GPU index (or UUID) this worker uses; sets CUDA_VISIBLE_DEVICES. "
                                                 "Default: the environment's CUDA_VISIBLE_DEVICES.")] = None,
    pool: Annotated[str, typer.Option(help="prefork (a child process runs the tasks; the parent never touches "
                                           "CUDA; hard time limits enforced) or solo (one process, for debugging).")]
    = "prefork",
    hostname: Annotated[str | None, typer.Option(help="Celery node name (default cinesr-<pid>@<host>).")] = None,
) -> None:
    """Run a worker: takes super-resolution and export tasks from the broker (BROKER_URL, or the embedded
    queue in DATA_DIR when empty), one at a time. Run one per GPU. SIGTERM lets the running series finish
    (warm shutdown); SIGQUIT gives it a minute, then hands it back to the queue."""
    if pool not in ("prefork", "solo"):
        raise UsageError(f"unknown pool {pool!r} (available: prefork, solo)")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    from cinesr.worker.celery_app import get_app, is_embedded
    from cinesr.worker.lifeline import follow_parent
    from cinesr.worker.settings import load_settings

    follow_parent()  # the embedded worker of `cinesr serve` dies with it

    settings = load_settings()
    if settings.task_time_limit <= settings.task_soft_time_limit:
        raise UsageError("CINESR_TASK_TIME_LIMIT must be larger than CINESR_TASK_SOFT_TIME_LIMIT")
    celery = get_app(settings)
    level = logging.getLevelName(logging.getLogger().level)
    _log_shutdown_lines()
    # --quiet: no banner on stdout; logs are JSON lines only
    argv = ["--quiet", "worker", "--pool", pool, "--concurrency", "1", "--loglevel", str(level),
            "--hostname", hostname or f"cinesr-{os.getpid()}@%h"]
    if is_embedded(settings):
        # the embedded transport has no fan-out: no gossip, mingle or broker heartbeats
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    celery.worker_main(argv)


def _log_shutdown_lines() -> None:
    # Celery prints "worker: Warm shutdown (MainProcess)" straight to stderr; make it a JSON log line
    import celery.apps.worker

    shutdown_log = logging.getLogger("cinesr.worker.shutdown")

    def say(msg: str, f: object = None) -> None:
        shutdown_log.warning(msg)

    celery.apps.worker.safe_say = say
