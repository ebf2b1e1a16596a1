"""Many workers' reports of one epoch → one record for the whole job."""

from __future__ import annotations

import time

from orchestra.coordinator.base import EpochResult
from orchestra.coordinator.protocol import WorkerReport


def aggregate(reports: list[WorkerReport]) -> EpochResult:
    """Metrics are the mean over workers (under MultiWorkerMirroredStrategy
    Keras already reduces them across replicas, so the workers agree);
    the epoch lasts as long as its slowest worker; throughput counts every
    worker's samples; memory is the largest worker's."""
    if not reports:
        raise ValueError("no reports to aggregate")
    epochs = {report.epoch for report in reports}
    if len(epochs) != 1:
        raise ValueError(f"reports from different epochs: {sorted(epochs)}")
    keys = sorted(set().union(*(report.logs for report in reports)))
    metrics = {
        key: sum(r.logs[key] for r in reports if key in r.logs) / sum(1 for r in reports if key in r.logs)
        for key in keys
    }
    epoch_time = max(report.epoch_time for report in reports)
    samples = sum(report.samples for report in reports)
    chief = min(reports, key=lambda r: r.rank)
    return EpochResult(
        epoch=epochs.pop(),
        metrics=metrics,
        epoch_time=epoch_time,
        samples_per_second=samples / epoch_time if epoch_time > 0 else 0.0,
        batch_losses=list(chief.batch_losses),
        steps=len(chief.batch_losses),
        worker_peak_rss_mb=max(report.peak_rss_mb for report in reports),
        time=time.time(),
    )
