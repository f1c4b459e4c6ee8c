"""cinesr.worker: the processing core (pipeline, engines, derived series, export, tasks)."""

__version__ = "0.1.0"
