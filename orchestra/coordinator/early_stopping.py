"""Early stopping, decided once for the whole job with Keras's semantics."""

from __future__ import annotations

from typing import Any

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.monitor import Monitor, early_stopping_mode
from orchestra.coordinator.protocol import Decision


class EarlyStopping(CoordinatorCallback):
    """Stop every worker on the same epoch once `monitor` stops improving.

    The rule is Keras's `EarlyStopping`, line for line: an epoch improves
    when it beats the best by more than `min_delta`; the wait count resets
    only if it also beats `baseline`; training stops when the wait reaches
    `patience` (never on the first epoch); epochs before `start_from_epoch`
    are ignored. With `restore_best_weights`, workers snapshot their weights
    whenever Keras's callback would, and the model training ends with is the
    best epoch's.

    Epochs here count from 1; `stopped_epoch` is Keras's `stopped_epoch + 1`
    (0 when training did not stop early) and `best_epoch` Keras's
    `best_epoch + 1`.

    Args:
        monitor: metric name in the epoch logs, e.g. `val_loss`.
        min_delta: smallest change that counts as an improvement.
        patience: epochs without improvement before stopping.
        mode: `auto`, `min` or `max`; `auto` is max for names ending in
            acc, accuracy or auc.
        baseline: a value the monitor must beat for the wait to reset.
        restore_best_weights: end training with the best epoch's weights.
        start_from_epoch: warm-up epochs (Keras's count) not monitored.

    Example:

        >>> stopper = EarlyStopping(monitor="val_loss", patience=1)
        >>> from orchestra.coordinator.base import EpochResult
        >>> from orchestra.coordinator.protocol import Decision
        >>> for epoch, loss in enumerate([0.5, 0.4, 0.45, 0.46], start=1):
        ...     decision = Decision()
        ...     stopper.on_epoch_end(EpochResult(epoch, {"val_loss": loss}, 1.0, 1.0), decision)
        ...     if decision.stop:  # every worker stops after this epoch
        ...         break
        >>> epoch, stopper.stopped_epoch, stopper.best_epoch
        (3, 3, 2)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        self.monitor = Monitor(monitor, early_stopping_mode(monitor, mode), abs(min_delta))
        self.patience = patience
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.wait = 0
        self.stopped_epoch = 0
        self.best = self.monitor.worst
        self.best_epoch = 0
        self.has_best_weights = False

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        keras_epoch = result.epoch - 1
        current = result.metrics.get(self.monitor.name)
        if current is None or keras_epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and not self.has_best_weights:
            # Keras keeps the first monitored epoch's weights in case nothing improves.
            self.has_best_weights = True
            decision.snapshot_best_weights = True
            self.best_epoch = result.epoch
        self.wait += 1
        if self.monitor.is_improvement(current, self.best):
            self.best = current
            self.best_epoch = result.epoch
            if self.restore_best_weights:
                decision.snapshot_best_weights = True
            if self.baseline is None or self.monitor.is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and keras_epoch > 0:
            self.stopped_epoch = result.epoch
            decision.stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "has_best_weights": self.has_best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = state["wait"]
        self.stopped_epoch = state["stopped_epoch"]
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.has_best_weights = state["has_best_weights"]

    def record_fields(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor.name,
            "stopped_epoch": self.stopped_epoch or None,
            "best_epoch": self.best_epoch or None,
            "best_value": None if self.best_epoch == 0 else self.best,
        }
