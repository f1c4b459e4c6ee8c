"""Prometheus metrics of the service, read at scrape time from the things that know the numbers.

Counters of the listener come from its stats; jobs, queue depth, stage durations and failures come from
the job records, which every process (gateway, workers) shares, so the numbers are right whichever worker
did the work. Each Service has its own registry (several can live in one test process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from cinesr.worker.queue.lifecycle import JobStatus, SeriesStatus
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cinesr.worker.queue.jobs import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGES = ("retrieve", "queue", "load", "compute", "write", "export")
FIDELITY_BUCKETS = (20.0, 25.0, 30.0, 35.0, 40.0, 50.0, 60.0, 80.0)  # dB


class ServiceCollector(Collector):
    """Yields the service's metrics from listener stats and job records at each scrape."""

    def __init__(self, jobs: JobStore, listener_stats: Callable[[], Any | None],
                 ineligible: Callable[[], int] | None = None, job_window: int = 5000) -> None:
        self.jobs = jobs
        self.listener_stats = listener_stats
        self.ineligible = ineligible
        self.job_window = job_window

    def collect(self) -> Iterator[Any]:
        stats = self.listener_stats()
        received = CounterMetricFamily("cinesr_received_instances", "DICOM instances stored by the listener",
                                       labels=["outcome"])
        associations = CounterMetricFamily("cinesr_associations", "DICOM associations", labels=["outcome"])
        if stats is not None:
            received.add_metric(["stored"], stats.stored)
            received.add_metric(["duplicate"], stats.duplicates)
            received.add_metric(["duplicate_conflict"], stats.conflicts)  # of those, other content (0xB006)
            received.add_metric(["failed"], stats.failed)
            received.add_metric(["out_of_resources"], stats.out_of_resources)
            associations.add_metric(["accepted"], stats.associations)
            associations.add_metric(["rejected"], stats.rejected_associations)
        yield received
        yield associations

        jobs = self.jobs.list(limit=self.job_window)
        by_status = GaugeMetricFamily("cinesr_jobs", "Jobs by status (most recent jobs)", labels=["status"])
        counts: dict[str, int] = {}
        queued_series = 0
        failures = CounterMetricFamily("cinesr_failures", "Failed job series by stage", labels=["stage"])
        failed_by_stage = {"process": 0, "export": 0, "retrieve": 0}
        stage_sum: dict[str, float] = {}
        stage_count: dict[str, int] = {}
        fidelity: list[float] = []
        flagged = 0
        for job in jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
            if job.status == JobStatus.FAILED and not job.series:
                failed_by_stage["retrieve"] += 1
            for entry in job.series:
                if entry.status == SeriesStatus.QUEUED or (entry.status == SeriesStatus.PROCESSED
                                                           and job.status != JobStatus.FAILED):
                    queued_series += 1
                if entry.status == SeriesStatus.FAILED:
                    failed_by_stage["export" if entry.output_series_uid else "process"] += 1
                if entry.fidelity_db is not None:
                    fidelity.append(entry.fidelity_db)
                    flagged += bool(entry.warnings)
            for stage, seconds in job.timings.items():
                stage_sum[stage] = stage_sum.get(stage, 0.0) + seconds
                stage_count[stage] = stage_count.get(stage, 0) + 1
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status, 0))
        yield by_status
        depth = GaugeMetricFamily("cinesr_queue_depth", "Series waiting for a worker (to process or export)")
        depth.add_metric([], queued_series)
        yield depth
        for stage, n in failed_by_stage.items():
            failures.add_metric([stage], n)
        yield failures
        durations = SummaryMetricFamily("cinesr_job_stage_seconds", "Time jobs spent per stage",
                                        labels=["stage"])
        for stage in sorted(set(STAGES) | set(stage_sum)):
            durations.add_metric([stage], stage_count.get(stage, 0), stage_sum.get(stage, 0.0))
        yield durations
        histogram = HistogramMetricFamily("cinesr_series_fidelity_db", "Agreement of each processed series, "
                                          "re-acquired, with its acquisition (dB; recent jobs)")
        buckets = [(str(b), sum(v <= b for v in fidelity)) for b in FIDELITY_BUCKETS] + [("+Inf", len(fidelity))]
        histogram.add_metric([], buckets, sum_value=float(sum(fidelity)))
        yield histogram
        low = GaugeMetricFamily("cinesr_low_fidelity_series", "Processed series flagged below FIDELITY_FLOOR_DB "
                                "(recent jobs)")
        low.add_metric([], flagged)
        yield low
        if self.ineligible is not None:
            skipped = GaugeMetricFamily("cinesr_ineligible_series", "Received series not processed (kept until "
                                        "retention)")
            skipped.add_metric([], self.ineligible())
            yield skipped


def make_registry(collector: ServiceCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
