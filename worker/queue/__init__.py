"""The job queue: job records and their lifecycle, dispatch to Celery, the tasks, the embedded broker, leases
and the per-process runtime of a worker. Task bodies (`process`) call into `cinesr.worker.inference`."""
