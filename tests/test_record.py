"""The job record's state table, moved only through its lifecycle methods;
its status projection; and the storage's atomic writes and read errors.
Plain Python: no Ray, no TensorFlow."""

from __future__ import annotations

import itertools
import math
import time

import pytest

from orchestra.errors import (
    JobStateError,
    OrchestraError,
    StorageError,
    StorageWriteError,
)
from orchestra.storage.folders import Storage, atomic_write_text, publish_directory
from orchestra.storage.record import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    InvalidTransition,
    JobRecord,
    JobState,
    JobStatus,
)

# Each state is reached by exactly one lifecycle method.
MOVES = {
    JobState.RUNNING: lambda record: record.start(),
    JobState.SUCCEEDED: lambda record: record.finish(),
    JobState.FAILED: lambda record: record.fail("worker 1 died"),
    JobState.STOPPED: lambda record: record.stop("cancelled"),
    JobState.PENDING: lambda record: record.reopen(4),
}
PAIRS = list(itertools.product(JobState, JobState))


def record_in(state: JobState, **fields) -> JobRecord:
    return JobRecord(**{"job_id": "job-1", "name": "job", "workers": 2, "spec": {}, "state": state, **fields})


def test_the_state_table_names_every_state_and_a_move_reaches_each():
    assert set(ALLOWED_TRANSITIONS) == set(JobState) == set(MOVES)
    assert TERMINAL_STATES == {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED}
    assert ALLOWED_TRANSITIONS[JobState.SUCCEEDED] == frozenset()  # a success is final


@pytest.mark.parametrize("old,new", [(o, n) for o, n in PAIRS if n in ALLOWED_TRANSITIONS[o]],
                         ids=lambda s: s.value)
def test_an_allowed_move_changes_the_state(old, new):
    record = record_in(old)
    MOVES[new](record)
    assert record.state is new


@pytest.mark.parametrize("old,new", [(o, n) for o, n in PAIRS if n not in ALLOWED_TRANSITIONS[o]],
                         ids=lambda s: s.value)
def test_a_forbidden_move_is_refused_and_changes_nothing(old, new):
    record = record_in(old, reason="as it was", ended_at=123.0)
    before = record.model_dump()
    with pytest.raises(InvalidTransition, match=f"job job-1: {old.value} -> {new.value} is not allowed"):
        MOVES[new](record)
    assert record.model_dump() == before


def test_an_invalid_transition_is_an_orchestra_error_the_cli_can_show():
    assert issubclass(InvalidTransition, JobStateError) and issubclass(InvalidTransition, OrchestraError)
    assert InvalidTransition.exit_code == 2


def test_the_allowed_moves_are_the_documented_ones():
    allowed = {(old.value, new.value) for old, new in PAIRS if new in ALLOWED_TRANSITIONS[old]}
    assert allowed == {("PENDING", "RUNNING"), ("PENDING", "FAILED"), ("PENDING", "STOPPED"),
                       ("RUNNING", "SUCCEEDED"), ("RUNNING", "FAILED"), ("RUNNING", "STOPPED"),
                       ("FAILED", "PENDING"), ("STOPPED", "PENDING")}


def test_start_sets_started_at_and_clears_the_reason():
    record = record_in(JobState.PENDING, reason="resuming from epoch 4")
    before = time.time()
    record.start()
    assert before <= record.started_at <= time.time()
    assert (record.reason, record.ended_at) == (None, None)


@pytest.mark.parametrize("move,state,reason", [
    ("finish", JobState.SUCCEEDED, None), ("fail", JobState.FAILED, "worker 1 died"),
    ("stop", JobState.STOPPED, "cancelled"),
])
def test_an_ending_sets_ended_at_and_its_reason(move, state, reason):
    record = record_in(JobState.RUNNING, started_at=1.0)
    before = time.time()
    getattr(record, move)(*([reason] if reason else []))
    assert record.state is state and record.reason == reason
    assert before <= record.ended_at <= time.time()
    assert record.started_at == 1.0


@pytest.mark.parametrize("ended", [JobState.STOPPED, JobState.FAILED])
def test_reopen_clears_the_last_runs_outcome_and_counts_the_resume(ended):
    record = record_in(ended, reason="cancelled", started_at=1.0, ended_at=2.0, stopped_epoch=5,
                       test_metrics={"accuracy": 0.9}, model_path="/m", worker_pids={"0": 11, "1": 12},
                       resumes=1, restarts=2, epochs_completed=5, best_checkpoint="/c/epoch-0004")
    record.reopen(4)
    assert record.state is JobState.PENDING
    assert record.reason == "resuming from epoch 4"
    assert (record.stopped_epoch, record.test_metrics, record.model_path, record.worker_pids) == (None, None, None, {})
    assert record.ended_at is None
    assert record.resumes == 2
    assert (record.restarts, record.best_checkpoint) == (2, "/c/epoch-0004")  # the job's past is kept
    record.start()
    assert record.started_at > 1.0


def test_a_pending_job_can_fail_or_stop_before_it_starts():
    for move in ("fail", "stop"):
        record = record_in(JobState.PENDING)
        getattr(record, move)("no CPUs")
        assert record.started_at is None and record.ended_at is not None


# The status: a projection of the record under the record's own names.


def test_a_status_has_only_the_records_field_names():
    assert not {"checkpoint", "model", "checkpoints_dir"} & set(JobStatus.model_fields)
    # `progress` is the running epoch's position: the driver's heartbeat has it, the record does not.
    assert set(JobStatus.model_fields) - set(JobRecord.model_fields) <= {"progress"}


def test_a_status_carries_every_shared_field_of_the_record_and_not_its_spec_or_history():
    record = record_in(JobState.RUNNING, best_checkpoint="/c/epoch-0002", model_path="/m", best_epoch=2,
                       monitor="val_loss", best_value=0.25, epochs_completed=3, warnings=["tensorboard stopped"],
                       history=[{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.3}],
                       metrics={"epoch": 2, "loss": 0.3}, spec={"name": "job"}, worker_pids={"0": 1})
    status = record.status()
    shared = set(JobStatus.model_fields) & set(JobRecord.model_fields)
    assert {"spec", "history", "worker_pids", "checkpoints"}.isdisjoint(status.model_dump())
    for name in shared:
        assert getattr(status, name) == getattr(record, name), name
    assert status.metrics == record.history[-1]
    assert (status.best_checkpoint, status.model_path) == ("/c/epoch-0002", "/m")


def test_a_status_of_a_job_without_epochs_has_no_metrics():
    assert record_in(JobState.PENDING).status().metrics == {}


def test_the_summary_of_a_finished_job():
    status = record_in(JobState.SUCCEEDED, epochs_completed=12, stopped_epoch=12, best_epoch=9, monitor="val_loss",
                       best_value=0.123456, test_metrics={"loss": 0.2, "accuracy": 0.95},
                       best_checkpoint="/s/job-1/checkpoints/epoch-0009", model_path="/s/job-1/model",
                       tensorboard_logdir="/s/job-1/tensorboard").status()
    assert status.summary().splitlines() == [
        "job job-1: SUCCEEDED",
        "  epochs completed  12, stopped early at epoch 12",
        "  best epoch        9 (val_loss 0.1235)",
        "  test              loss 0.2000  accuracy 0.9500",
        "  best checkpoint   /s/job-1/checkpoints/epoch-0009",
        "  model             /s/job-1/model",
        "  tensorboard       /s/job-1/tensorboard",
    ]


def test_the_summary_of_a_failed_job_says_why_and_leaves_out_what_it_does_not_have():
    status = record_in(JobState.FAILED, reason="worker 1 died", epochs_completed=2, skipped_files=3).status()
    assert status.summary().splitlines() == [
        "job job-1: FAILED (worker 1 died)",
        "  epochs completed  2",
        "  skipped files     3 (not readable images; see the record)",
    ]


def test_a_nan_best_value_survives_the_record_file(tmp_path):
    storage = Storage(tmp_path)
    storage.create_job_dir("job-1")
    storage.write_record(record_in(JobState.RUNNING, best_value=float("nan"), best_epoch=1,
                                   monitor="loss"))
    assert math.isnan(storage.read_record("job-1").best_value)  # NaN, not null
    assert "best epoch        1 (loss nan)" in storage.read_record("job-1").status().summary()


# The storage's writes and reads.


def test_reading_a_job_that_is_not_there_is_a_storage_error_naming_it(tmp_path):
    with pytest.raises(StorageError, match=f"no job 'job-9' in {tmp_path}"):
        Storage(tmp_path).read_record("job-9")


def test_an_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "deep" / "job.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["job.json"]  # no temporary file left


def test_a_refused_atomic_write_names_the_path_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "job.json"
    target.mkdir()  # a folder where the file should go: the rename is refused
    (target / "kept").write_text("old")
    with pytest.raises(StorageWriteError) as caught:
        atomic_write_text(target, "new")
    assert str(caught.value).startswith(f"cannot write {target}: ")
    assert caught.value.filename == str(target)
    assert isinstance(caught.value, OrchestraError) and isinstance(caught.value, OSError)
    assert (target / "kept").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_an_atomic_write_under_a_file_is_a_storage_write_error(tmp_path):
    (tmp_path / "blocker").write_text("")
    with pytest.raises(StorageWriteError, match="cannot write .*blocker/sub/job.json"):
        atomic_write_text(tmp_path / "blocker" / "sub" / "job.json", "{}")


def test_publishing_a_folder_replaces_an_older_one_of_the_same_name(tmp_path):
    final = tmp_path / "checkpoints" / "epoch-0002"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("stale")
    staging = tmp_path / "checkpoints" / ".staging-epoch-0002"
    staging.mkdir()
    (staging / "state.json").write_text("{}")
    publish_directory(staging, final)
    assert not staging.exists()
    assert sorted(p.name for p in final.iterdir()) == ["state.json"]


def test_a_refused_publish_removes_the_staging_folder_and_names_the_final_one(tmp_path):
    staging = tmp_path / ".staging-epoch-0003"
    staging.mkdir()
    (staging / "model.keras").write_bytes(b"x" * 1000)
    final = tmp_path / "gone" / "epoch-0003"  # its parent is not there: the rename fails
    with pytest.raises(StorageWriteError, match=f"cannot write {final}"):
        publish_directory(staging, final)
    assert not staging.exists() and not final.exists()
