"""Real faults on real processes: Ctrl-C (twice) and SIGKILL to a running
`orchestra submit`, kill -9 of a worker without max_failures, a storage
that fills mid-checkpoint. After each: the state `status` shows, a
checkpoint that loads and evaluates to the recorded value, `resume` ending
where a run without the fault ends, and no process of the job left.

The job: early stopping on the training loss in mode "max", patience 4.
Epoch 1 has the highest loss, so a run that never stops ends at epoch 5
with best epoch 1; a resume that forgot the wait count would end later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import read_job, run_cli, small_spec, tensorboard_steps, write_spec

from orchestra import Client, JobState

pytestmark = pytest.mark.integration

STOP_AT_5 = {
    "data.train_size": 2000,
    "callbacks.early_stopping": {"monitor": "loss", "mode": "max", "patience": 4},
    "callbacks.checkpoint": {"monitor": "loss", "mode": "max", "keep": 1},
    "callbacks.tensorboard": {"update_freq": "epoch"},
}


def start_submit(tmp_path: Path, mnist_dir: Path, spec: dict, *extra) -> tuple[subprocess.Popen, Path, Path]:
    """`orchestra submit` in the foreground of a process of its own, output to a file."""
    spec_path = write_spec(tmp_path / f"{spec['name']}.json", spec)
    storage = tmp_path / "storage"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestra.cli", "submit", str(spec_path), "--storage", str(storage),
             "--datasets", str(mnist_dir), *extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return process, storage, log


def wait_for_epoch(process: subprocess.Popen, storage: Path, log: Path, epoch: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        records = list(storage.glob("*/job.json"))
        if records:
            record = json.loads(records[0].read_text())
            if record["epochs_completed"] >= epoch:
                return record
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def job_at_epoch_2(tmp_path: Path, mnist_dir: Path, name: str):
    """A submitted STOP_AT_5 job that has completed 2 epochs: its driver,
    storage, driver log, record, and every process the driver has started."""
    process, storage, log = start_submit(tmp_path, mnist_dir, small_spec(name=name, **STOP_AT_5))
    record = wait_for_epoch(process, storage, log, 2)
    return process, storage, log, record, descendants(process.pid)


def name_of(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def wait_gone(processes, timeout: float = 60) -> float:
    """Seconds until every process has ended (zombies count as ended)."""
    started = time.monotonic()
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"left running: {[(p.pid, name_of(p)) for p in alive]}"
        time.sleep(0.1)


def assert_latest_checkpoint_evaluates_to_its_epoch(job_id: str, storage: Path, mnist_dir: Path) -> int:
    from orchestra.build import data as data_lib
    from orchestra.driver.resume import latest_checkpoint
    from orchestra.keras_compat import keras
    from orchestra.spec import JobSpec
    from orchestra.storage.folders import Storage, model_file

    record = read_job(storage / job_id)
    checkpoint = latest_checkpoint(Storage(storage), job_id)  # what resume starts from, maybe newer than the record's
    assert checkpoint is not None
    model = keras().models.load_model(str(model_file(checkpoint.path)))
    arrays = data_lib.prepare(JobSpec.model_validate(record["spec"]).data, mnist_dir / "mnist.npz", mnist_dir)
    value = model.evaluate(arrays.x_val, arrays.y_val, verbose=0, return_dict=True)["loss"]
    recorded = next(h for h in record["history"] if h["epoch"] == checkpoint.epoch)
    assert value == pytest.approx(recorded["val_loss"], rel=1e-5)
    return checkpoint.epoch


def assert_resumed_as_if_never_stopped(job_id: str, storage: Path) -> None:
    record = read_job(storage / job_id)
    assert record["state"] == "SUCCEEDED", record["reason"]
    assert record["resumes"] == 1
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4, 5]
    assert (record["stopped_epoch"], record["best_epoch"]) == (5, 1)
    assert record["best_checkpoint"].endswith("epoch-0001")
    assert record["checkpoints"][-1]["path"].endswith("epoch-0005")
    for run, tag in (("train", "epoch_loss"), ("validation", "epoch_loss")):
        assert tensorboard_steps(storage / job_id / "tensorboard" / run, tag) == [1, 2, 3, 4, 5]


def test_ctrl_c_twice_stops_and_resume_carries_on(tmp_path, mnist_dir):
    process, storage, log, record, family = job_at_epoch_2(tmp_path, mnist_dir, "interrupted")
    job_id = record["job_id"]
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)  # a second Ctrl-C while it stops
    assert process.wait(timeout=60) == 1, log.read_text()
    stopped_after = time.monotonic() - sent
    gone_after = stopped_after + wait_gone(family)

    status = json.loads(run_cli("status", job_id, "--storage", storage, "--json").stdout)
    assert status["state"] == "STOPPED"
    epoch = status["epochs_completed"]
    assert 2 <= epoch < 5 and status["reason"] == f"interrupted after epoch {epoch}"
    assert f"orchestra resume {job_id}" in log.read_text()
    saved = assert_latest_checkpoint_evaluates_to_its_epoch(job_id, storage, mnist_dir)
    assert saved in (epoch - 1, epoch)
    print(f"\nCtrl-C: STOPPED after epoch {epoch}, checkpoint of epoch {saved}; driver ended "
          f"{stopped_after:.1f} s after the signal, every process {gone_after:.1f} s")

    resumed = run_cli("resume", job_id, "--storage", storage, "--datasets", mnist_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"epoch {saved + 1}/30" in resumed.stdout and f"epoch {saved}/30" not in resumed.stdout
    assert_resumed_as_if_never_stopped(job_id, storage)
    again = run_cli("resume", job_id, "--storage", storage)
    assert again.returncode == 2 and "only STOPPED or FAILED jobs can be resumed" in again.stderr


def test_killed_driver_is_seen_as_lost_and_resumes(tmp_path, mnist_dir):
    process, storage, log, record, family = job_at_epoch_2(tmp_path, mnist_dir, "orphaned")
    job_id = record["job_id"]
    killed = time.monotonic()
    process.kill()
    process.wait()
    status = json.loads(run_cli("status", job_id, "--storage", storage, "--json").stdout)
    detected = time.monotonic() - killed
    assert read_job(storage / job_id)["state"] == "RUNNING"  # as the driver left it
    assert status["state"] == "FAILED" and status["reason"].startswith("driver lost: process")
    # Ray's dashboard and runtime-env agents see their raylet die at once but
    # take a minute to exit (they try to tell the dead GCS); all else ends at once.
    agents = [p for p in family if "Agent" in name_of(p)]
    workers_gone = wait_gone([p for p in family if p not in agents])
    saved = assert_latest_checkpoint_evaluates_to_its_epoch(job_id, storage, mnist_dir)

    client = Client(storage=str(storage))
    client.resume(job_id, datasets=str(mnist_dir))
    final = client.wait(job_id, timeout=300)
    assert final.state is JobState.SUCCEEDED, client.logs(job_id)
    assert_resumed_as_if_never_stopped(job_id, storage)
    agents_gone = time.monotonic() - killed + wait_gone(agents, timeout=max(5.0, 150 - (time.monotonic() - killed)))
    print(f"\ndriver SIGKILL: FAILED 'driver lost' read {detected:.1f} s after the kill, checkpoint of epoch "
          f"{saved}; workers, raylet and GCS gone {workers_gone:.1f} s after, Ray's agents within {agents_gone:.0f} s")


def test_killed_worker_fails_the_job_and_leaves_nothing(tmp_path, mnist_dir):
    process, storage, log, record, family = job_at_epoch_2(tmp_path, mnist_dir, "victim")
    killed = time.monotonic()
    os.kill(record["worker_pids"]["1"], signal.SIGKILL)
    while read_job(storage / record["job_id"])["state"] == "RUNNING":
        assert time.monotonic() - killed < 120, log.read_text()
        time.sleep(0.05)
    detected = time.monotonic() - killed
    assert process.wait(timeout=60) == 1
    gone = time.monotonic() - killed + wait_gone(family)
    status = json.loads(run_cli("status", record["job_id"], "--storage", storage, "--json").stdout)
    assert status["state"] == "FAILED" and status["reason"].startswith("worker 1:"), status["reason"]
    print(f"\nworker kill -9: FAILED after {detected:.1f} s ({status['reason'][:80]}); "
          f"driver exited and every process gone {gone:.1f} s after the kill")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.5 MB tmpfs (about four checkpoints of the job), mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_naming_the_path_and_retention_frees_space(tiny_disk, tmp_path, mnist_dir):
    spec = small_spec(name="hoarder", **{
        "fit.epochs": 12, "callbacks.early_stopping": None,
        "callbacks.checkpoint": {"monitor": "val_loss", "keep": 100},
    })
    spec_path = write_spec(tmp_path / "hoarder.json", spec)
    storage = tiny_disk / "storage"
    result = run_cli("submit", spec_path, "--in-process", "--storage", storage, "--datasets", mnist_dir, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    status = json.loads(result.stdout[result.stdout.index("{"):])
    assert status["state"] == "FAILED"
    assert "No space left on device" in status["reason"] and "/checkpoints/epoch-" in status["reason"]
    job_id = status["job_id"]
    saved = sorted(p.name for p in (storage / job_id / "checkpoints").iterdir())
    assert saved and not [name for name in saved if name.startswith(".staging")]  # the half-written one is gone
    assert_latest_checkpoint_evaluates_to_its_epoch(job_id, storage, mnist_dir)
    print(f"\ndisk full: FAILED after epoch {status['epochs_completed']} ({status['reason']})")

    subprocess.run(["rm", "-rf", str(storage / job_id)], check=True)
    spec = {**spec, "name": "frugal", "callbacks": {**spec["callbacks"], "checkpoint": {"monitor": "val_loss",
                                                                                          "keep": 1}}}
    result = run_cli("submit", write_spec(tmp_path / "frugal.json", spec), "--in-process", "--storage", storage,
                     "--datasets", mnist_dir, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
