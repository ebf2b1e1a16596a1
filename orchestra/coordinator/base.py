"""The one interface every driver-side callback implements.

Workers report each epoch to the driver; the driver turns the reports into
one `EpochResult` for the whole job and hands it to each callback in turn.
A callback may add to the `Decision` every worker then obeys on the same
epoch (stop, save a checkpoint, snapshot the best weights). Callbacks never
talk to workers or to each other directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestra.coordinator.protocol import CheckpointRef, Decision
from orchestra.storage.record import format_value


@dataclass
class EpochResult:
    """One epoch of the whole job."""

    epoch: int
    metrics: dict[str, float]
    epoch_time: float
    samples_per_second: float
    batch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    worker_peak_rss_mb: float = 0.0
    time: float = 0.0  # when the driver had every worker's report (Unix time)

    def history_entry(self) -> dict[str, float]:
        return {
            "epoch": self.epoch,
            **self.metrics,
            "epoch_time": self.epoch_time,
            "samples_per_second": self.samples_per_second,
            "worker_peak_rss_mb": self.worker_peak_rss_mb,
            "time": self.time,
        }

    def line(self, epochs: int) -> str:
        """The line a driver prints for this epoch: `epoch 3/30  loss 0.2514  ...  1.52s`."""
        metrics = "  ".join(f"{k} {format_value(v)}" for k, v in self.metrics.items() if k != "learning_rate")
        return f"epoch {self.epoch}/{epochs}  {metrics}  {self.epoch_time:.2f}s"


class CoordinatorCallback:
    """Base class of driver-side callbacks; override what you need.

    `state_dict`/`load_state_dict` let a job resume from a checkpoint with
    the callback exactly as it was when that checkpoint was decided.
    `record_fields` are what the callback contributes to the job record.
    An `optional` callback's failure does not fail the job: it is dropped
    and the record's `warnings` say so.
    """

    optional = False

    def on_job_start(self, job_id: str) -> None:
        pass

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        pass

    def on_checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        pass

    def on_job_end(self, final: dict[str, Any]) -> None:
        """The job trained to its end; `final` is its status (as `orchestra status --json`)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def record_fields(self) -> dict[str, Any]:
        return {}
