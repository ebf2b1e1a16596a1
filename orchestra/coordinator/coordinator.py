"""The driver's side of a run: events from the channel → callbacks → record."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from orchestra.coordinator.aggregate import aggregate
from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.checkpoint import Checkpoint
from orchestra.coordinator.monitor import Monitor, early_stopping_mode
from orchestra.coordinator.protocol import (
    CheckpointRef,
    CheckpointSaved,
    Decision,
    EpochReports,
    Event,
    FinalResult,
    Finished,
    Restarted,
    WorkerReport,
    WorkerStarted,
)
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord, JobState


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
    ):
        self.record = record
        self.storage = storage
        self.callbacks = callbacks
        self.progress = progress
        self.fallback = Monitor(fallback_monitor, early_stopping_mode(fallback_monitor, "auto"))
        for callback in list(callbacks):
            self._call(callback, callback.on_job_start, record.job_id)
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
            case _:
                raise TypeError(f"not a channel event: {event!r}")
        return None

    def on_worker_started(self, rank: int, pid: int) -> None:
        """A PENDING job runs once Ray has placed and started all its workers."""
        self.record.worker_pids = {**self.record.worker_pids, str(rank): pid}
        if self.record.state is JobState.PENDING and len(self.record.worker_pids) == self.record.workers:
            self.record.start()
        self.storage.write_record(self.record)

    def on_epoch(self, reports: tuple[WorkerReport, ...]) -> Decision:
        result = aggregate(list(reports))
        decision = Decision()
        for callback in list(self.callbacks):
            self._call(callback, callback.on_epoch_end, result, decision)
        if decision.checkpoint is not None:
            state = {"epoch": result.epoch, "callbacks": self.state_dict()}
            decision.checkpoint = dataclasses.replace(decision.checkpoint, state=state)
        self.record.history.append(result.history_entry())
        self.record.epochs_completed = result.epoch
        self._refresh_record()
        self.progress(result)
        return decision

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
        self.record.epochs_completed = resume_epoch
        self._refresh_record()

    def on_finished(self, final: FinalResult) -> None:
        self.record.test_metrics = final.test_metrics
        self.record.model_path = final.model_path
        self._refresh_record()
        for callback in list(self.callbacks):
            self._call(callback, callback.on_job_end, self.record.status().model_dump(mode="json"))

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
        return {type(cb).__name__: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if type(callback).__name__ in state:
                callback.load_state_dict(state[type(callback).__name__])

    def _refresh_record(self) -> None:
        fields: dict[str, Any] = {}
        for callback in self.callbacks:
            fields.update(callback.record_fields())
        if "best_epoch" not in fields:
            fields.update(self._best_from_history())
        for name, value in fields.items():
            setattr(self.record, name, value)
        self.storage.write_record(self.record)

    def _best_from_history(self) -> dict[str, Any]:
        """Without early stopping, the best epoch by the checkpoint's monitor
        (or val_loss, or loss): strictly better only, as Keras counts it."""
        monitor = self.fallback
        checkpoint = next((cb for cb in self.callbacks if isinstance(cb, Checkpoint)), None)
        if checkpoint is not None:
            monitor = checkpoint.monitor
        best_epoch, best = None, monitor.worst
        for entry in self.record.history:
            value = entry.get(monitor.name)
            if value is not None and monitor.is_improvement(value, best):
                best_epoch, best = int(entry["epoch"]), value
        return {"monitor": monitor.name, "best_epoch": best_epoch,
                "best_value": best if best_epoch is not None else None}
