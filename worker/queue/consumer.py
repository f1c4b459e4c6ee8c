"""One Celery worker process bound to one device: takes super-resolution and export tasks from the broker
(BROKER_URL, or the embedded queue in DATA_DIR), one at a time. `cinesr worker` and `python -m cinesr.worker`
(the embedded worker of `cinesr serve`) both run `run_worker`."""

from __future__ import annotations

import logging
import os

from cinesr.model.errors import CineSRError
from cinesr.worker.queue.celery_app import get_app, is_embedded
from cinesr.worker.queue.lifeline import follow_parent
from cinesr.worker.settings import load_settings

POOLS = ("prefork", "solo")


def run_worker(pool: str = "prefork", hostname: str | None = None, gpu: str | None = None) -> None:
    """Run the worker until it is told to stop. SIGTERM lets the running series finish (warm shutdown);
    SIGQUIT gives it a minute, then hands it back to the queue. Raises CineSRError for a bad pool or
    inconsistent time limits, before anything starts."""
    if pool not in POOLS:
        raise CineSRError(f"unknown pool {pool!r} (available: {', '.join(POOLS)})")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything initialises CUDA
    follow_parent()  # the embedded worker of `cinesr serve` dies with it

    settings = load_settings()
    if settings.task_time_limit <= settings.task_soft_time_limit:
        raise CineSRError("CINESR_TASK_TIME_LIMIT must be larger than CINESR_TASK_SOFT_TIME_LIMIT")
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
    import celery.apps.worker  # Celery's CLI module: only a running worker needs it

    shutdown_log = logging.getLogger("cinesr.worker.shutdown")

    def say(msg: str, f: object = None) -> None:
        shutdown_log.warning(msg)

    celery.apps.worker.safe_say = say
