"""One owner per job (orchestra/storage/lease.py), on real files and real
processes, without Ray: two resumes at once give one owner; a driver whose
job was taken over stops within a heartbeat and writes, publishes and
deletes nothing more; liveness from the lease, or from the heartbeat's
counter on the reader's own clock, never from another host's clock or
hostname; `cancel` asks through the job folder and signals no stranger.
The last test does the same with real drivers (TensorFlow, in process)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestra import Client, JobState
from orchestra.client.local import LocalJobs
from orchestra.coordinator import Checkpoint
from orchestra.coordinator.protocol import CheckpointRef
from orchestra.driver.run import own
from orchestra.storage import heartbeat
from orchestra.storage.folders import Storage
from orchestra.storage.lease import (
    LOCK_FILE,
    Lease,
    LeaseLost,
    Liveness,
    Process,
    probe,
    read_owner,
    start_ticks,
    this_machine,
)
from orchestra.storage.record import JobRecord
from orchestra.worker.saving import _write_published

HANG = 60  # seconds: only a bound on a hang, never a measurement

# A job's driver as far as the lease goes: it reopens the job (taking the
# lease, as `orchestra resume` does) and holds it in `record_outcome`, the
# driver's own, through one long epoch in which it writes nothing.
STAND_IN = """
import sys, time
from pathlib import Path
from orchestra.driver.resume import reopen
from orchestra.driver.run import record_outcome
from orchestra.driver.signals import stop_on_signals
from orchestra.storage.folders import Storage
from orchestra.storage.lease import LeaseLost

storage = Storage(Path(sys.argv[1]))
record, _ = reopen(storage, sys.argv[2])
stop_on_signals()
try:
    with record_outcome(storage, record) as beat:
        print("driving", record.generation, flush=True)
        while True:
            time.sleep(0.05)
except KeyboardInterrupt:
    sys.exit(3)
except LeaseLost as lost:
    print(f"orchestra: {lost}", file=sys.stderr, flush=True)
    sys.exit(lost.exit_code)
"""

# `orchestra resume` as far as ownership goes: ready, then, when told, reopen
# the job; the owner holds the lease until told again.
RACER = """
import sys
from pathlib import Path
from orchestra.driver.resume import reopen
from orchestra.storage.folders import Storage
from orchestra.storage.lease import LeaseHeld

storage = Storage(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
try:
    record, _ = reopen(storage, sys.argv[2])
except LeaseHeld as refused:
    print(f"refused: {refused}", flush=True)
    sys.exit(2)
print("owner", record.generation, flush=True)
sys.stdin.readline()
"""


def stopped_job(storage: Storage, job_id: str = "job-1") -> JobRecord:
    record = JobRecord(job_id=job_id, name="job", workers=1, spec={}, state=JobState.STOPPED, epochs_completed=3,
                       reason="interrupted after epoch 3")
    storage.create_job_dir(job_id)
    storage.write_record(record)
    return record


def start(script: str, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def driving(tmp_path: Path, monkeypatch) -> subprocess.Popen:
    """A stand-in driver of job-1 that owns it, beating every 0.2 s."""
    monkeypatch.setenv("ORCHESTRA_HEARTBEAT_TIMEOUT", "1.2")
    driver = start(STAND_IN, tmp_path, "job-1")
    line = driver.stdout.readline()
    assert line.startswith("driving"), line + driver.stderr.read()
    return driver


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=HANG)
    finally:
        process.kill()
    return process.returncode, err


def test_two_resumes_started_at_once_give_one_owner_and_one_refusal(tmp_path):
    storage = Storage(tmp_path)
    stopped_job(storage)
    racers = [start(RACER, tmp_path, "job-1", stdin=subprocess.PIPE) for _ in range(2)]
    try:
        assert [racer.stdout.readline() for racer in racers] == ["ready\n", "ready\n"]
        for racer in racers:
            racer.stdin.write("go\n")
            racer.stdin.flush()
        answers = [racer.stdout.readline().strip() for racer in racers]  # the owner holds on meanwhile
        owners = [racer for racer, answer in zip(racers, answers) if answer == "owner 1"]
        refused = [answer for answer in answers if answer.startswith("refused")]
        assert len(owners) == 1 and len(refused) == 1, answers
        assert refused[0] == f"refused: job job-1 is owned by a live driver on {socket.gethostname()}, " \
                             f"pid {owners[0].pid}"
        record = storage.read_record("job-1")
        assert (record.state, record.resumes, record.generation, record.driver_pid) == (
            JobState.PENDING, 1, 1, owners[0].pid)  # reopened once, by the owner
        assert read_owner(tmp_path / "job-1").pid == owners[0].pid
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
    assert probe(tmp_path / "job-1") is Liveness.FREE  # the kernel let the lease go with the process


def test_resume_refuses_a_job_whose_live_driver_holds_the_lease(tmp_path, monkeypatch, capsys):
    from orchestra.cli import main

    stopped_job(Storage(tmp_path))
    driver = driving(tmp_path, monkeypatch)
    try:
        assert main(["resume", "job-1", "--storage", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (f"orchestra: job job-1 is owned by a live driver on "
                                           f"{socket.gethostname()}, pid {driver.pid}\n")
        assert Storage(tmp_path).read_record("job-1").generation == 1  # nothing written
    finally:
        driver.kill()
        driver.wait()


def test_a_driver_whose_lease_was_taken_stops_within_a_heartbeat_and_writes_nothing_more(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    stopped_job(storage)
    job_dir = tmp_path / "job-1"
    driver = driving(tmp_path, monkeypatch)
    try:
        # The storage lost the driver's lock (an NFS client cut off past its lease time, a lock file removed
        # by hand): a new driver takes the job with the next generation and writes its record.
        (job_dir / LOCK_FILE).unlink()
        taker = Lease.acquire(job_dir, "job-1", storage.read_record("job-1").generation)
        beats_when_taken = json.loads((job_dir / "heartbeat.json").read_text())["beats"]
        record = storage.read_record("job-1")
        own(storage, record, taker)
        record.reason = "the new owner's"
        storage.write_record(record)
        written = (job_dir / "job.json").read_text()
        code, err = finish(driver)
    finally:
        driver.kill()
    assert code == LeaseLost.exit_code
    assert re.search(r"job job-1 was taken over \(generation 2, a driver on .+, pid \d+\): this driver "
                     r"\(generation 1\) stops without writing more", err), err
    assert (job_dir / "job.json").read_text() == written  # no STOPPED record over the new owner's
    beat = json.loads((job_dir / "heartbeat.json").read_text())
    assert beat["pid"] == driver.pid and beat["beats"] <= beats_when_taken + 1  # within one heartbeat
    taker.release()


def test_a_taken_over_driver_can_write_publish_and_delete_nothing(tmp_path):
    storage = Storage(tmp_path)
    record = stopped_job(storage)
    job_dir = tmp_path / "job-1"
    old = Lease.acquire(job_dir, "job-1")
    own(storage, record, old)
    storage.write_record(record)
    kept = job_dir / "checkpoints" / "epoch-0001"
    kept.mkdir(parents=True)

    (job_dir / LOCK_FILE).unlink()  # the lock lost, as above
    new = Lease.acquire(job_dir, "job-1", record.generation)
    assert (old.generation, new.generation) == (1, 2)
    with pytest.raises(LeaseLost, match=r"job job-1 was taken over \(generation 2"):
        storage.write_record(record)
    with pytest.raises(LeaseLost):
        storage.append_history("job-1", {"epoch": 4})
    final = job_dir / "checkpoints" / "epoch-0004"
    with pytest.raises(LeaseLost):  # the chief's checkpoint, fenced by the generation it was given
        _write_published(final, lambda staging: (staging / "model.weights.h5").write_text("w"), {"epoch": 4},
                         None, old.fence)
    assert sorted(path.name for path in (job_dir / "checkpoints").iterdir()) == ["epoch-0001"]
    retention = Checkpoint(lambda epoch: job_dir / "checkpoints" / f"epoch-{epoch:04d}", keep=1)
    retention.saved = [{"epoch": 1, "path": str(kept), "value": None}]
    retention.before_delete = old.check
    with pytest.raises(LeaseLost):
        retention.on_checkpoint_saved(CheckpointRef(5, str(job_dir / "checkpoints" / "epoch-0005")))
    assert kept.is_dir()
    assert not (job_dir / "history.jsonl").exists() and storage.read_record("job-1").generation == 1

    own(storage, record, new)  # the new owner may
    storage.write_record(record)
    _write_published(final, lambda staging: (staging / "model.weights.h5").write_text("w"), {"epoch": 4}, None,
                     new.fence)
    assert storage.read_record("job-1").generation == 2 and (final / "model.weights.h5").is_file()
    old.release()
    new.release()


def test_a_live_driver_reads_as_live_whatever_its_clock_and_hostname_say(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    stopped_job(storage)
    driver = driving(tmp_path, monkeypatch)
    try:
        # Its record as a driver on a machine that shares our hostname, its clock an hour behind ours,
        # would have it: a pid that is nobody here, a stamp an hour old.
        ended = subprocess.Popen([sys.executable, "-c", ""])
        ended.wait()
        record = storage.read_record("job-1")
        record.driver_pid, record.heartbeat_at = ended.pid, time.time() - 3600
        storage.write_record(record)
        assert Client(storage=str(tmp_path)).status("job-1").state is JobState.PENDING  # not "driver lost"
    finally:
        driver.kill()
        driver.wait()
    status = Client(storage=str(tmp_path)).status("job-1")  # killed: lost at once, whatever its record says
    assert status.state is JobState.FAILED
    assert status.reason == (f"driver lost: process {ended.pid} on {socket.gethostname()} has ended (nothing holds "
                             "the job's lease) after epoch 3")


def test_without_a_lease_a_driver_is_lost_by_its_counter_on_the_readers_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRA_HEARTBEAT_TIMEOUT", "30")
    reader_clock = [1000.0]
    monkeypatch.setattr(heartbeat.WATCH, "clock", lambda: reader_clock[0])
    storage = Storage(tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    # A job from before leases, driven on another machine of the same hostname, whose clock is an hour behind.
    record = JobRecord(job_id="job-1", name="job", workers=1, spec={}, state=JobState.RUNNING, epochs_completed=3,
                       driver_pid=ended.pid, driver_host=socket.gethostname(), heartbeat_at=time.time() - 3600)
    storage.create_job_dir("job-1")
    storage.write_record(record)
    beat = {"pid": ended.pid, "host": socket.gethostname(), "machine": "another-boot/pid:[1]", "beats": 7,
            "at": time.time() - 3600}

    def beats(count: int) -> JobState:
        (tmp_path / "job-1" / "heartbeat.json").write_text(json.dumps({**beat, "beats": count}))
        return heartbeat.checked(storage.read_record("job-1"), storage).state

    assert probe(tmp_path / "job-1") is Liveness.UNKNOWN
    assert beats(7) is JobState.RUNNING
    reader_clock[0] += 31
    assert beats(8) is JobState.RUNNING  # it moved
    reader_clock[0] += 29
    assert beats(8) is JobState.RUNNING
    reader_clock[0] += 2
    seen = heartbeat.checked(storage.read_record("job-1"), storage)
    assert seen.state is JobState.FAILED and "has not moved for 31 s" in seen.reason
    beat["machine"] = this_machine()  # the same machine after all: its pid has ended, lost at once
    assert beats(9) is JobState.FAILED


def test_cancel_asks_the_driver_through_the_job_folder_and_it_stops_as_on_ctrl_c(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    stopped_job(storage)
    driver = driving(tmp_path, monkeypatch)  # a driver in a terminal: no pid file, only the job folder
    try:
        LocalJobs(storage).cancel("job-1")
        code, err = finish(driver)
    finally:
        driver.kill()
    assert code == 3  # KeyboardInterrupt, as on Ctrl-C
    record = storage.read_record("job-1")
    assert (record.state, record.reason, record.generation) == (JobState.STOPPED, "interrupted after epoch 3", 1)


def test_cancel_leaves_a_stale_pid_file_naming_a_live_unrelated_process_alone(tmp_path):
    storage = Storage(tmp_path)
    jobs = LocalJobs(storage)
    jobs.drivers.mkdir()
    pid_file = jobs.drivers / "job-1.pid"
    # A stranger whose command line even reads like job-1's driver.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "orchestra.driver", "run",
                                 "--job-id", "job-1"])
    try:
        this = Process(socket.gethostname(), stranger.pid, this_machine(), start_ticks(stranger.pid))
        for stale in (Process(this.host, this.pid, this.machine, this.started - 1),  # the pid, reused since
                      Process("another-host", this.pid, this.machine, this.started),
                      Process(this.host, this.pid, "another-boot/pid:[1]", this.started)):
            pid_file.write_text(stale.to_json())
            jobs.cancel("job-1")  # the job has not written a record: only its pid could be signalled
        pid_file.write_text(str(stranger.pid))  # an older bare pid: on no known host
        jobs.cancel("job-1")
        stopped_job(storage)
        storage.write_record(storage.read_record("job-1").model_copy(update={"state": JobState.RUNNING}))
        Lease.acquire(tmp_path / "job-1", "job-1").release()  # a driver that has ended
        pid_file.write_text(this.to_json())
        jobs.cancel("job-1")  # a record and no live lease: its driver has ended, nothing is signalled
        assert stranger.poll() is None  # left alone every time
        os.rename(tmp_path / "job-1", tmp_path / "gone")
        jobs.cancel("job-1")  # the same process, no record: the pid file names it truly, so it is signalled
        assert stranger.wait(timeout=HANG) == -signal.SIGTERM
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.integration
def test_two_real_resumes_at_once_then_cancel_through_the_job_folder(tmp_path, mnist_dir):
    from conftest import small_spec, write_spec

    from orchestra.driver.main import prepare_new
    from orchestra.driver.run import create_job
    from orchestra.storage.lease import held

    storage_dir = tmp_path / "storage"
    spec = write_spec(tmp_path / "long.json", small_spec(**{"fit.epochs": 500, "callbacks.EarlyStopping": None}))
    prepared = prepare_new(str(spec), storage=str(storage_dir), datasets=str(mnist_dir), in_process=True)
    record = create_job(prepared, in_process=True)
    record.stop("interrupted after epoch 0")
    prepared.storage.write_record(record)
    held(storage_dir / record.job_id).release()
    env = {**os.environ, "ORCHESTRA_HEARTBEAT_TIMEOUT": "3"}
    command = [sys.executable, "-m", "orchestra.driver", "resume", record.job_id, "--storage", str(storage_dir),
               "--datasets", str(mnist_dir)]
    drivers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    try:
        client = Client(storage=str(storage_dir))
        deadline = time.monotonic() + 300
        # Until one has refused and the other trains.
        while (all(driver.poll() is None for driver in drivers)
               or client.status(record.job_id).epochs_completed < 1):
            assert time.monotonic() < deadline and all(driver.poll() in (None, 2) for driver in drivers)
            time.sleep(0.5)
        (refused,) = [driver for driver in drivers if driver.poll() is not None]
        (owner,) = [driver for driver in drivers if driver is not refused]
        assert refused.returncode == 2
        assert refused.stderr.read().strip().splitlines()[-1] == (
            f"orchestra: job {record.job_id} is owned by a live driver on {socket.gethostname()}, pid {owner.pid}")
        status = client.status(record.job_id)
        assert status.state is JobState.RUNNING and status.resumes == 1  # resumed once, by the owner

        final = client.cancel(record.job_id)  # no pid file: the request goes through the job folder
        assert final.state is JobState.STOPPED and final.reason.startswith("interrupted after epoch")
        assert owner.wait(timeout=HANG) == 1
    finally:
        for driver in drivers:
            driver.kill()
            driver.wait()
    assert probe(storage_dir / record.job_id) is Liveness.FREE
