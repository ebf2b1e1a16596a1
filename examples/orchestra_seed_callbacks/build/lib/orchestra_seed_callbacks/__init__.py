"""Seed 004's custom callbacks, as an orchestra plugin package.

Seed 004 subclasses `keras.callbacks.Callback` twice: one callback prints the
epoch and the keys of Keras's logs at each epoch end, one acts at train end.
Here they are driver-side callbacks: they see the whole job's aggregated
metrics once per epoch, wherever the workers run. The package registers them
in its `pyproject.toml`:

    [project.entry-points."orchestra.callbacks"]
    epoch_logger = "orchestra_seed_callbacks:EpochLogger"
    train_summary = "orchestra_seed_callbacks:TrainSummary"

and a spec names them with plain arguments:

    "callbacks": [{"class_name": "epoch_logger", "config": {}},
                  {"class_name": "train_summary", "config": {"monitor": "val_accuracy", "mode": "max"}}]
"""

from __future__ import annotations

import math
from typing import Any

from orchestra import CoordinatorCallback, Decision, EpochResult


class EpochLogger(CoordinatorCallback):
    """Prints the epoch and the names of the logged metrics at each epoch
    end, as seed 004's `MyCallback.on_epoch_end` does
    (`print('epoch', epoch, list(logs.keys()))`): the lines go to the job's
    driver log (`orchestra logs JOB`).

    Args:
        prefix: the start of each line.

    Example:

    >>> from orchestra import Decision, EpochResult
    >>> EpochLogger().on_epoch_end(EpochResult(1, {"loss": 0.5, "accuracy": 0.8}, 1.0, 10.0), Decision())
    epoch 1 ['loss', 'accuracy']
    """

    def __init__(self, prefix: str = "epoch"):
        self.prefix = prefix

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        print(self.prefix, result.epoch, list(result.metrics), flush=True)


class TrainSummary(CoordinatorCallback):
    """Keeps the best value of a metric and writes a summary at train end:
    the running best is logged each epoch (`best_<monitor>` in the history
    and on TensorBoard), the summary goes into the job record
    (`orchestra status --json` → `plugins.train_summary`) and the log.

    Args:
        monitor: the metric to follow, e.g. `val_loss`.
        mode: `min` or `max`: which way is better.

    Example:

    >>> from orchestra import Decision, EpochResult
    >>> summary = TrainSummary(monitor="loss", mode="min")
    >>> for epoch, loss in enumerate([0.9, 0.4, 0.6], start=1):
    ...     summary.on_epoch_end(EpochResult(epoch, {"loss": loss}, 1.0, 10.0), Decision())
    >>> summary.record_fields()
    {'monitor': 'loss', 'best_epoch': 2, 'best': 0.4, 'epochs': 3}
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.epochs = 0

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        self.epochs = result.epoch
        value = result.metrics.get(self.monitor)
        if value is None or math.isnan(value):
            return
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_epoch = value, result.epoch
        result.add_scalar(f"best_{self.monitor}", self.best)

    def on_train_end(self, final: dict[str, Any]) -> None:
        print(f"train summary: {self.epochs} epochs, best {self.monitor} {self.best} at epoch {self.best_epoch}",
              flush=True)

    def state_dict(self) -> dict[str, Any]:
        return self.record_fields()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.epochs = state["best"], state["best_epoch"], state["epochs"]

    def record_fields(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best_epoch": self.best_epoch, "best": self.best, "epochs": self.epochs}
