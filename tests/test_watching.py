"""Watching jobs cheaply: the history file, the heartbeat file, progress
and ETA, the remote status cache and retries, `list`'s table, and the root
cause of a failed worker group. Fast: no Ray, no TensorFlow."""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import pytest

from orchestra.cli import job_table
from orchestra.client.ray_jobs import StatusCache, _transient
from orchestra.coordinator.channel import ChannelState
from orchestra.coordinator.coordinator import estimate_progress
from orchestra.coordinator.protocol import StepProgress
from orchestra.driver.console import Console
from orchestra.driver.run import _error_text
from orchestra.errors import StorageError
from orchestra.storage import heartbeat, status_lines
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord, JobState, JobStatus


def finished(job_id: str, epochs: int = 3) -> JobStatus:
    record = JobRecord(job_id=job_id, name="j", workers=2, spec={})
    record.start()
    record.epochs_completed = epochs
    record.finish()
    return record.status()


def test_history_is_appended_a_line_an_epoch_and_a_cut_last_line_is_left_out(tmp_path):
    storage = Storage(tmp_path)
    storage.create_job_dir("j-1")
    for epoch in (1, 2, 3):
        storage.append_history("j-1", {"epoch": epoch, "loss": 1.0 / epoch})
    path = tmp_path / "j-1" / "history.jsonl"
    assert len(path.read_text().splitlines()) == 3
    with open(path, "a") as handle:
        handle.write('{"epoch": 4, "lo')  # a driver killed mid-append
    assert [entry["epoch"] for entry in storage.read_history("j-1")] == [1, 2, 3]
    storage.rewrite_history("j-1", storage.read_history("j-1")[:2])  # a restart from epoch 2's checkpoint
    assert [entry["epoch"] for entry in storage.read_history("j-1")] == [1, 2]


def test_the_record_file_holds_the_last_epoch_not_the_history(tmp_path):
    storage = Storage(tmp_path)
    storage.create_job_dir("j-1")
    record = JobRecord(job_id="j-1", name="j", workers=1, spec={})
    record.history = [{"epoch": e, "loss": 1.0} for e in range(1, 500)]
    record.metrics = record.history[-1]
    storage.write_record(record)
    on_disk = json.loads((tmp_path / "j-1" / "job.json").read_text())
    assert "history" not in on_disk and on_disk["metrics"]["epoch"] == 499


def test_an_old_record_with_its_history_inside_still_reads(tmp_path):
    storage = Storage(tmp_path)
    storage.create_job_dir("old")
    old = JobRecord(job_id="old", name="j", workers=1, spec={}).model_dump(mode="json")
    old["history"] = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    (tmp_path / "old" / "job.json").write_text(json.dumps(old))
    assert storage.read_record("old").metrics == {"epoch": 2, "loss": 0.4}
    assert [h["epoch"] for h in storage.read_record("old", history=True).history] == [1, 2]


def test_records_are_readable_by_teammates_sharing_the_storage(tmp_path):
    storage = Storage(tmp_path)
    storage.create_job_dir("j-1")
    storage.write_record(JobRecord(job_id="j-1", name="j", workers=1, spec={}))
    assert (tmp_path / "j-1" / "job.json").stat().st_mode & 0o044 == 0o044  # group and others read (umask 022)


def test_the_heartbeat_beats_in_its_own_file_and_readers_take_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRA_HEARTBEAT_TIMEOUT", "30")
    storage = Storage(tmp_path)
    storage.create_job_dir("j-1")
    record = JobRecord(job_id="j-1", name="j", workers=1, spec={})
    heartbeat.claim(record)
    record.start()
    record.heartbeat_at = time.time() - 100  # the record's own stamp is old...
    record.driver_host = "elsewhere"
    storage.write_record(record)
    beat = {"pid": record.driver_pid, "host": "elsewhere", "at": time.time(), "beats": 7,
            "progress": {"epoch": 2, "epochs": 5, "step": 10, "steps": 40, "samples_per_second": 100.0,
                         "epoch_eta_seconds": 3.0, "job_eta_seconds": 12.0}}
    (tmp_path / "j-1" / "heartbeat.json").write_text(json.dumps(beat))  # ...but the heartbeat file is fresh
    seen = heartbeat.checked(storage.read_record("j-1"), storage)
    assert seen.state is JobState.RUNNING and seen.heartbeat_at == beat["at"]
    assert heartbeat.read_progress(storage, record).step == 10
    (tmp_path / "j-1" / "heartbeat.json").write_text(json.dumps({**beat, "pid": 1}))  # another driver's file
    assert heartbeat.read_progress(storage, record) is None
    # Whether a silent driver is lost: test_lease.py (its lease, or its counter on the reader's clock).


def test_progress_and_eta_come_from_the_pace_of_the_running_epoch_and_the_epochs_done():
    step = StepProgress(epoch=3, step=30, steps=120, elapsed=6.0, samples=960, loss=0.25)
    progress = estimate_progress(step, 10, [{"epoch": 1, "epoch_time": 20.0}, {"epoch": 2, "epoch_time": 22.0}])
    assert progress.samples_per_second == pytest.approx(160.0)
    assert progress.epoch_eta_seconds == pytest.approx(18.0)  # 24 s at this pace, 6 s gone
    assert progress.job_eta_seconds == pytest.approx(18.0 + 7 * 21.0)
    assert progress.bar(10).startswith("epoch 3/10 [##........] 30/120  160 samples/s  epoch ETA 0:18")


def test_a_progress_bar_only_on_a_terminal_and_progress_lines_only_when_asked():
    progress = estimate_progress(StepProgress(1, 5, 10, 1.0, 50), 2, [])
    plain = io.StringIO()
    Console(plain).progress(progress)
    assert plain.getvalue() == ""  # a pipe or a file: the one line per epoch stays as it was
    lines = io.StringIO()
    Console(lines, progress_lines=True).progress(progress)
    assert status_lines.parse_progress(lines.getvalue().strip()) == progress
    assert status_lines.is_status_line(lines.getvalue())

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    console = Console(terminal)
    console.progress(progress)
    console.line("epoch 1/2  loss 0.5")
    assert terminal.getvalue().startswith("\repoch 1/2 [") and "\r\x1b[Kepoch 1/2  loss 0.5\n" in terminal.getvalue()


def test_an_unread_progress_is_replaced_not_queued():
    state = ChannelState(world_size=1)
    for step in (1, 2, 3):
        state.progress(StepProgress(1, step, 10, float(step), step * 10))
    (only,) = state.drain()
    assert only.step == 3


def test_a_finished_remote_job_is_cached_and_nothing_else_is(tmp_path):
    cache = StatusCache("http://head:8265", root=tmp_path)
    cache.put(finished("job-1"))
    assert cache.get("job-1").state is JobState.SUCCEEDED
    assert StatusCache("http://other:8265", root=tmp_path).get("job-1") is None  # per cluster
    running = finished("job-2").model_copy(update={"state": JobState.RUNNING})
    cache.put(running)
    assert cache.get("job-2") is None
    (cache.folder / "job-3.json").write_text("{not json")
    assert cache.get("job-3") is None
    with pytest.raises(StorageError, match="invalid job id"):
        cache.get("../../etc/passwd")


def test_only_passing_job_server_failures_are_retried():
    from ray.exceptions import AuthenticationError

    assert _transient(ConnectionResetError("reset by peer"))
    assert _transient(RuntimeError("Request failed with status code 503: Service Unavailable"))
    assert not _transient(RuntimeError("Job fake-1 does not exist"))
    assert not _transient(RuntimeError("Request failed with status code 400: bad entrypoint"))
    assert not _transient(AuthenticationError("Authentication failed"))


def test_list_table_fits_the_terminal_and_shortens_only_the_job_ids():
    statuses = [finished("a-very-long-job-name-20261129-170000-abcd"), finished("short")]
    wide, narrow = job_table(statuses, 200).splitlines(), job_table(statuses, 50).splitlines()
    assert wide[1].startswith("a-very-long-job-name-20261129-170000-abcd  SUCCEEDED")
    assert all(len(line) <= 50 for line in narrow) and "…" in narrow[1] and narrow[2].startswith("short ")
    assert [line.split()[1] for line in narrow[1:]] == ["SUCCEEDED", "SUCCEEDED"]


class WorkerDied(Exception):
    pass


WorkerDied.__name__ = "WorkerHealthCheckFailedError"


def test_the_worker_that_died_is_named_over_peers_whose_collectives_it_cut():
    cut = RuntimeError("UnavailableError: Collective ops is aborted by: recvmsg: Connection reset by peer")
    group = SimpleNamespace(worker_failures={0: cut, 1: WorkerDied("worker 1 health check failed")})
    reason = _error_text(group, {"0": 4100, "1": 4101})
    assert reason.startswith("worker 1 (pid 4101) died without reporting an error: killed by a signal")
    assert "Ray saw WorkerHealthCheckFailedError: worker 1 health check failed" in reason
    assert "[then worker 0: RuntimeError: UnavailableError" in reason
    own = SimpleNamespace(worker_failures={0: cut, 1: ValueError("bad label 12")})
    assert _error_text(own).startswith("worker 1: ValueError: bad label 12")
    both_own = SimpleNamespace(worker_failures={1: ValueError("b"), 0: ValueError("a")})
    assert _error_text(both_own).startswith("worker 0: ValueError: a")


def test_a_token_travels_only_over_https_or_to_this_machine(tmp_path, monkeypatch):
    from orchestra.client.ray_jobs import token_headers
    from orchestra.errors import ClusterError

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert token_headers("https://cluster.invalid:8265") == {"authorization": "Bearer secret"}
    assert token_headers("http://127.0.0.1:8265") == {"authorization": "Bearer secret"}
    with pytest.raises(ClusterError, match="refusing to send the cluster's token in clear text"):
        token_headers("http://cluster.invalid:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("local-cluster-token")
    assert token_headers("http://localhost:8265") == {"authorization": "Bearer local-cluster-token"}
    assert token_headers("https://cluster.invalid:8265") == {}  # this machine's token is not another's
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / ".ray" / "auth_token"))  # named: the user's choice
    assert token_headers("https://cluster.invalid:8265") == {"authorization": "Bearer local-cluster-token"}


def test_cancel_signals_only_the_jobs_own_driver(tmp_path):
    import subprocess
    import sys

    from orchestra.client.local import LocalJobs

    jobs = LocalJobs(Storage(tmp_path))
    jobs.drivers.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (jobs.drivers / "job-1.pid").write_text(str(stranger.pid))  # a stale pid file, the pid reused
        jobs.cancel("job-1")
        time.sleep(0.3)
        assert stranger.poll() is None  # left alone
        (jobs.drivers / "job-1.pid").write_text("garbage")
        with pytest.raises(StorageError, match="pid file of job 'job-1' is unreadable"):
            jobs.cancel("job-1")
    finally:
        stranger.kill()
        stranger.wait()


def test_a_state_file_cannot_make_retention_delete_outside_the_job(tmp_path):
    from orchestra.coordinator import Checkpoint

    outside = tmp_path / "precious"
    outside.mkdir()
    (tmp_path / "job" / "checkpoints" / "epoch-0002").mkdir(parents=True)
    ckpt = Checkpoint(lambda epoch: tmp_path / "job" / "checkpoints" / f"epoch-{epoch:04d}", keep=1)
    ckpt.load_state_dict({"best": 0.1, "pending": [], "saved": [
        {"epoch": 1, "path": str(outside), "value": 0.5},
        {"epoch": 2, "path": "/elsewhere/epoch-0002", "value": 0.4},
        {"epoch": "x", "path": 3},
    ]})
    assert ckpt.saved == [{"epoch": 2, "path": str(tmp_path / "job" / "checkpoints" / "epoch-0002"), "value": 0.4}]
    from orchestra.coordinator.protocol import CheckpointRef

    (tmp_path / "job" / "checkpoints" / "epoch-0003").mkdir()
    ckpt.on_checkpoint_saved(CheckpointRef(3, str(tmp_path / "job" / "checkpoints" / "epoch-0003")))
    assert outside.is_dir()


def test_unreadable_records_and_driver_inputs_are_one_line_errors(tmp_path, capsys):
    from orchestra import cli
    from orchestra.driver.main import main as driver_main

    storage = Storage(tmp_path / "storage")
    storage.create_job_dir("j-1")
    (tmp_path / "storage" / "j-1" / "job.json").write_text("{corrupt")
    with pytest.raises(StorageError, match="the record of job 'j-1' .* is unreadable"):
        storage.read_record("j-1")
    with pytest.raises(StorageError, match="job 'j-1' already exists"):
        storage.create_job_dir("j-1")
    assert cli.main(["status", "j-1", "--storage", str(tmp_path / "storage")]) == 2
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert cli.main(["status", "j-1", "--storage", str(not_a_folder)]) == 2
    assert driver_main(["run", "--prepared", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "garbage.json").write_text("[1, 2]")
    assert driver_main(["run", "--prepared", str(tmp_path / "garbage.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--prepared: cannot read" in err and "--prepared: not what" in err
