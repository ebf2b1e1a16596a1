"""The `callbacks` section: Keras's callbacks, each decided once for the whole
job on the driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestra.spec._base import Mode, StrictModel


class EarlyStoppingSpec(StrictModel):
    """Keras's `EarlyStopping`, decided once for the whole job on the driver."""

    monitor: str = "val_loss"
    min_delta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    patience: int = Field(default=0, ge=0)
    mode: Mode = "auto"
    baseline: float | None = Field(default=None, allow_inf_nan=False)
    restore_best_weights: bool = False
    start_from_epoch: int = Field(default=0, ge=0)


class CheckpointSpec(StrictModel):
    """Keras's `ModelCheckpoint`, written to shared storage by the workers on
    the driver's decision."""

    monitor: str = "val_loss"
    mode: Mode = "auto"
    save_best_only: bool = False
    save_weights_only: bool = False
    keep: int = Field(default=3, ge=1, description="Keep the newest N checkpoints (the best is always kept).")


class TensorBoardSpec(StrictModel):
    update_freq: Literal["epoch", "batch"] = "epoch"
    histogram_freq: int = Field(default=0, ge=0, description="Weight histograms every N epochs (0: off).")


class CallbacksSpec(StrictModel):
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint: CheckpointSpec | None = None
    tensorboard: TensorBoardSpec | None = Field(default_factory=TensorBoardSpec)

