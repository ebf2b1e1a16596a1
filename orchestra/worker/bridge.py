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
    WorkerReport,
)
from orchestra.worker.histograms import WeightHistograms
from orchestra.worker.saving import collective_save


class RayChannel:
    """The channel actor seen from a worker: plain blocking calls."""

    def __init__(self, handle):
        self.handle = handle

    def start(self, rank: int, pid: int, group: str) -> StartReply:
        return _get(self.handle.start.remote(rank, pid, group))

    def report(self, attempt: int, report: WorkerReport) -> Decision:
        return _get(self.handle.report.remote(attempt, report))

    def checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        _get(self.handle.checkpoint_saved.remote(checkpoint))

    def finished(self, result: FinalResult) -> None:
        _get(self.handle.finished.remote(result))


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
                     log_batches: bool, histograms: WeightHistograms | None = None):
    """The Keras callback that reports each epoch to the driver and carries
    out its decision (stop, snapshot the best weights, checkpoint)."""
    from orchestra.keras_compat import keras

    class ChannelCallback(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best_weights = best_weights
            self.superseded = False  # a newer attempt of the worker group took over

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.batch_losses = []

        def on_train_batch_end(self, batch, logs=None):
            if log_batches and logs and "loss" in logs:
                self.batch_losses.append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            logs = {key: float(value) for key, value in (logs or {}).items()}
            learning_rate = getattr(self.model.optimizer, "learning_rate", None)
            if learning_rate is not None and not callable(learning_rate):
                logs["learning_rate"] = float(learning_rate.numpy())
            report = WorkerReport(
                rank=rank, epoch=epoch + 1, logs=logs,
                epoch_time=time.perf_counter() - self.started,
                samples=samples_per_epoch, batch_losses=self.batch_losses,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )
            self.obey(channel.report(attempt, report))
            if histograms is not None:
                histograms.write(self.model, epoch + 1)

        def obey(self, decision: Decision) -> None:
            if decision.snapshot_best_weights:
                self.best_weights = self.model.get_weights()
            order = decision.checkpoint
            if order is not None:
                final = Path(order.directory)
                final.parent.mkdir(parents=True, exist_ok=True)
                collective_save(self.model, final, rank, order.weights_only, order.state, self.best_weights)
                if rank == 0:
                    channel.checkpoint_saved(CheckpointRef(order.state["epoch"], str(final)))
            if decision.stop:
                self.model.stop_training = True
                self.superseded = decision.superseded

        def on_train_end(self, logs=None):
            if self.best_weights is not None and not self.superseded:
                self.model.set_weights(self.best_weights)

    return ChannelCallback()
