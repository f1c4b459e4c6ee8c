"""`cinesr worker`: one Celery worker process bound to one device (cinesr.worker.queue.consumer)."""

from __future__ import annotations

from typing import Annotated

import typer
from cinesr.service.cli import app


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
    # imported here: Celery's import costs every other `cinesr` command about a second of start-up
    from cinesr.worker.queue.consumer import run_worker

    run_worker(pool, hostname, gpu)
