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
    scalars: dict[str, float] = field(default_factory=dict)  # added by callbacks: history and TensorBoard

    def add_scalar(self, name: str, value: float) -> None:
        """Log `value` under `name` with this epoch: in the job's history and
        on TensorBoard (callbacks that log run after the ones that add)."""
        if name in self.metrics or name in self.history_entry():
            raise ValueError(f"{name!r} is already logged this epoch; choose another name")
        self.scalars[name] = float(value)

    def history_entry(self) -> dict[str, float]:
        return {
            "epoch": self.epoch,
            **self.metrics,
            **self.scalars,
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
    """Base class of driver-side callbacks, orchestra's and plugins'; override what you need.

    The driver calls each callback once per epoch of the whole job, with the
    metrics of all workers aggregated, as Keras calls a callback once per
    epoch of `fit`. The hooks follow Keras's names:

    - `on_train_begin(job_id)`: before the first epoch (again after a resume).
    - `on_epoch_end(result, decision)`: `result.metrics` are Keras's epoch
      logs (`loss`, `val_accuracy`, ...); set `decision.stop = True` to stop
      every worker after this epoch; `result.add_scalar(name, value)` logs
      a value of your own to the job's history and TensorBoard.
    - `on_checkpoint_saved(checkpoint)`: a checkpoint was published.
    - `on_train_end(final)`: the job trained to its end; `final` is its status.

    `record_fields` are what the callback adds to the job record (shown by
    `orchestra status --json`). `state_dict`/`load_state_dict` let a job
    resume from a checkpoint with the callback exactly as it was when that
    checkpoint was decided. An `optional` callback's failure does not fail
    the job: it is dropped and the record's `warnings` say so.

    Example, a callback a plugin package registers (see docs/plugins.md):

    >>> class StopAbove(CoordinatorCallback):
    ...     def __init__(self, monitor: str = "accuracy", threshold: float = 0.99):
    ...         self.monitor, self.threshold = monitor, threshold
    ...     def on_epoch_end(self, result, decision):
    ...         if result.metrics.get(self.monitor, 0.0) >= self.threshold:
    ...             decision.stop = True
    >>> decision = Decision()
    >>> StopAbove().on_epoch_end(EpochResult(epoch=3, metrics={"accuracy": 0.995}, epoch_time=1.0,
    ...                                      samples_per_second=700.0), decision)
    >>> decision.stop
    True
    """

    optional = False

    def on_train_begin(self, job_id: str) -> None:
        pass

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        pass

    def on_checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        pass

    def on_train_end(self, final: dict[str, Any]) -> None:
        """The job trained to its end; `final` is its status (as `orchestra status --json`)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def record_fields(self) -> dict[str, Any]:
        return {}
