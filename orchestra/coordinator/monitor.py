"""Keras's rule for "is this value better?", shared by the callbacks."""

from __future__ import annotations

import operator
from dataclasses import dataclass


def early_stopping_mode(monitor: str, mode: str) -> str:
    """EarlyStopping's `auto`: max for names ending in acc/accuracy/auc."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith(("acc", "accuracy", "auc")) else "min"


def checkpoint_mode(monitor: str, mode: str) -> str:
    """ModelCheckpoint's `auto`: max when 'acc' is in the name or it starts with fmeasure."""
    if mode != "auto":
        return mode
    return "max" if "acc" in monitor or monitor.startswith("fmeasure") else "min"


@dataclass(frozen=True)
class Monitor:
    """A monitored metric with a direction and Keras's `min_delta`.

    As in Keras, `current` improves on `reference` when it is better by more
    than `min_delta`: `current + min_delta < reference` for `min`,
    `current - min_delta > reference` for `max`.
    """

    name: str
    mode: str  # "min" or "max", already resolved
    min_delta: float = 0.0

    @property
    def worst(self) -> float:
        return float("inf") if self.mode == "min" else float("-inf")

    def is_improvement(self, current: float, reference: float) -> bool:
        if self.mode == "min":
            return bool(operator.lt(current + self.min_delta, reference))
        return bool(operator.gt(current - self.min_delta, reference))
