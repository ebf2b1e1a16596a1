"""The learning rate, decided once for the whole job on the driver: Keras's
`ReduceLROnPlateau` and `LearningRateScheduler`. The rate they choose
travels in the epoch's `Decision`, and every worker sets it before the next
epoch, so all replicas train the same epoch at the same rate."""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.protocol import Decision
from orchestra.spec.callbacks import ScheduleSpec


def current_learning_rate(result: EpochResult, decision: Decision) -> float:
    """The rate the workers will train with next unless told otherwise: one
    a callback earlier in this epoch decided, else the one they reported."""
    if decision.learning_rate is not None:
        return decision.learning_rate
    if "learning_rate" not in result.metrics:
        raise ValueError("the workers report no learning_rate (is the optimizer's learning rate a schedule?)")
    return result.metrics["learning_rate"]


class ReduceLROnPlateau(CoordinatorCallback):
    """Keras's `ReduceLROnPlateau`, line for line, on the epoch's aggregated
    metrics: after `patience` epochs without an improvement of `monitor` by
    more than `min_delta`, the rate becomes `rate * factor` (not below
    `min_lr`), then `cooldown` epochs pass before counting again.

    Args:
        monitor: metric name, e.g. `val_loss`.
        factor: what the rate is multiplied by, in (0, 1).
        patience: epochs without improvement before a reduction.
        mode: `auto`, `min` or `max`; `auto` is max when `acc` is in the name.
        min_delta: smallest change that counts as an improvement.
        cooldown: epochs after a reduction during which the wait stays 0.
        min_lr: the rate never goes below this.

    Example:

        >>> reducer = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1)
        >>> for epoch, loss in enumerate([0.5, 0.6], start=1):
        ...     decision = Decision()
        ...     reducer.on_epoch_end(EpochResult(epoch, {"val_loss": loss, "learning_rate": 0.5}, 1.0, 1.0),
        ...                          decision)
        >>> decision.learning_rate
        0.25
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, mode: str = "auto",
                 min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0):
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1) (got {factor})")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.maximize = mode == "max" or (mode == "auto" and "acc" in monitor)
        self.best = -np.inf if self.maximize else np.inf
        self.wait = 0
        self.cooldown_counter = 0
        self.reductions: list[dict[str, float]] = []  # {"epoch", "learning_rate"}

    def _improves(self, current: float, best: float) -> bool:
        if self.maximize:
            return bool(np.greater(current, best + self.min_delta))
        return bool(np.less(current, best - self.min_delta))

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        current = result.metrics.get(self.monitor)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improves(current, self.best):
            self.best = current
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = np.float32(current_learning_rate(result, decision))
                if old > np.float32(self.min_lr):
                    new = max(float(old * self.factor), self.min_lr)
                    decision.learning_rate = new
                    self.reductions.append({"epoch": result.epoch, "learning_rate": new})
                    self.cooldown_counter = self.cooldown
                    self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": float(self.best), "wait": self.wait, "cooldown_counter": self.cooldown_counter,
                "reductions": list(self.reductions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.wait, self.cooldown_counter = int(state["wait"]), int(state["cooldown_counter"])
        self.reductions = [{"epoch": int(r["epoch"]), "learning_rate": float(r["learning_rate"])}
                           for r in state["reductions"]]


def scheduled_learning_rate(schedule: ScheduleSpec, epoch_index: int) -> float:
    """The rate of the epoch `epoch_index` (from 0, as Keras counts it for a
    `LearningRateScheduler`): the Keras schedule evaluated at that index,
    as float32 as the optimizer holds it."""
    from orchestra.keras_compat import keras

    function = keras().optimizers.schedules.deserialize(schedule.keras_config())
    return float(np.float32(function(epoch_index)))


class LearningRateScheduler(CoordinatorCallback):
    """Keras's `LearningRateScheduler` with a named schedule: the rate of
    each epoch is `schedule(epoch index)`. Keras sets it when the epoch
    begins; here the driver decides it when the epoch before ends (after the
    other callbacks, as Keras's `on_epoch_begin` comes after every
    `on_epoch_end`), and the workers set the first epoch's themselves from
    the same schedule before training.

    Args:
        schedule: a `keras.optimizers.schedules` class and config.

    Example:

        >>> from orchestra.spec.callbacks import ScheduleSpec
        >>> halve = ScheduleSpec.model_validate({"class_name": "ExponentialDecay", "config": {
        ...     "initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 0.5}})
        >>> decision = Decision()
        >>> LearningRateScheduler(halve).on_epoch_end(EpochResult(1, {"loss": 1.0}, 1.0, 1.0), decision)
        >>> decision.learning_rate
        0.05000000074505806
    """

    def __init__(self, schedule: ScheduleSpec):
        self.schedule = schedule

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        decision.learning_rate = scheduled_learning_rate(self.schedule, result.epoch)
