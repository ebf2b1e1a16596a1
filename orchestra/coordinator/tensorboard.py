"""TensorBoard event files for the whole job, written by the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestra.coordinator.base import CoordinatorCallback, Decision, EpochResult
from orchestra.keras_compat import tensorflow


class TensorBoard(CoordinatorCallback):
    """One `train` and one `validation` run under `logdir`, as Keras's
    TensorBoard callback lays them out: `epoch_loss`, `epoch_<metric>`
    (validation values without their `val_` prefix), `epoch_learning_rate`,
    plus `epoch_time_seconds` and `epoch_samples_per_second`; one point per
    epoch at step = epoch (counted from 1), flushed every epoch so a running
    job's curves grow. With `update_freq="batch"`, `batch_loss` at the global
    step of every batch too.

    Args:
        logdir: the job's TensorBoard folder.
        update_freq: `epoch` or `batch`.

    Example:

        >>> import tempfile
        >>> from orchestra.coordinator.base import Decision, EpochResult
        >>> board = TensorBoard(tempfile.mkdtemp())
        >>> board.on_epoch_end(EpochResult(1, {"loss": 0.5, "val_loss": 0.6}, 1.0, 10.0), Decision())
        >>> board.on_job_end({})
    """

    def __init__(self, logdir: str | Path, update_freq: str = "epoch"):
        self.logdir = Path(logdir)
        self.update_freq = update_freq
        self._writers: dict[str, Any] = {}

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = tensorflow().summary.create_file_writer(str(self.logdir / run))
        return self._writers[run]

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        tf = tensorflow()
        train = {k: v for k, v in result.metrics.items() if not k.startswith("val_")}
        train["time_seconds"] = result.epoch_time
        train["samples_per_second"] = result.samples_per_second
        validation = {k[4:]: v for k, v in result.metrics.items() if k.startswith("val_")}
        for run, scalars in (("train", train), ("validation", validation)):
            if not scalars:
                continue
            with self._writer(run).as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(f"epoch_{name}", value, step=result.epoch)
                if run == "train" and self.update_freq == "batch":
                    first = (result.epoch - 1) * result.steps
                    for i, loss in enumerate(result.batch_losses, start=1):
                        tf.summary.scalar("batch_loss", loss, step=first + i)
            self._writers[run].flush()

    def on_job_end(self, final: dict[str, Any]) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def record_fields(self) -> dict[str, Any]:
        return {"tensorboard_logdir": str(self.logdir)}
