"""Everything that crosses the driver–worker boundary, as types.

Ray pickles these dataclasses between the driver, the channel actor and the
workers; nothing crosses as a string-keyed dict. The conversation of one
attempt of a worker group:

    worker                      channel actor                 driver (Coordinator)
    start(rank, pid, group) ──► WorkerStarted ──────────────► on_worker_started
        ◄── StartReply(attempt, checkpoint)
    report(WorkerReport) ─────► EpochReports (all ranks) ───► on_epoch
        ◄── Decision ◄───────────────────────────────────────── decide
    checkpoint_saved(attempt, ref) ► CheckpointSaved ──────────► on_checkpoint_saved
    progress(StepProgress) ───► StepProgress (rank 0, ~1/s) ─► on_progress
    finished(FinalResult) ────► Finished ───────────────────► on_finished
    (a new group starts)   ──► Restarted(attempt, checkpoint) ► on_restart
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from orchestra.spec import JobSpec

if TYPE_CHECKING:
    from orchestra.build.images import ImageSplits
    from orchestra.storage.lease import Fence


@dataclass(frozen=True)
class CheckpointRef:
    """A published checkpoint: the epoch it holds (counted from 1) and its folder."""

    epoch: int
    path: str


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a job is started with.

    Args:
        spec: the checked spec.
        npz_path: the `.npz` the data comes from (None: Keras's download, or images).
        datasets_dir: where dataset names are looked up.
        model_dir: where the final model is saved.
        tensorboard_dir: the job's TensorBoard folder (weight histograms).
        images: the image files the driver found readable (an `ImageSplits`), or None.
        channel: the channel actor's handle (None in the in-process run).
        lease: the driver's lease generation, which the chief checks before
            it publishes a checkpoint or the model (None: unchecked).
    """

    spec: JobSpec
    npz_path: str | None
    datasets_dir: str
    model_dir: str
    tensorboard_dir: str
    images: ImageSplits | None = None
    channel: Any = None
    lease: Fence | None = None


@dataclass(frozen=True)
class StartReply:
    """The channel's answer to a starting worker: which attempt of the
    worker group it belongs to, and the checkpoint to resume from."""

    attempt: int
    checkpoint: CheckpointRef | None


@dataclass(frozen=True)
class WorkerReport:
    """What one worker sends at the end of an epoch (epochs count from 1)."""

    rank: int
    epoch: int
    logs: dict[str, float]
    epoch_time: float
    samples: int
    batch_losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    # In a worker's first report: when its start-up steps ended (Unix time), e.g. {"tensorflow": ..., "data": ...}.
    startup: dict[str, float] | None = None


@dataclass(frozen=True)
class CheckpointOrder:
    """Save a checkpoint into `directory`, with the driver's callback state."""

    directory: str
    weights_only: bool
    state: dict[str, Any]


@dataclass
class Decision:
    """What every worker does after an epoch, the same on every worker.

    `superseded` tells a worker of an old attempt (a group Ray Train has
    replaced) to stop without finishing the job; `failure` (a reason) ends
    the job FAILED: every worker stops without saving a final model.
    `learning_rate`, when set, is the rate every worker trains the next
    epoch with (ReduceLROnPlateau, LearningRateScheduler)."""

    stop: bool = False
    snapshot_best_weights: bool = False
    checkpoint: CheckpointOrder | None = None
    superseded: bool = False
    learning_rate: float | None = None
    failure: str | None = None

    @property
    def finishes(self) -> bool:
        """Whether the workers go on to test and save the final model once training stops."""
        return not self.superseded and self.failure is None


@dataclass(frozen=True)
class FinalResult:
    """The chief's last word: test metrics (None without test data) and the final model's folder."""

    test_metrics: dict[str, float] | None
    model_path: str


# Events the channel hands the driver, one class per kind.

@dataclass(frozen=True)
class WorkerStarted:
    rank: int
    pid: int


@dataclass(frozen=True)
class EpochReports:
    """Every rank's report of one epoch of one attempt, ordered by rank."""

    attempt: int
    epoch: int
    reports: tuple[WorkerReport, ...]


@dataclass(frozen=True)
class CheckpointSaved:
    checkpoint: CheckpointRef


@dataclass(frozen=True)
class Restarted:
    """Ray Train started a new worker group; it resumes from `checkpoint`."""

    attempt: int
    checkpoint: CheckpointRef | None


@dataclass(frozen=True)
class Finished:
    result: FinalResult


@dataclass(frozen=True)
class StepProgress:
    """Where the chief is inside an epoch (epochs from 1), sent about once a
    second, never through a collective: what a progress bar needs."""

    epoch: int
    step: int
    steps: int
    elapsed: float
    samples: int
    loss: float | None = None


Event = Union[WorkerStarted, EpochReports, CheckpointSaved, Restarted, Finished, StepProgress]
