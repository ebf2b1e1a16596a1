"""The worker's side of the driver conversation: a Keras callback that
reports every epoch and carries out the driver's decision."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from orchestra.coordinator.protocol import (
    CheckpointRef,
    Decision,
    FinalResult,
    StartReply,
    StepProgress,
    WorkerReport,
)
from orchestra.worker.histograms import WeightHistograms
from orchestra.worker.saving import CheckpointWriter, learning_rate_of


class RayChannel:
    """The channel actor seen from a worker: plain blocking calls, from any thread."""

    thread_safe = True

    def __init__(self, handle):
        self.handle = handle

    def start(self, rank: int, pid: int, group: str) -> StartReply:
        return _get(self.handle.start.remote(rank, pid, group))

    def report(self, attempt: int, report: WorkerReport) -> Decision:
        return _get(self.handle.report.remote(attempt, report))

    def checkpoint_saved(self, attempt: int, checkpoint: CheckpointRef) -> None:
        _get(self.handle.checkpoint_saved.remote(attempt, checkpoint))

    def finished(self, result: FinalResult) -> None:
        _get(self.handle.finished.remote(result))

    def progress(self, progress: StepProgress) -> None:
        self.handle.progress.remote(progress)  # fire-and-forget: training never waits on it


def _get(ref):
    import ray

    return ray.get(ref)


def worker_group() -> str:
    """Names this worker's group: Ray Train gives every group it starts
    fresh addresses in TF_CONFIG, so a restarted group has a new name."""
    import json

    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return ",".join(cluster.get("worker", [])) or f"local-{os.getpid()}"


def channel_callback(channel, attempt: int, rank: int, best_weights: list | None, samples_per_epoch: int,
                     log_batches: bool, histograms: WeightHistograms | None = None,
                     startup: dict[str, float] | None = None, fence=None):
    """The Keras callback that reports each epoch to the driver and carries
    out its decision (stop, snapshot the best weights, checkpoint).

    Checkpoints are written in the background (`CheckpointWriter`): the
    previous one is awaited at the next epoch end, before the report (so the
    driver hears of it first, and a failed write fails the job there), and
    the last one at the end of training, before the final model is saved.
    Call `drain` after `fit` too: `fit` skips `on_train_end` when it raises."""
    from orchestra.keras_compat import keras

    class ChannelCallback(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best_weights = best_weights
            self.superseded = False  # a newer attempt of the worker group took over
            self.finishes = True  # test and save the final model after fit (not if superseded or failed)
            self.reported = False  # the first report carries the start-up marks
            self.checkpoints = CheckpointWriter(rank, lambda ref: channel.checkpoint_saved(attempt, ref),
                                                notify_in_background=getattr(channel, "thread_safe", False),
                                                fence=fence)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.batch_losses = []

        def on_train_batch_end(self, batch, logs=None):
            if log_batches and logs and "loss" in logs:
                self.batch_losses.append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            self.checkpoints.wait()
            logs = {key: float(value) for key, value in (logs or {}).items()}
            learning_rate = learning_rate_of(self.model.optimizer)
            if learning_rate is not None:
                logs["learning_rate"] = learning_rate
            report = WorkerReport(
                rank=rank, epoch=epoch + 1, logs=logs,
                epoch_time=time.perf_counter() - self.started,
                samples=samples_per_epoch, batch_losses=self.batch_losses,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                startup=None if self.reported else startup,
            )
            self.reported = True
            self.obey(channel.report(attempt, report))
            if histograms is not None:
                histograms.write(self.model, epoch + 1)

        def obey(self, decision: Decision) -> None:
            if decision.snapshot_best_weights:
                self.best_weights = self.model.get_weights()
            order = decision.checkpoint
            if order is not None:
                final = Path(order.directory)
                self.checkpoints.save(self.model, final, order.weights_only, order.state, self.best_weights,
                                      CheckpointRef(order.state["epoch"], str(final)))
            if decision.learning_rate is not None:
                set_learning_rate(self.model, decision.learning_rate)
            if decision.stop:
                self.model.stop_training = True
                self.superseded = decision.superseded
                self.finishes = decision.finishes

        def drain(self, raise_errors: bool = True) -> None:
            """Wait until the last checkpoint is published; raise its failure."""
            self.checkpoints.close(raise_errors)

        def on_train_end(self, logs=None):
            self.drain()
            if self.best_weights is not None and self.finishes:
                self.model.set_weights(self.best_weights)

    return ChannelCallback()


def set_learning_rate(model, value: float) -> None:
    """Set the optimizer's rate for the next epoch, as Keras's
    ReduceLROnPlateau and LearningRateScheduler do."""
    from orchestra.keras_compat import keras

    keras().backend.set_value(model.optimizer.learning_rate, value)
