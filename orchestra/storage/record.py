"""The job record and the explicit state machine of a job's life.

    PENDING ──start──► RUNNING ──finish──► SUCCEEDED
       │                  │────fail─────► FAILED
       └──fail / stop─────┴────stop─────► STOPPED
    STOPPED / FAILED ──reopen──► PENDING   (`orchestra resume`)

Every move is a method of `JobRecord` below, checked against
`ALLOWED_TRANSITIONS`; nothing else sets a record's state. A record is the
one file `status`, `list` and the client read; the coordinator rewrites it
atomically after every epoch. `JobStatus` is its projection: the record's
own field names, without the spec and the history.

In memory a record's paths are absolute (what `status` shows); in its file
they are names relative to the job folder (`JobRecord.stored`), resolved and
checked when read back (`JobRecord.from_stored`): a record is input too.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestra.errors import JobStateError, StorageError
from orchestra.storage import bucket
from orchestra.storage.paths import resolve_stored, stored_name


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


class InvalidTransition(JobStateError):
    """A move the state table does not allow."""


class CheckpointEntry(BaseModel):
    epoch: int
    path: str
    value: float | None = None


class JobProgress(BaseModel):
    """Where a running job is inside its current epoch, and when it should end."""

    epoch: int
    epochs: int
    step: int
    steps: int
    samples_per_second: float
    epoch_eta_seconds: float
    job_eta_seconds: float
    loss: float | None = None

    def bar(self, width: int = 30) -> str:
        """`epoch 3/30 [#########.....] 120/400  812 samples/s  epoch ETA 0:12  job ETA 5:31  loss 0.2514`"""
        done = int(width * self.step / max(1, self.steps))
        loss = f"  loss {format_value(self.loss)}" if self.loss is not None else ""
        return (f"epoch {self.epoch}/{self.epochs} [{'#' * done}{'.' * (width - done)}] {self.step}/{self.steps}  "
                f"{self.samples_per_second:.0f} samples/s  epoch ETA {_clock(self.epoch_eta_seconds)}  "
                f"job ETA {_clock(self.job_eta_seconds)}{loss}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Attempt(BaseModel):
    """One run of a job's driver: the job's first, then one per `orchestra resume`."""

    workers: int
    from_epoch: int = Field(default=0, description="The checkpoint's epoch it continued from (0: the start).")
    started_at: float = Field(default_factory=time.time)
    ray_job: str | None = Field(default=None, description="The Ray job (submission id) it ran as, on a cluster.")


class _JobFields(BaseModel):
    """The fields a status and a record share, under the same names."""

    # A diverging job logs NaN: keep it as JSON's NaN rather than a null that cannot be read back.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    job_id: str
    name: str
    state: JobState = JobState.PENDING
    reason: str | None = Field(default=None, description="Why the job is in its state, e.g. the error.")
    workers: int
    mode: Literal["ray", "in_process"] = Field(
        default="ray", description="Ray Train workers, or the in-process reference run."
    )
    epochs_completed: int = 0
    stopped_epoch: int | None = None
    monitor: str | None = None
    best_epoch: int | None = None
    best_value: float | None = None
    best_checkpoint: str | None = Field(default=None, description="The best checkpoint's folder.")
    model_path: str | None = Field(default=None, description="The model training ended with.")
    tensorboard_logdir: str | None = None
    test_metrics: dict[str, float] | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    restarts: int = 0
    resumes: int = Field(default=0, description="How many times `orchestra resume` continued the job.")
    warnings: list[str] = Field(default_factory=list, description="Optional writes that failed; training went on.")
    heartbeat_at: float | None = Field(default=None, description="The driver's last sign of life (Unix time).")
    class_names: list[str] | None = Field(default=None, description="An image folder's classes, in label order.")
    skipped_files: int = Field(default=0, description="Files of an image folder that are not readable images.")
    metrics: dict[str, int | float] = Field(default_factory=dict, description="The last epoch's history entry.")
    attempts: list[Attempt] = Field(default_factory=list, description="Each run of the job's driver, oldest first.")
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="What each plugin callback adds to the record, under its registered name.")


class JobStatus(_JobFields):
    """A job's status: what `orchestra status --json` prints and
    `Client.status` returns."""

    progress: JobProgress | None = Field(default=None, description="Inside the current epoch, while it runs.")

    def summary(self) -> str:
        """The few lines `orchestra status` prints."""
        lines = [f"job {self.job_id}: {self.state.value}" + (f" ({self.reason})" if self.reason else "")]
        lines.append(f"  epochs completed  {self.epochs_completed}"
                     + (f", stopped early at epoch {self.stopped_epoch}" if self.stopped_epoch else ""))
        if self.progress is not None and not self.state.is_terminal:
            lines.append(f"  progress          {self.progress.bar()}")
        if self.best_epoch is not None:
            lines.append(f"  best epoch        {self.best_epoch} ({self.monitor} {format_value(self.best_value)})")
        if self.skipped_files:
            lines.append(f"  skipped files     {self.skipped_files} (not readable images; see the record)")
        if self.test_metrics:
            tests = "  ".join(f"{k} {format_value(v)}" for k, v in self.test_metrics.items())
            lines.append(f"  test              {tests}")
        for label, value in (("best checkpoint", self.best_checkpoint), ("model", self.model_path),
                             ("tensorboard", self.tensorboard_logdir)):
            if value:
                place = bucket.locate(value)  # a job on a bucket: where it is there, not in this process's mirror
                lines.append(f"  {label:<17} {place.uri if place else value}")
        return "\n".join(lines)


class JobRecord(_JobFields):
    """Everything known about one job. Epochs are counted from 1, as Keras
    prints them: `stopped_epoch` 146 is Keras's `stopped_epoch + 1`."""

    model_config = ConfigDict(validate_assignment=True, ser_json_inf_nan="constants")

    spec: dict[str, Any]
    input_shape: list[int] = Field(default_factory=list, description="Shape of one example, as the model sees it.")
    # Kept in <job>/history.jsonl, one line per epoch, not in the record's file.
    history: list[dict[str, int | float]] = Field(default_factory=list, exclude=True)
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    driver_pid: int | None = Field(default=None, description="The driver process that owns the job.")
    driver_host: str | None = None
    generation: int = Field(default=0, description="The driver's lease generation, one more for each new owner.")
    worker_pids: dict[str, int] = Field(default_factory=dict, description="Process id of each rank's worker.")
    examples_dropped_per_epoch: int = 0
    skipped_examples: list[str] = Field(default_factory=list, description="The first few skipped files.")
    startup: dict[str, float] = Field(
        default_factory=dict,
        description="When each start-up step ended (Unix time): the driver's process, its checks, Ray, the "
                    "workers, the chief's TensorFlow, data and model, the first epoch.",
    )

    # The moves of the state table; each checks it is allowed.

    def start(self) -> None:
        """PENDING → RUNNING: every worker has started."""
        self._move(JobState.RUNNING, None)
        self.started_at = time.time()

    def finish(self) -> None:
        """RUNNING → SUCCEEDED: trained to the end (or an early stop)."""
        self._move(JobState.SUCCEEDED, None)

    def fail(self, reason: str) -> None:
        """→ FAILED, with what went wrong."""
        self._move(JobState.FAILED, reason)

    def stop(self, reason: str) -> None:
        """→ STOPPED: Ctrl-C, SIGTERM, `orchestra cancel`."""
        self._move(JobState.STOPPED, reason)

    def reopen(self, resume_epoch: int) -> None:
        """STOPPED / FAILED → PENDING: `orchestra resume` continues after `resume_epoch`."""
        self._move(JobState.PENDING, f"resuming from epoch {resume_epoch}")
        self.resumes += 1
        self.stopped_epoch = None
        self.test_metrics = None
        self.model_path = None
        self.worker_pids = {}
        self.startup = {}  # the resumed run's start-up is measured afresh

    def begin_attempt(self, from_epoch: int = 0, ray_job: str | None = None) -> None:
        """A new run of the job's driver (a new job, a resume), on `workers` workers."""
        self.attempts = [*self.attempts, Attempt(workers=self.workers, from_epoch=from_epoch, ray_job=ray_job)]

    def _move(self, new: JobState, reason: str | None) -> None:
        if new not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.job_id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
        self.reason = reason
        self.ended_at = time.time() if new.is_terminal else None

    def status(self) -> JobStatus:
        """What `orchestra status --json` prints and `Client.status` returns."""
        return JobStatus(**self.model_dump(include=set(_JobFields.model_fields)))

    def stored(self, job_dir: Path) -> str:
        """The record as its file holds it (JSON, without the history): every
        path a name relative to `job_dir`."""
        names = {field: stored_name(job_dir, getattr(self, field)) for field in PATH_FIELDS}
        checkpoints = [entry.model_copy(update={"path": stored_name(job_dir, entry.path)})
                       for entry in self.checkpoints]
        return self.model_copy(update={**names, "checkpoints": checkpoints}).model_dump_json(indent=1)

    @classmethod
    def from_stored(cls, text: str, path: Path) -> JobRecord:
        """The record from the `text` of its file `path` (in the job folder):
        StorageError if it does not parse as a record, belongs to another
        job, or names a path outside the job folder (or through a symlink).
        Its paths come back absolute."""
        job_dir = path.parent
        if job_dir.is_symlink():
            raise StorageError(f"the folder of job '{job_dir.name}' ({job_dir}) is a symlink: refused")
        try:
            record = cls.model_validate_json(text)
        except ValueError as exc:  # not JSON, or not a record
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise StorageError(f"the record of job '{job_dir.name}' ({path}) is unreadable: "
                               f"{first}") from None
        if record.job_id != job_dir.name:
            raise StorageError(f"the record in {job_dir} is for job {record.job_id!r}, not {job_dir.name!r}: "
                               "refused")
        for field in PATH_FIELDS:
            name = getattr(record, field)
            if name is not None:
                setattr(record, field, str(resolve_stored(job_dir, name, field)))
        record.checkpoints = [
            entry.model_copy(update={"path": str(resolve_stored(job_dir, entry.path, "checkpoints"))})
            for entry in record.checkpoints]
        return record


# The record's fields that name a file or folder of the job (besides `checkpoints`).
PATH_FIELDS = ("best_checkpoint", "model_path", "tensorboard_logdir")


def format_value(value: Any) -> str:
    """A metric as people read it: 4 decimals, `-` for none."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "-" if value is None else str(value)
