"""The driver's side of a run: events from the channel → callbacks → record."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from orchestra.coordinator.aggregate import aggregate
from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.checkpoint import Checkpoint
from orchestra.coordinator.monitor import Monitor, early_stopping_mode
from orchestra.coordinator.plugin import PluginCallback
from orchestra.coordinator.protocol import (
    CheckpointRef,
    CheckpointSaved,
    Decision,
    EpochReports,
    Event,
    FinalResult,
    Finished,
    Restarted,
    StepProgress,
    WorkerReport,
    WorkerStarted,
)
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobProgress, JobRecord, JobState


class Coordinator:
    """Runs the driver-side callbacks, in order, on each whole-job epoch and
    keeps the job record true after every event.

    Args:
        record: the job's record.
        storage: where the record is written.
        callbacks: driver-side callbacks, called in this order.
        progress: called with each epoch's result (the CLI prints a line).
    """

    def __init__(
        self,
        record: JobRecord,
        storage: Storage,
        callbacks: list[CoordinatorCallback],
        progress: Callable[[EpochResult], None] = lambda result: None,
        fallback_monitor: str = "loss",
        on_step: Callable[[JobProgress], None] = lambda progress: None,
    ):
        self.record = record
        self.storage = storage
        self.callbacks = callbacks
        self.progress = progress
        self.on_step = on_step
        self.latest_progress: JobProgress | None = None
        checkpoint = next((cb for cb in callbacks if isinstance(cb, Checkpoint)), None)
        monitor = checkpoint.monitor if checkpoint is not None else Monitor(
            fallback_monitor, early_stopping_mode(fallback_monitor, "auto"))
        self._best = _BestEpoch(monitor, record.history)
        for callback in list(callbacks):
            self._call(callback, callback.on_train_begin, record.job_id)
        self.initial_state = self.state_dict()

    def handle(self, event: Event) -> Decision | None:
        """One event from the channel; an epoch's reports get the decision
        every worker is waiting for."""
        match event:
            case EpochReports(reports=reports):
                return self.on_epoch(reports)
            case WorkerStarted(rank=rank, pid=pid):
                self.on_worker_started(rank, pid)
            case CheckpointSaved(checkpoint=checkpoint):
                self.on_checkpoint_saved(checkpoint)
            case Restarted(checkpoint=checkpoint):
                self.on_restart(checkpoint)
            case Finished(result=result):
                self.on_finished(result)
            case StepProgress():
                self.on_progress(event)
            case _:
                raise TypeError(f"not a channel event: {event!r}")
        return None

    def on_worker_started(self, rank: int, pid: int) -> None:
        """A PENDING job runs once Ray has placed and started all its workers."""
        self.record.worker_pids = {**self.record.worker_pids, str(rank): pid}
        if self.record.state is JobState.PENDING and len(self.record.worker_pids) == self.record.workers:
            self.record.start()
            self.record.startup = {**self.record.startup, "workers": time.time()}
        self.storage.write_record(self.record)

    def on_epoch(self, reports: tuple[WorkerReport, ...]) -> Decision:
        result = aggregate(list(reports))
        decision = Decision()
        for callback in list(self.callbacks):
            self._call(callback, callback.on_epoch_end, result, decision)
        if decision.failure is not None:  # nothing of a failed epoch is kept
            decision.stop, decision.checkpoint, decision.snapshot_best_weights = True, None, False
        if decision.checkpoint is not None:
            state = {"epoch": result.epoch, "callbacks": self.state_dict(),
                     "learning_rate": _next_learning_rate(result, decision)}
            decision.checkpoint = dataclasses.replace(decision.checkpoint, state=state)
        if "first_epoch" not in self.record.startup:
            self.record.startup = {**self.record.startup, **_chief_startup(reports), "first_epoch": time.time()}
        entry = result.history_entry()
        self.storage.append_history(self.record.job_id, entry)
        self.record.history.append(entry)
        self.record.metrics = entry
        self.record.epochs_completed = result.epoch
        self._best.see(entry)
        if decision.failure is not None:
            self.record.fail(decision.failure)
        self._refresh_record()
        self.progress(result)
        return decision

    def on_progress(self, step: StepProgress) -> None:
        """The chief's position inside the epoch → the job's progress and
        ETA, handed to `on_step` (the driver draws it; the heartbeat keeps it)."""
        if step.step <= 0 or step.elapsed <= 0:
            return
        epochs = self.record.spec.get("fit", {}).get("epochs", step.epoch)
        self.latest_progress = estimate_progress(step, epochs, self.record.history)
        self.on_step(self.latest_progress)

    def on_checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint_saved(checkpoint)
        self._refresh_record()

    def on_restart(self, checkpoint: CheckpointRef | None) -> None:
        """Ray Train restarted the workers: roll back to their checkpoint."""
        self.record.restarts += 1
        self.roll_back(checkpoint)

    def roll_back(self, checkpoint: CheckpointRef | None) -> None:
        """Callbacks, history and record as they were when `checkpoint` was
        decided; as at the start when None. Used when workers restart and
        when a job is resumed."""
        resume_epoch = 0
        if checkpoint is None:
            self.load_state_dict(self.initial_state)
        else:
            state = Storage.read_checkpoint_state(Path(checkpoint.path))
            self.load_state_dict(state["callbacks"])
            resume_epoch = checkpoint.epoch
            for callback in self.callbacks:
                callback.on_checkpoint_saved(checkpoint)
        self.record.history = [h for h in self.record.history if h["epoch"] <= resume_epoch]
        self.storage.rewrite_history(self.record.job_id, self.record.history)
        self.record.metrics = self.record.history[-1] if self.record.history else {}
        self.record.epochs_completed = resume_epoch
        self._best = _BestEpoch(self._best.monitor, self.record.history)
        self._refresh_record()

    def on_finished(self, final: FinalResult) -> None:
        self.record.test_metrics = final.test_metrics
        self.record.model_path = final.model_path
        self._refresh_record()
        for callback in list(self.callbacks):
            self._call(callback, callback.on_train_end, self.record.status().model_dump(mode="json"))

    def _call(self, callback: CoordinatorCallback, method: Callable, *args: Any) -> None:
        """Call a callback; one whose writes are optional (TensorBoard) and
        fail is dropped with a warning on the record, and training goes on."""
        if not callback.optional:
            method(*args)
            return
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - an optional write; the record says what failed
            self.callbacks.remove(callback)
            self.record.warnings = [*self.record.warnings,
                                    f"{type(callback).__name__} stopped writing: {exc}; training went on"[:500]]

    def state_dict(self) -> dict[str, Any]:
        return {_state_key(cb): cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if _state_key(callback) in state:
                callback.load_state_dict(state[_state_key(callback)])

    def _refresh_record(self) -> None:
        fields: dict[str, Any] = {}
        for callback in self.callbacks:
            fields.update(callback.record_fields())
        plugins = {cb.name: cb.plugin_fields() for cb in self.callbacks if isinstance(cb, PluginCallback)}
        if plugins:
            fields["plugins"] = {**self.record.plugins, **plugins}
        if "best_epoch" not in fields:
            fields.update(self._best.record_fields())
        for name, value in fields.items():
            setattr(self.record, name, value)
        self.storage.write_record(self.record)


def _state_key(callback: CoordinatorCallback) -> str:
    """Where a callback's state is kept in a checkpoint: a plugin's under its name, others' under their class."""
    return callback.state_key if isinstance(callback, PluginCallback) else type(callback).__name__


def _next_learning_rate(result: EpochResult, decision: Decision) -> float | None:
    """The rate the next epoch trains with, kept with a checkpoint: workers
    that restart from it set it, as the driver decided it."""
    return decision.learning_rate if decision.learning_rate is not None else result.metrics.get("learning_rate")


def _chief_startup(reports: tuple[WorkerReport, ...]) -> dict[str, float]:
    """The chief's start-up marks (`worker_...`), from its first report."""
    chief = min(reports, key=lambda report: report.rank)
    return {f"worker_{name}": value for name, value in (chief.startup or {}).items()}


def estimate_progress(step: StepProgress, epochs: int, history: list[dict[str, Any]]) -> JobProgress:
    """The epoch's and the job's remaining time from the chief's position:
    the epoch at its current pace, later epochs at the mean of the epochs
    done (this one's pace if none is).

    Example:

        >>> p = estimate_progress(StepProgress(epoch=2, step=25, steps=100, elapsed=5.0, samples=800), 4,
        ...                       [{"epoch": 1, "epoch_time": 22.0}])
        >>> p.samples_per_second, p.epoch_eta_seconds, p.job_eta_seconds
        (160.0, 15.0, 59.0)
    """
    epoch_time = step.elapsed * step.steps / step.step
    times = [entry["epoch_time"] for entry in history if "epoch_time" in entry]
    per_epoch = sum(times) / len(times) if times else epoch_time
    epoch_eta = max(0.0, epoch_time - step.elapsed)
    return JobProgress(
        epoch=step.epoch, epochs=epochs, step=step.step, steps=step.steps,
        samples_per_second=step.samples / step.elapsed,
        epoch_eta_seconds=round(epoch_eta, 3),
        job_eta_seconds=round(epoch_eta + max(0, epochs - step.epoch) * per_epoch, 3),
        loss=step.loss,
    )


class _BestEpoch:
    """Without early stopping, the record's best epoch by the checkpoint's
    monitor (or the default one): strictly better only, as Keras counts it.
    Kept as epochs come, so each costs the same however long the job."""

    def __init__(self, monitor: Monitor, history: list[dict[str, Any]] = ()):
        self.monitor = monitor
        self.epoch: int | None = None
        self.value = monitor.worst
        for entry in history:
            self.see(entry)

    def see(self, entry: dict[str, Any]) -> None:
        value = entry.get(self.monitor.name)
        if value is not None and self.monitor.is_improvement(value, self.value):
            self.epoch, self.value = int(entry["epoch"]), value

    def record_fields(self) -> dict[str, Any]:
        return {"monitor": self.monitor.name, "best_epoch": self.epoch,
                "best_value": self.value if self.epoch is not None else None}
