"""The Celery app: Redis when BROKER_URL is set, else the embedded SQLite transport in DATA_DIR.

`celery -A cinesr.worker.queue.celery_app worker` uses the module-level `app`, configured from the environment
(CINESR_*). Code that holds a settings object (the worker process, the gateway, tests) calls
`get_app(settings)`; apps are cached per broker, so every caller shares one connection pool.

Every setting below is chosen for long GPU jobs (minutes per series, one job at a time per GPU); the
reason is next to each. See the README section "Workers and reliability".
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from celery import Celery
from cinesr.worker.queue import embedded_broker
from cinesr.worker.settings import WorkerSettings, load_settings

QUEUE = "celery"  # the Redis list KEDA watches (helm values keda.listName)
SUPERRESOLVE = "cinesr.superresolve_series"
EXPORT = "cinesr.export_series"
SOFT_SHUTDOWN_SECONDS = 60.0


def broker_url(settings: WorkerSettings) -> str:
    return settings.broker_url or f"{embedded_broker.SCHEME}://"


def embedded_broker_path(settings: WorkerSettings) -> Path:
    return Path(settings.data_dir) / "queue" / "broker.sqlite3"


def is_embedded(settings: WorkerSettings) -> bool:
    return not settings.broker_url


def visibility_timeout(settings: WorkerSettings) -> int:
    """Seconds a taken-but-unacknowledged task stays invisible before another worker may take it.

    Above the hard time limit (plus a margin for the export that follows in the same delivery and for a
    slow shutdown): a healthy worker always finishes or is killed before its task is handed out again, so
    a running series is never processed twice; a dead worker's task comes back after at most this long.
    """
    return int(settings.task_time_limit * 1.1) + 10


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration for these settings (a plain dict, so tests and docs can read it)."""
    embedded = is_embedded(settings)
    transport_options: dict[str, Any] = {"visibility_timeout": visibility_timeout(settings)}
    if embedded:
        transport_options["path"] = str(embedded_broker_path(settings))
    else:
        # Look for tasks of dead workers (past the visibility timeout) every 10 s instead of kombu's
        # default of every 100 s; the scan reads one sorted-set range, cheap next to a GPU job.
        transport_options["unacked_restore_throttle"] = 1
    soft = float(settings.task_soft_time_limit)
    hard = max(float(settings.task_time_limit), soft + 1.0)
    return {
        "broker_url": broker_url(settings),
        "broker_transport_options": transport_options,
        # A worker that starts before Redis is up keeps trying instead of exiting (pod start order).
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Task state lives in the job record (JobStore), not in a Celery result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": QUEUE,
        # Acknowledge only after the task returns: a worker that dies mid-series leaves the message
        # unacknowledged, so the broker hands it to the next worker instead of losing it.
        "task_acks_late": True,
        # With late ack, a child killed by the OOM killer, a segfault or the hard time limit would
        # otherwise be acknowledged as failed; reject it back to the queue (the delivery counter in
        # the job record stops a task that kills its worker every time).
        "task_reject_on_worker_lost": True,
        # Each worker reserves one task at a time: a series takes minutes, and a second reserved
        # series would wait behind it while another GPU sits idle.
        "worker_prefetch_multiplier": 1,
        # One process per GPU: the engine holds the whole GPU (memory, TensorRT context).
        "worker_concurrency": 1,
        # Engines and model bundles are loaded per process; recycling children would reload them.
        "worker_max_tasks_per_child": None,
        # The child loads its engine in a background thread (runtime.start), so it reports up quickly;
        # the margin over Celery's 4 s covers importing the stack on a busy or slow-disk node.
        "worker_proc_alive_timeout": 60.0,
        # Soft limit: the task gets SoftTimeLimitExceeded and records a clear failure; hard limit:
        # the child is killed (a hung CUDA kernel cannot be interrupted any other way).
        "task_soft_time_limit": soft,
        "task_time_limit": hard,
        # SIGTERM (pod stop, docker stop, KEDA scale-down) is Celery's warm shutdown: no new task is taken
        # and the running series finishes (bounded by the hard time limit; the chart's grace period is
        # longer). SIGQUIT / a second Ctrl+C is the cold path; there the soft shutdown gives the running
        # task SOFT_SHUTDOWN_SECONDS, then cancels it and hands its message back at once instead of after
        # the visibility timeout. (Celery's soft shutdown sleeps its whole timeout whenever a task runs,
        # so it is kept short rather than mapped onto SIGTERM with the task's full time limit.)
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_SECONDS,
        # An idle worker exits at once (nothing to wait for).
        "worker_enable_soft_shutdown_on_idle": False,
        # A broker blip (Redis restart) must not throw away minutes of GPU work: the running task goes
        # on and records its result in the job record; if its ack is lost with the old connection, the
        # redelivery later finds the series done and is a no-op.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Publishing retries through a short broker outage instead of failing the request.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 3},
        # Worker events and remote control are not used (the job record is the status); the embedded
        # transport has no fan-out for them.
        "worker_send_task_events": False,
        "worker_enable_remote_control": not embedded,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_timeout": 5,
    }


def make_app(settings: WorkerSettings) -> Celery:
    """A configured Celery app with CineSR's tasks registered."""
    # imported here, the one place: tasks.py needs this module's names, and registering needs tasks.py
    from cinesr.worker.queue import tasks

    app = Celery("cinesr", set_as_current=False)
    app.conf.update(celery_config(settings))
    tasks.register(app)
    return app


_apps: dict[tuple[str, str], Celery] = {}
_lock = threading.Lock()


def get_app(settings: WorkerSettings) -> Celery:
    """The (cached) app for these settings' broker."""
    key = (broker_url(settings), str(embedded_broker_path(settings)) if is_embedded(settings) else "")
    with _lock:
        if key not in _apps:
            _apps[key] = make_app(settings)
        return _apps[key]


def __getattr__(name: str) -> Celery:
    # `celery -A cinesr.worker.queue.celery_app worker` reads `app` (configured from the environment). It is
    # built on first use, not at import: the tasks module imports this one, and an app built during that
    # import would register the tasks before they exist.
    if name == "app":
        return get_app(load_settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
