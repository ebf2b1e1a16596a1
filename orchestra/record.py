"""The job record and the explicit state machine of a job's life.

    PENDING ──► RUNNING ──► SUCCEEDED
       │           │──────► FAILED
       └───────────┴──────► STOPPED / FAILED
    STOPPED / FAILED ──► PENDING   (`orchestra resume`)

A record is the one file `status`, `list` and the client read; the
coordinator rewrites it atomically after every epoch.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED})

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.STOPPED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.STOPPED: frozenset({JobState.PENDING}),
}


class InvalidTransition(RuntimeError):
    pass


class CheckpointEntry(BaseModel):
    epoch: int
    path: str
    value: float | None = None


class JobStatus(BaseModel):
    """A job's status; the same fields as `orchestra status --json`."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    job_id: str
    name: str
    state: JobState
    reason: str | None = None
    workers: int
    mode: Literal["ray", "in_process"] = "ray"
    epochs_completed: int = 0
    stopped_epoch: int | None = None
    best_epoch: int | None = None
    best_value: float | None = None
    monitor: str | None = None
    metrics: dict[str, int | float] = Field(default_factory=dict, description="The last epoch's history entry.")
    checkpoint: str | None = Field(default=None, description="The best checkpoint.")
    model: str | None = Field(default=None, description="The model training ended with.")
    tensorboard_logdir: str | None = None
    test_metrics: dict[str, float] | None = None
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    restarts: int = 0
    resumes: int = 0
    warnings: list[str] = Field(default_factory=list)
    heartbeat_at: float | None = None
    class_names: list[str] | None = None
    skipped_files: int = 0


class JobRecord(BaseModel):
    """Everything known about one job. Epochs are counted from 1, as Keras
    prints them: `stopped_epoch` 146 is Keras's `stopped_epoch + 1`."""

    # A diverging job logs NaN: keep it as JSON's NaN rather than a null that cannot be read back.
    model_config = ConfigDict(validate_assignment=True, ser_json_inf_nan="constants")

    job_id: str
    name: str
    state: JobState = JobState.PENDING
    reason: str | None = Field(default=None, description="Why the job is in its state, e.g. the error.")
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    workers: int
    mode: Literal["ray", "in_process"] = Field(
        default="ray", description="Ray Train workers, or the in-process reference run."
    )
    spec: dict[str, Any]
    input_shape: list[int] = Field(default_factory=list, description="Shape of one example, as the model sees it.")
    epochs_completed: int = 0
    stopped_epoch: int | None = None
    monitor: str | None = None
    best_epoch: int | None = None
    best_value: float | None = None
    history: list[dict[str, int | float]] = Field(default_factory=list)
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    best_checkpoint: str | None = None
    model_path: str | None = Field(default=None, description="The model training ended with.")
    tensorboard_logdir: str | None = None
    test_metrics: dict[str, float] | None = None
    restarts: int = 0
    resumes: int = Field(default=0, description="How many times `orchestra resume` continued the job.")
    warnings: list[str] = Field(default_factory=list, description="Optional writes that failed; training went on.")
    driver_pid: int | None = Field(default=None, description="The driver process that owns the job.")
    driver_host: str | None = None
    heartbeat_at: float | None = Field(default=None, description="The driver's last sign of life (Unix time).")
    worker_pids: dict[str, int] = Field(default_factory=dict, description="Process id of each rank's worker.")
    examples_dropped_per_epoch: int = 0
    class_names: list[str] | None = Field(default=None, description="An image folder's classes, in label order.")
    skipped_files: int = Field(default=0, description="Files of an image folder that are not readable images.")
    skipped_examples: list[str] = Field(default_factory=list, description="The first few skipped files.")

    def transition(self, new: JobState, reason: str | None = None) -> None:
        if new not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.job_id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
        self.reason = reason
        now = time.time()
        if new is JobState.RUNNING:
            self.started_at = now
        if new.is_terminal:
            self.ended_at = now
        if new is JobState.PENDING:
            self.ended_at = None

    def status(self) -> JobStatus:
        """What `orchestra status --json` prints and `Client.status` returns."""
        return JobStatus(
            **self.model_dump(include=set(JobStatus.model_fields) & set(JobRecord.model_fields)),
            metrics=self.history[-1] if self.history else {},
            checkpoint=self.best_checkpoint,
            model=self.model_path,
        )
