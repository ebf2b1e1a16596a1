"""The driver's side of a run without Ray or TensorFlow: a real
`Coordinator` with real callbacks (early stopping, checkpoint; no
TensorBoard) and a real `Storage` in tmp_path, fed the events a channel
would hand it; and the aggregation of workers' reports."""

from __future__ import annotations

import json
import math
from typing import get_args

import pytest

from orchestra.coordinator import (
    Checkpoint,
    Coordinator,
    CoordinatorCallback,
    EarlyStopping,
)
from orchestra.coordinator.aggregate import aggregate
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
from orchestra.storage.folders import CHECKPOINT_STATE_FILE, Storage
from orchestra.storage.record import JobRecord, JobState

JOB = "job-1"


def reports(epoch: int, val_loss: float, workers: int = 2, attempt: int = 0) -> EpochReports:
    return EpochReports(attempt, epoch, tuple(
        WorkerReport(rank=rank, epoch=epoch, logs={"loss": val_loss + 0.1, "val_loss": val_loss},
                     epoch_time=1.0, samples=10)
        for rank in range(workers)))


class Recorder(CoordinatorCallback):
    """Writes down what it is called with."""

    def __init__(self, optional: bool = False, fail_on: str | None = None):
        self.optional = optional
        self.fail_on = fail_on
        self.calls: list[tuple] = []

    def _note(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name == self.fail_on:
            raise OSError(28, "No space left on device")

    def on_train_begin(self, job_id):
        self._note("on_train_begin", job_id)

    def on_epoch_end(self, result, decision):
        self._note("on_epoch_end", result.epoch)

    def on_train_end(self, final):
        self._note("on_train_end", final["state"], final["model_path"])


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "storage")


def make_coordinator(storage: Storage, *extra: CoordinatorCallback, workers: int = 2, patience: int = 2,
                     **record_fields) -> Coordinator:
    record = JobRecord(job_id=JOB, name="job", workers=workers, spec={"fit": {"epochs": 10}}, **record_fields)
    storage.create_job_dir(JOB)
    storage.write_record(record)
    callbacks = [EarlyStopping(monitor="val_loss", patience=patience),
                 Checkpoint(lambda epoch: storage.checkpoint_dir(JOB, epoch), monitor="val_loss"),
                 *extra]
    return Coordinator(record, storage, callbacks)


def save_checkpoint(coordinator: Coordinator, decision: Decision, epoch: int) -> CheckpointRef:
    """What the chief worker does with a checkpoint order: a folder with the
    driver's state in it, then `checkpoint_saved`."""
    folder = coordinator.storage.checkpoint_dir(JOB, epoch)
    assert decision.checkpoint.directory == str(folder)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_STATE_FILE).write_text(json.dumps(decision.checkpoint.state))
    ref = CheckpointRef(epoch, str(folder))
    coordinator.handle(CheckpointSaved(ref))
    return ref


def test_the_record_runs_only_once_every_rank_has_started(storage):
    coordinator = make_coordinator(storage, workers=2)
    assert coordinator.handle(WorkerStarted(1, 501)) is None
    written = storage.read_record(JOB)
    assert (written.state, written.worker_pids, written.started_at) == (JobState.PENDING, {"1": 501}, None)
    coordinator.handle(WorkerStarted(0, 500))
    written = storage.read_record(JOB)
    assert written.state is JobState.RUNNING and written.started_at is not None
    assert written.worker_pids == {"0": 500, "1": 501}


def test_a_worker_restarted_on_a_running_job_updates_its_pid_only(storage):
    coordinator = make_coordinator(storage, workers=1)
    coordinator.handle(WorkerStarted(0, 500))
    started_at = coordinator.record.started_at
    coordinator.handle(WorkerStarted(0, 600))
    assert coordinator.record.state is JobState.RUNNING and coordinator.record.started_at == started_at
    assert storage.read_record(JOB).worker_pids == {"0": 600}


def test_an_epoch_gets_a_decision_and_lands_in_the_history_and_the_record(storage):
    coordinator = make_coordinator(storage)
    decision = coordinator.handle(reports(1, 0.5))
    assert isinstance(decision, Decision) and decision.stop is False and not decision.superseded
    written = storage.read_record(JOB, history=True)
    assert written.epochs_completed == 1
    assert [(entry["epoch"], entry["val_loss"]) for entry in written.history] == [(1, 0.5)]
    assert written.metrics == written.history[-1]
    assert (written.monitor, written.best_epoch, written.best_value) == ("val_loss", 1, 0.5)


def test_an_epoch_that_orders_a_checkpoint_carries_every_callbacks_state_at_that_epoch(storage):
    coordinator = make_coordinator(storage)
    coordinator.handle(reports(1, 0.5))
    decision = coordinator.handle(reports(2, 0.6))  # no improvement: early stopping waits 1
    state = decision.checkpoint.state
    assert set(state) == {"epoch", "callbacks", "learning_rate"}
    assert state["epoch"] == 2
    assert set(state["callbacks"]) == {"EarlyStopping", "Checkpoint"}
    assert state["callbacks"]["EarlyStopping"]["wait"] == 1
    assert state["callbacks"]["EarlyStopping"]["best_epoch"] == 1
    assert json.loads(json.dumps(state)) == state  # what the worker writes to state.json


def test_early_stopping_stops_every_worker_on_the_same_epoch(storage):
    coordinator = make_coordinator(storage, patience=2)
    decisions = [coordinator.handle(reports(epoch, loss)) for epoch, loss in enumerate([0.5, 0.6, 0.7], start=1)]
    assert [d.stop for d in decisions] == [False, False, True]
    assert storage.read_record(JOB).stopped_epoch == 3


def test_a_saved_checkpoint_is_the_records_best_checkpoint(storage):
    coordinator = make_coordinator(storage)
    first = save_checkpoint(coordinator, coordinator.handle(reports(1, 0.5)), 1)
    save_checkpoint(coordinator, coordinator.handle(reports(2, 0.6)), 2)
    written = storage.read_record(JOB)
    assert written.best_checkpoint == first.path
    assert [(c.epoch, c.value) for c in written.checkpoints] == [(1, 0.5), (2, 0.6)]


def test_a_restart_rolls_history_and_callbacks_back_to_the_checkpoint(storage):
    coordinator = make_coordinator(storage, patience=3)
    save_checkpoint(coordinator, coordinator.handle(reports(1, 0.5)), 1)
    at_2 = save_checkpoint(coordinator, coordinator.handle(reports(2, 0.6)), 2)
    state_at_2 = coordinator.state_dict()
    coordinator.handle(reports(3, 0.7))  # decided, never saved: the workers died
    stopper = coordinator.callbacks[0]
    assert stopper.wait == 2

    assert coordinator.handle(Restarted(1, at_2)) is None
    assert coordinator.state_dict() == state_at_2
    assert stopper.wait == 1
    written = storage.read_record(JOB, history=True)
    assert (written.restarts, written.epochs_completed) == (1, 2)
    assert [entry["epoch"] for entry in written.history] == [1, 2]
    assert written.metrics["epoch"] == 2

    # The new attempt's epoch 3 continues from there: its patience counts from epoch 2's wait.
    assert coordinator.handle(reports(3, 0.7, attempt=1)).stop is False
    assert coordinator.handle(reports(4, 0.8, attempt=1)).stop is True


def test_a_restart_before_any_checkpoint_starts_the_callbacks_over(storage):
    coordinator = make_coordinator(storage)
    initial = coordinator.state_dict()
    coordinator.handle(reports(1, 0.5))
    coordinator.handle(reports(2, 0.6))
    coordinator.handle(Restarted(1, None))
    assert coordinator.state_dict() == initial
    written = storage.read_record(JOB, history=True)
    assert (written.restarts, written.epochs_completed, written.history) == (1, 0, [])


def test_finished_records_the_outcome_and_ends_the_callbacks(storage):
    recorder = Recorder()
    coordinator = make_coordinator(storage, recorder)
    coordinator.handle(reports(1, 0.5))
    model = str(storage.model_dir(JOB))
    assert coordinator.handle(Finished(FinalResult({"accuracy": 0.9}, model))) is None
    written = storage.read_record(JOB)
    assert (written.test_metrics, written.model_path) == ({"accuracy": 0.9}, model)
    assert recorder.calls == [("on_train_begin", JOB), ("on_epoch_end", 1), ("on_train_end", "PENDING", model)]


def test_every_event_type_of_the_protocol_is_handled(storage):
    """A new kind of event gets a case in `Coordinator.handle` (and a sample here)."""
    from orchestra.coordinator import protocol

    samples = {
        WorkerStarted: WorkerStarted(0, 500),
        EpochReports: reports(1, 0.5),
        CheckpointSaved: None,  # needs a saved folder: below
        Restarted: Restarted(1, None),
        Finished: Finished(FinalResult(None, str(storage.model_dir(JOB)))),
    }
    if hasattr(protocol, "StepProgress"):
        samples[protocol.StepProgress] = protocol.StepProgress(epoch=2, step=5, steps=10, elapsed=1.0, samples=50)
    assert set(samples) == set(get_args(Event))
    coordinator = make_coordinator(storage, workers=1)
    for kind, event in samples.items():
        if kind is CheckpointSaved:
            folder = storage.checkpoint_dir(JOB, 1)
            folder.mkdir(parents=True)
            event = CheckpointSaved(CheckpointRef(1, str(folder)))
        result = coordinator.handle(event)
        assert (result is not None) == (kind is EpochReports), kind.__name__


@pytest.mark.parametrize("not_an_event", [{"kind": "epoch"}, None, "WorkerStarted",
                                          WorkerReport(0, 1, {"loss": 1.0}, 1.0, 10)])
def test_handling_what_is_not_an_event_is_a_type_error(storage, not_an_event):
    coordinator = make_coordinator(storage)
    with pytest.raises(TypeError, match="not a channel event"):
        coordinator.handle(not_an_event)


def test_an_optional_callback_that_fails_is_dropped_with_a_warning_and_training_goes_on(storage):
    board = Recorder(optional=True, fail_on="on_epoch_end")
    coordinator = make_coordinator(storage, board)
    decision = coordinator.handle(reports(1, 0.5))
    assert decision.checkpoint is not None  # the other callbacks decided as usual
    assert board not in coordinator.callbacks
    (warning,) = storage.read_record(JOB).warnings
    assert warning.startswith("Recorder stopped writing:") and "No space left on device" in warning
    assert warning.endswith("training went on")
    coordinator.handle(reports(2, 0.4))
    assert [call[0] for call in board.calls] == ["on_train_begin", "on_epoch_end"]  # not called again
    assert storage.read_record(JOB).epochs_completed == 2


def test_a_required_callback_that_fails_fails_the_epoch(storage):
    coordinator = make_coordinator(storage, Recorder(optional=False, fail_on="on_epoch_end"))
    with pytest.raises(OSError, match="No space left"):
        coordinator.handle(reports(1, 0.5))


def test_without_early_stopping_the_best_epoch_is_the_checkpoints_monitor(storage):
    record = JobRecord(job_id=JOB, name="job", workers=1, spec={})
    storage.create_job_dir(JOB)
    checkpoint = Checkpoint(lambda epoch: storage.checkpoint_dir(JOB, epoch), monitor="val_loss")
    coordinator = Coordinator(record, storage, [checkpoint], fallback_monitor="loss")
    for epoch, loss in enumerate([0.5, 0.3, 0.3, 0.4], start=1):
        coordinator.handle(reports(epoch, loss, workers=1))
    written = storage.read_record(JOB)
    assert (written.monitor, written.best_epoch, written.best_value) == ("val_loss", 2, 0.3)  # strictly better only


# Aggregation: many workers' reports of an epoch → one result for the job.


def test_aggregation_means_metrics_takes_the_slowest_epoch_sums_samples_and_the_largest_memory():
    result = aggregate([
        WorkerReport(rank=1, epoch=3, logs={"loss": 0.4, "accuracy": 0.8}, epoch_time=2.0, samples=30,
                     batch_losses=[9.0], peak_rss_mb=700.0),
        WorkerReport(rank=0, epoch=3, logs={"loss": 0.2, "accuracy": 0.6, "val_loss": 0.5}, epoch_time=4.0,
                     samples=50, batch_losses=[0.3, 0.2], peak_rss_mb=500.0),
    ])
    assert result.epoch == 3
    assert result.metrics == pytest.approx({"accuracy": 0.7, "loss": 0.3, "val_loss": 0.5})
    assert result.epoch_time == 4.0
    assert result.samples_per_second == 20.0  # (30 + 50) samples / 4 s
    assert result.worker_peak_rss_mb == 700.0
    assert (result.batch_losses, result.steps) == ([0.3, 0.2], 2)  # the chief's (rank 0)


def test_aggregation_of_an_instant_epoch_has_no_throughput_rather_than_a_division_by_zero():
    result = aggregate([WorkerReport(0, 1, {"loss": 1.0}, 0.0, 10)])
    assert result.samples_per_second == 0.0


def test_aggregation_keeps_a_diverged_loss_as_nan():
    result = aggregate([WorkerReport(0, 1, {"loss": float("nan")}, 1.0, 10),
                        WorkerReport(1, 1, {"loss": float("nan")}, 1.0, 10)])
    assert math.isnan(result.metrics["loss"])


@pytest.mark.parametrize("bad,message", [
    ([], "no reports"),
    ([WorkerReport(0, 1, {}, 1.0, 10), WorkerReport(1, 2, {}, 1.0, 10)], r"different epochs: \[1, 2\]"),
])
def test_aggregation_refuses_no_reports_or_mixed_epochs(bad, message):
    with pytest.raises(ValueError, match=message):
        aggregate(bad)


def test_the_history_entry_is_the_aggregate(storage):
    coordinator = make_coordinator(storage)
    coordinator.handle(EpochReports(0, 1, (
        WorkerReport(0, 1, {"loss": 0.2, "val_loss": 0.4}, epoch_time=1.0, samples=10, peak_rss_mb=100.0),
        WorkerReport(1, 1, {"loss": 0.4, "val_loss": 0.6}, epoch_time=2.0, samples=30, peak_rss_mb=300.0),
    )))
    (entry,) = storage.read_record(JOB, history=True).history
    assert entry["loss"] == pytest.approx(0.3) and entry["val_loss"] == pytest.approx(0.5)
    assert (entry["epoch"], entry["epoch_time"], entry["samples_per_second"], entry["worker_peak_rss_mb"]) == \
        (1, 2.0, 20.0, 300.0)
