"""The driver–worker channel's bookkeeping (`ChannelState`) driven directly,
and `LocalChannel` through a real `Coordinator`: no Ray started, no
TensorFlow. (The `Channel` actor is `ChannelState` behind Ray: the
integration tests run it.)"""

from __future__ import annotations

import pytest

from orchestra.coordinator import Coordinator, EarlyStopping
from orchestra.coordinator.channel import ChannelState, LocalChannel
from orchestra.coordinator.checkpoint import Checkpoint
from orchestra.coordinator.protocol import (
    CheckpointRef,
    CheckpointSaved,
    Decision,
    EpochReports,
    FinalResult,
    Finished,
    Restarted,
    StartReply,
    WorkerReport,
    WorkerStarted,
)
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord, JobState


def report(rank: int, epoch: int, loss: float = 0.5, **fields) -> WorkerReport:
    return WorkerReport(rank=rank, epoch=epoch, logs={"loss": loss}, epoch_time=1.0, samples=10, **fields)


def started_group(world_size: int = 2, group: str = "group-a", **kwargs) -> ChannelState:
    state = ChannelState(world_size=world_size, **kwargs)
    for rank in range(world_size):
        state.start(rank, 100 + rank, group)
    state.drain()
    return state


def test_each_start_of_a_group_is_a_worker_started_event_of_attempt_0():
    state = ChannelState(world_size=3)
    replies = [state.start(rank, 100 + rank, "group-a") for rank in (2, 0, 1)]
    assert replies == [StartReply(0, None)] * 3
    assert state.drain() == [WorkerStarted(2, 102), WorkerStarted(0, 100), WorkerStarted(1, 101)]
    assert state.drain() == []  # drained events are gone


def test_a_resumed_job_starts_its_workers_from_its_checkpoint():
    resume_from = CheckpointRef(4, "/storage/job/checkpoints/epoch-0004")
    state = ChannelState(world_size=1, resume_from=resume_from)
    assert state.start(0, 100, "group-a") == StartReply(0, resume_from)


def test_an_epoch_is_an_event_only_once_every_rank_reported_and_its_reports_are_ordered_by_rank():
    state = started_group(world_size=3)
    assert state.report(0, report(2, 1, loss=0.3)) is None
    assert state.report(0, report(0, 1, loss=0.1)) is None
    assert state.drain() == []  # rank 1 has not reported
    assert state.report(0, report(1, 1, loss=0.2)) is None
    (event,) = state.drain()
    assert isinstance(event, EpochReports)
    assert (event.attempt, event.epoch) == (0, 1)
    assert [r.rank for r in event.reports] == [0, 1, 2]
    assert [r.logs["loss"] for r in event.reports] == [0.1, 0.2, 0.3]


def test_reports_of_two_epochs_are_kept_apart():
    state = started_group(world_size=2)
    state.report(0, report(0, 1))
    state.report(0, report(0, 2))  # rank 0 ran ahead; epoch 1 still waits for rank 1
    assert state.drain() == []
    state.report(0, report(1, 1))
    assert [(e.epoch, len(e.reports)) for e in state.drain()] == [(1, 2)]
    state.report(0, report(1, 2))
    assert [(e.epoch, len(e.reports)) for e in state.drain()] == [(2, 2)]


def test_a_second_start_of_the_same_group_is_not_a_new_attempt():
    state = started_group(world_size=2)
    assert state.start(0, 100, "group-a") == StartReply(0, None)
    assert state.drain() == [WorkerStarted(0, 100)]
    assert state.attempt == 0


def test_a_new_group_is_a_new_attempt_that_restarts_from_the_latest_saved_checkpoint():
    state = started_group(world_size=2)
    for epoch in (1, 2):
        state.report(0, report(0, epoch))
        state.report(0, report(1, epoch))
    older, latest = CheckpointRef(1, "/c/epoch-0001"), CheckpointRef(2, "/c/epoch-0002")
    state.checkpoint_saved(0, older)
    state.checkpoint_saved(0, latest)
    state.report(0, report(0, 3))  # epoch 3 of the old group never completes
    state.drain()

    assert state.start(1, 201, "group-b") == StartReply(1, latest)
    assert state.drain() == [Restarted(1, latest), WorkerStarted(1, 201)]
    assert state.start(0, 200, "group-b") == StartReply(1, latest)
    assert state.drain() == [WorkerStarted(0, 200)]

    # The old group's report of epoch 3 was dropped: the new rank 1 alone does not complete it.
    assert state.report(1, report(1, 3)) is None
    assert state.drain() == []
    state.report(1, report(0, 3))
    (event,) = state.drain()
    assert (event.attempt, event.epoch, [r.rank for r in event.reports]) == (1, 3, [0, 1])


def test_a_restart_before_any_checkpoint_starts_over_from_the_resumed_checkpoint_or_none():
    plain = started_group(world_size=1)
    plain.start(0, 200, "group-b")
    assert plain.drain()[0] == Restarted(1, None)

    resume_from = CheckpointRef(4, "/c/epoch-0004")
    resumed = started_group(world_size=1, resume_from=resume_from)
    resumed.start(0, 200, "group-b")
    assert resumed.drain()[0] == Restarted(1, resume_from)


def test_a_report_from_a_replaced_attempt_is_told_to_stop_as_superseded():
    state = started_group(world_size=2)
    state.start(0, 200, "group-b")
    state.drain()
    assert state.report(0, report(1, 3)) == Decision(stop=True, superseded=True)
    assert state.drain() == []
    assert state.reports == {}  # nor is it kept for the new attempt


def test_checkpoint_saved_and_finished_are_events_in_order():
    state = started_group(world_size=1)
    ref = CheckpointRef(1, "/c/epoch-0001")
    state.checkpoint_saved(0, ref)
    state.finished(FinalResult({"accuracy": 0.9}, "/m"))
    assert state.drain() == [CheckpointSaved(ref), Finished(FinalResult({"accuracy": 0.9}, "/m"))]


def test_a_decision_is_kept_until_the_epoch_two_later_is_decided():
    state = started_group(world_size=1)
    decisions = {epoch: Decision(stop=epoch == 3) for epoch in (1, 2, 3)}
    state.decide(0, 1, decisions[1])
    state.decide(0, 2, decisions[2])
    assert state.decisions == {(0, 1): decisions[1], (0, 2): decisions[2]}
    state.decide(0, 3, decisions[3])
    assert state.decisions == {(0, 2): decisions[2], (0, 3): decisions[3]}


# LocalChannel: the in-process run's direct line to a real Coordinator.


@pytest.fixture
def coordinator(tmp_path):
    storage = Storage(tmp_path / "storage")
    record = JobRecord(job_id="job-1", name="job", workers=1, spec={}, mode="in_process")
    storage.create_job_dir(record.job_id)
    storage.write_record(record)
    callbacks = [EarlyStopping(monitor="loss", patience=1),
                 Checkpoint(lambda epoch: storage.checkpoint_dir("job-1", epoch), monitor="loss")]
    return Coordinator(record, storage, callbacks)


def test_local_channel_round_trip_through_a_coordinator(coordinator):
    resume_from = CheckpointRef(2, "/c/epoch-0002")
    channel = LocalChannel(coordinator, resume_from=resume_from)
    storage, record = coordinator.storage, coordinator.record

    assert channel.start(0, 4242, "in-process") == StartReply(0, resume_from)
    assert storage.read_record("job-1").state is JobState.RUNNING
    assert storage.read_record("job-1").worker_pids == {"0": 4242}

    first = channel.report(0, report(0, 1, loss=0.5))
    assert first.stop is False
    assert first.checkpoint.directory == str(storage.checkpoint_dir("job-1", 1))
    assert first.checkpoint.state["epoch"] == 1
    checkpoint_folder = storage.checkpoint_dir("job-1", 1)
    checkpoint_folder.mkdir(parents=True)
    channel.checkpoint_saved(0, CheckpointRef(1, str(checkpoint_folder)))
    assert storage.read_record("job-1").best_checkpoint == str(checkpoint_folder)

    assert channel.report(0, report(0, 2, loss=0.6)).stop is True  # patience 1, no improvement
    channel.finished(FinalResult({"loss": 0.55}, str(storage.model_dir("job-1"))))
    written = storage.read_record("job-1", history=True)
    assert written.epochs_completed == record.epochs_completed == 2
    assert [entry["epoch"] for entry in written.history] == [1, 2]
    assert (written.stopped_epoch, written.best_epoch) == (2, 1)
    assert written.test_metrics == {"loss": 0.55}
    assert written.model_path == str(storage.model_dir("job-1"))


def test_a_replaced_attempts_late_checkpoint_is_not_the_jobs():
    state = started_group(world_size=2)
    state.checkpoint_saved(0, CheckpointRef(2, "/c/epoch-0002"))
    state.start(0, 300, "group-b")  # Ray Train replaced the group
    state.drain()
    state.checkpoint_saved(0, CheckpointRef(3, "/c/epoch-0003"))  # the old chief's write, published late
    assert state.drain() == [] and state.latest_checkpoint == CheckpointRef(2, "/c/epoch-0002")
    state.checkpoint_saved(1, CheckpointRef(3, "/c/epoch-0003"))
    assert state.drain() == [CheckpointSaved(CheckpointRef(3, "/c/epoch-0003"))]
