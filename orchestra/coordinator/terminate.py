"""Keras's `TerminateOnNaN`, decided on the driver from whole epochs.

A worker that stopped on its own would leave the others waiting in a
collective; decided on the driver, the stop reaches every worker in the
same epoch, as every other decision does.
"""

from __future__ import annotations

import math

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.protocol import Decision


class TerminateOnNaN(CoordinatorCallback):
    """End the job FAILED after the first epoch whose aggregated `loss` (or,
    without one, any metric) is NaN or infinite; the reason names the
    metric and the epoch. No checkpoint of that epoch is saved and the
    workers save no final model: the weights are not numbers any more.

    Keras's callback looks at every batch's loss; the driver sees whole
    epochs, so a job runs to the end of the epoch that diverged.

    Example:

        >>> decision = Decision()
        >>> TerminateOnNaN().on_epoch_end(EpochResult(3, {"loss": float("nan")}, 1.0, 1.0), decision)
        >>> decision.stop, decision.failure
        (True, 'TerminateOnNaN: loss is nan at epoch 3')
    """

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        names = ["loss"] if "loss" in result.metrics else sorted(result.metrics)
        for name in names:
            value = result.metrics[name]
            if not math.isfinite(value):
                decision.stop = True
                decision.checkpoint = None
                decision.snapshot_best_weights = False
                decision.failure = f"TerminateOnNaN: {name} is {value} at epoch {result.epoch}"
                return
