"""The parts of fault handling that need no Ray: the heartbeat read as
"driver lost", the one signal handler, which checkpoint a resume starts
from, which jobs may resume, TensorBoard rolled back to a checkpoint.
(Real faults on real jobs: test_faults.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest
from conftest import tensorboard_steps

from orchestra import Client, JobState
from orchestra.cli import main
from orchestra.coordinator import TensorBoard
from orchestra.coordinator.base import EpochResult
from orchestra.coordinator.protocol import CheckpointRef, Decision
from orchestra.driver.resume import check_resumable, latest_checkpoint
from orchestra.driver.signals import stop_on_signals
from orchestra.errors import JobStateError
from orchestra.storage import heartbeat
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord


def running_record(storage: Storage, **fields) -> JobRecord:
    record = JobRecord(job_id="job-1", name="job", workers=2, spec={}, state=JobState.RUNNING, epochs_completed=3,
                       **fields)
    storage.create_job_dir(record.job_id)
    storage.write_record(record)
    return record


def test_a_silent_driver_reads_as_lost_by_its_counter_on_the_readers_clock_and_its_job_can_resume(
        tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRA_HEARTBEAT_TIMEOUT", "30")
    reader_clock = [1000.0]
    monkeypatch.setattr(heartbeat.WATCH, "clock", lambda: reader_clock[0])
    storage = Storage(tmp_path)
    # A job from before leases (no lease to probe), driven elsewhere, whose wall clock is 100 s behind ours.
    running_record(storage, driver_pid=1, driver_host="elsewhere", heartbeat_at=time.time() - 100)
    beat = {"pid": 1, "host": "elsewhere", "beats": 7, "at": time.time() - 100}
    (tmp_path / "job-1" / "heartbeat.json").write_text(json.dumps(beat))
    client = Client(storage=str(tmp_path))
    assert client.status("job-1").state is JobState.RUNNING  # the other host's clock says nothing here
    reader_clock[0] += 31
    status = client.status("job-1")
    assert status.state is JobState.FAILED
    assert re.fullmatch(r"driver lost: the heartbeat of elsewhere has not moved for 31 s \(as timed on .+\) "
                        r"after epoch 3", status.reason)
    assert [s.state for s in client.list()] == [JobState.FAILED]
    assert storage.read_record("job-1").state is JobState.RUNNING  # readers never write
    assert check_resumable(storage, "job-1").state is JobState.FAILED

    (tmp_path / "job-1" / "heartbeat.json").write_text(json.dumps({**beat, "beats": 8}))  # it beats again
    assert client.status("job-1").state is JobState.RUNNING
    with pytest.raises(JobStateError, match="job-1 is RUNNING: only STOPPED or FAILED"):
        check_resumable(storage, "job-1")


def test_a_dead_driver_on_this_host_reads_as_lost_at_once(tmp_path):
    storage = Storage(tmp_path)
    ended = os.fork()
    if ended == 0:
        os._exit(0)
    os.waitpid(ended, 0)
    running_record(storage, driver_pid=ended, driver_host=socket.gethostname(), heartbeat_at=time.time())
    status = Client(storage=str(tmp_path)).status("job-1")
    assert status.state is JobState.FAILED and status.reason.startswith(f"driver lost: process {ended} on ")


def test_resume_refuses_a_job_that_succeeded(tmp_path, capsys):
    storage = Storage(tmp_path)
    record = running_record(storage)
    record.finish()
    storage.write_record(record)
    assert main(["resume", "job-1", "--storage", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("orchestra: job job-1 is SUCCEEDED: only STOPPED or FAILED jobs "
                                       "can be resumed\n")


def test_resume_starts_from_the_newest_complete_checkpoint(tmp_path):
    storage = Storage(tmp_path)
    folder = tmp_path / "job-1" / "checkpoints"
    for name, complete in (("epoch-0002", True), ("epoch-0004", True), ("epoch-0005", False),
                           (".staging-epoch-0006-77", True)):
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / "state.json").write_text("{}")
    assert latest_checkpoint(storage, "job-1") == CheckpointRef(4, str(folder / "epoch-0004"))
    assert latest_checkpoint(storage, "job-2") is None


def test_a_second_signal_is_acknowledged_not_obeyed(capfd):
    stop_on_signals()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # would cut the final record write short
        time.sleep(0.1)
        assert "SIGINT received; already stopping the job" in capfd.readouterr().err
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_tensorboard_rolled_back_to_a_checkpoint_has_no_duplicate_steps(tmp_path):
    def epoch(board, number):
        board.on_epoch_end(EpochResult(number, {"loss": 1.0 / number, "val_loss": 2.0 / number}, 1.0, 10.0,
                                       batch_losses=[0.5, 0.4, 0.3], steps=3), Decision())

    board = TensorBoard(tmp_path, update_freq="batch", hparams={"learning_rate": 0.1})
    board.on_train_begin("job-1")
    for number in (1, 2, 3, 4):
        epoch(board, number)
    saved_at_2 = {"epoch": 2, "steps": 3}
    board.load_state_dict(saved_at_2)  # a restart from epoch 2's checkpoint
    for number in (3, 4):
        epoch(board, number)
    resumed = TensorBoard(tmp_path, update_freq="batch", hparams={"learning_rate": 0.1})  # `orchestra resume` from epoch 3's
    resumed.on_train_begin("job-1")
    resumed.load_state_dict({"epoch": 3, "steps": 3})
    for number in (4, 5):
        epoch(resumed, number)
    resumed.on_train_end({})
    assert tensorboard_steps(tmp_path / "train", "epoch_loss") == [1, 2, 3, 4, 5]
    assert tensorboard_steps(tmp_path / "validation", "epoch_loss") == [1, 2, 3, 4, 5]
    assert tensorboard_steps(tmp_path / "train", "batch_loss") == list(range(1, 16))
    assert tensorboard_steps(tmp_path, "_hparams_/session_start_info") == [0]  # hyperparameters written once


def test_an_event_file_cut_short_by_a_killed_driver_is_rolled_back_to_its_whole_records(tmp_path):
    def epoch(board, number):
        board.on_epoch_end(EpochResult(number, {"loss": 1.0 / number, "val_loss": 2.0 / number}, 1.0, 10.0), Decision())

    board = TensorBoard(tmp_path)
    board.on_train_begin("job-1")
    for number in (1, 2, 3):
        epoch(board, number)
    board.on_train_end({})
    (events,) = (tmp_path / "train").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])  # the last record, half written
    resumed = TensorBoard(tmp_path)
    resumed.on_train_begin("job-1")
    resumed.load_state_dict({"epoch": 2, "steps": 0})
    epoch(resumed, 3)
    resumed.on_train_end({})
    assert tensorboard_steps(tmp_path / "train", "epoch_loss") == [1, 2, 3]


def test_evaluating_a_job_that_has_no_model_yet_is_a_clear_error(tmp_path, capsys):
    running_record(Storage(tmp_path))
    assert main(["evaluate", "job-1", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "orchestra: job job-1 (RUNNING) has no final model\n"
