"""Real faults on real processes: Ctrl-C (twice) and SIGKILL to a running
`orchestra submit`, kill -9 of a worker with and without max_failures, a
storage that fills mid-checkpoint. After each: the state `status` shows, a
checkpoint that loads and evaluates to the recorded value, the worker that
died named, and no process of the job left.

Recovery is proven by numbers: the job (Adam, whose moments and step count
are state; early stopping on val_loss with patience 3 and min_delta 0, so
where it stops depends on every number of the run) is run once without a
fault, and each recovered run must give the same per-epoch metrics (relative
1e-5), stop at the same epoch with the same best. A resume that lost the
optimizer's state, the data order or early stopping's wait count would not."""

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

RECOVERABLE = {
    "data.train_size": 2000,  # 100 steps an epoch: an epoch lasts long enough to be interrupted in
    "callbacks.EarlyStopping": {"monitor": "val_loss", "patience": 3, "min_delta": 0},
    "callbacks.ModelCheckpoint": {"monitor": "val_loss", "keep": 1},  # every epoch: resume starts from the latest
    "callbacks.TensorBoard": {"update_freq": "epoch"},
}
# What a resumed epoch must reproduce; times and memory are the run's own.
TRAINING_NUMBERS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_dir) -> dict:
    """The record of the RECOVERABLE job run to its end without a fault."""
    root = tmp_path_factory.mktemp("uninterrupted")
    spec = write_spec(root / "spec.json", small_spec(name="uninterrupted", **RECOVERABLE))
    result = run_cli("submit", spec, "--storage", root / "storage", "--datasets", mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    record = read_job(root / "storage" / result.stdout.split()[1].rstrip(":"))
    # Early stopping, not the epoch limit, ended it, and late enough that a fault at epoch 2 lands mid-run.
    assert 5 <= record["stopped_epoch"] < small_spec()["fit"]["epochs"], record["history"]
    return record


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


def wait_for_record(process: subprocess.Popen, storage: Path, log: Path, done, timeout: float = 240) -> dict:
    """The job's record once `done(record)` holds; fails if the driver exits first."""
    deadline = time.monotonic() + timeout
    while True:
        exited = process.poll() is not None  # before the read: a record written before the exit is seen
        records = list(storage.glob("*/job.json"))
        if records:
            record = json.loads(records[0].read_text())  # renamed into place: never half written
            if done(record):
                return record
        assert not exited, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def wait_for_epoch(process: subprocess.Popen, storage: Path, log: Path, epoch: int) -> dict:
    return wait_for_record(process, storage, log, lambda record: record["epochs_completed"] >= epoch)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def job_at_epoch_2(tmp_path: Path, mnist_dir: Path, name: str, **overrides):
    """A submitted RECOVERABLE job that has completed 2 epochs: its driver,
    storage, driver log, record, and every process the driver has started."""
    process, storage, log = start_submit(tmp_path, mnist_dir, small_spec(name=name, **{**RECOVERABLE, **overrides}))
    record = wait_for_epoch(process, storage, log, 2)
    return process, storage, log, record, descendants(process.pid)


def name_of(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie; a process that ends while it is asked is not alive."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes, timeout: float = 60) -> float:
    """Seconds until every process has ended (zombies count as ended)."""
    started = time.monotonic()
    while True:
        left = [p for p in processes if alive(p)]
        if not left:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"left running: {[(p.pid, name_of(p)) for p in left]}"
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
    model = keras().models.load_model(str(model_file(storage / job_id / checkpoint.path)))
    arrays = data_lib.prepare(JobSpec.model_validate(record["spec"]).data, mnist_dir / "mnist.npz", mnist_dir)
    value = model.evaluate(arrays.x_val, arrays.y_val, verbose=0, return_dict=True)["loss"]
    recorded = next(h for h in record["history"] if h["epoch"] == checkpoint.epoch)
    assert value == pytest.approx(recorded["val_loss"], rel=1e-5)
    return checkpoint.epoch


def assert_same_numbers_as(reference: dict, job_id: str, storage: Path) -> float:
    """The recovered job's record against the uninterrupted one's: every
    epoch's metrics, where early stopping stopped and what it kept, the test
    metrics, and one TensorBoard point per epoch. Returns the largest
    relative difference of a metric."""
    record = read_job(storage / job_id)
    assert record["state"] == "SUCCEEDED", record["reason"]
    assert [h["epoch"] for h in record["history"]] == [h["epoch"] for h in reference["history"]]
    largest = 0.0
    for got, want in zip(record["history"], reference["history"]):
        for name in TRAINING_NUMBERS:
            assert got[name] == pytest.approx(want[name], rel=1e-5), f"epoch {got['epoch']} {name}"
            largest = max(largest, abs(got[name] - want[name]) / abs(want[name]))
    stop, best = reference["stopped_epoch"], reference["best_epoch"]
    assert (record["stopped_epoch"], record["best_epoch"]) == (stop, best)
    assert record["best_value"] == pytest.approx(reference["best_value"], rel=1e-5)
    assert record["test_metrics"] == pytest.approx(reference["test_metrics"], rel=1e-5)
    assert record["best_checkpoint"].endswith(f"epoch-{best:04d}")
    assert record["checkpoints"][-1]["path"].endswith(f"epoch-{stop:04d}")
    for run, tag in (("train", "epoch_loss"), ("validation", "epoch_loss")):
        assert tensorboard_steps(storage / job_id / "tensorboard" / run, tag) == list(range(1, stop + 1))
    return largest


def interrupt_twice(process: subprocess.Popen, storage: Path, log: Path) -> bool:
    """Ctrl-C, then a second Ctrl-C while the driver is provably still
    stopping: once the record says STOPPED the driver is releasing its
    workers; frozen there (SIGSTOP), it gets the second SIGINT on waking.
    False if it had already exited when frozen (the second signal then
    reaches no driver, and there is nothing to acknowledge)."""
    process.send_signal(signal.SIGINT)
    wait_for_record(process, storage, log, lambda record: record["state"] == "STOPPED", timeout=60)
    process.send_signal(signal.SIGSTOP)  # a no-op if wait_for_record has reaped it
    try:
        stopping = alive(psutil.Process(process.pid))
    except psutil.NoSuchProcess:
        stopping = False
    if stopping:
        process.send_signal(signal.SIGINT)  # pending until it wakes, in the middle of stopping
    process.send_signal(signal.SIGCONT)
    return stopping


def test_ctrl_c_twice_stops_and_resume_gives_the_numbers_of_a_run_never_stopped(tmp_path, mnist_dir, uninterrupted):
    process, storage, log, record, family = job_at_epoch_2(tmp_path, mnist_dir, "interrupted")
    job_id = record["job_id"]
    sent = time.monotonic()
    second_signal_seen = interrupt_twice(process, storage, log)
    assert process.wait(timeout=60) == 1, log.read_text()
    stopped_after = time.monotonic() - sent
    gone_after = stopped_after + wait_gone(family)
    if second_signal_seen:
        assert "SIGINT received; already stopping the job" in log.read_text()

    status = json.loads(run_cli("status", job_id, "--storage", storage, "--json").stdout)
    assert status["state"] == "STOPPED"
    epoch = status["epochs_completed"]
    assert 2 <= epoch < uninterrupted["stopped_epoch"] and status["reason"] == f"interrupted after epoch {epoch}"
    assert f"orchestra resume {job_id}" in log.read_text()
    saved = assert_latest_checkpoint_evaluates_to_its_epoch(job_id, storage, mnist_dir)
    assert saved in (epoch - 1, epoch)
    print(f"\nCtrl-C: STOPPED after epoch {epoch}, checkpoint of epoch {saved}; driver ended "
          f"{stopped_after:.1f} s after the signal, every process {gone_after:.1f} s; second Ctrl-C "
          f"{'acknowledged while stopping' if second_signal_seen else 'after the driver had exited'}")

    resumed = run_cli("resume", job_id, "--storage", storage, "--datasets", mnist_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    stop = uninterrupted["stopped_epoch"]
    assert f"epoch {saved + 1}/30" in resumed.stdout and f"epoch {saved}/30" not in resumed.stdout
    assert read_job(storage / job_id)["resumes"] == 1
    differs = assert_same_numbers_as(uninterrupted, job_id, storage)
    again = run_cli("resume", job_id, "--storage", storage)
    assert again.returncode == 2 and "only STOPPED or FAILED jobs can be resumed" in again.stderr
    print(f"resumed from epoch {saved}: epochs {saved + 1}-{stop} as the uninterrupted run's "
          f"(largest relative difference {differs:.1e})")


def test_killed_driver_is_seen_as_lost_and_resume_gives_the_numbers_of_a_run_never_stopped(
        tmp_path, mnist_dir, uninterrupted):
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
    assert final.resumes == 1
    differs = assert_same_numbers_as(uninterrupted, job_id, storage)
    agents_gone = time.monotonic() - killed + wait_gone(agents, timeout=max(5.0, 150 - (time.monotonic() - killed)))
    print(f"\ndriver SIGKILL: FAILED 'driver lost' read {detected:.1f} s after the kill, checkpoint of epoch "
          f"{saved}; workers, raylet and GCS gone {workers_gone:.1f} s after, Ray's agents within {agents_gone:.0f} s; "
          f"resumed, epochs {saved + 1}-{uninterrupted['stopped_epoch']} as the uninterrupted run's "
          f"(largest relative difference {differs:.1e})")


def test_killed_worker_with_max_failures_is_replaced_and_gives_the_numbers_of_a_run_never_stopped(
        tmp_path, mnist_dir, uninterrupted):
    """Ray Train restarts the group from the latest checkpoint, here a
    weights-only one: its weights file holds the optimizer's variables too
    (Keras's .weights.h5 saves the model's optimizer with it). Neither
    max_failures nor save_weights_only changes what training computes, so
    the uninterrupted run is the reference."""
    process, storage, log, record, family = job_at_epoch_2(
        tmp_path, mnist_dir, "replaced", **{"scaling.max_failures": 1,
                                            "callbacks.ModelCheckpoint": {"monitor": "val_loss", "keep": 1,
                                                                     "save_weights_only": True}})
    victim = record["worker_pids"]["1"]
    os.kill(victim, signal.SIGKILL)
    assert process.wait(timeout=300) == 0, log.read_text()
    record = read_job(storage / record["job_id"])
    assert record["restarts"] == 1 and record["worker_pids"]["1"] != victim
    differs = assert_same_numbers_as(uninterrupted, record["job_id"], storage)
    print(f"\nworker kill -9 with max_failures 1: restarted once, epochs 1-{record['stopped_epoch']} as the "
          f"uninterrupted run's (largest relative difference {differs:.1e})")


def test_killed_worker_fails_the_job_naming_it_and_leaves_nothing(tmp_path, mnist_dir):
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
    reason = status["reason"]
    assert status["state"] == "FAILED"
    # The root cause first: the killed rank and its pid, with the death Ray saw, never worker 0's cut collective.
    victim = record["worker_pids"]["1"]
    assert reason.startswith(f"worker 1 (pid {victim}) died without reporting an error: killed by a signal"), reason
    root_cause = reason.split(" [then ")[0].split("; Ray saw ", 1)[1]
    assert root_cause.startswith(("WorkerHealthCheckFailedError", "ActorDiedError")), reason
    print(f"\nworker kill -9: FAILED after {detected:.1f} s ({reason[:300]}); "
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
        "fit.epochs": 12, "callbacks.EarlyStopping": None,
        "callbacks.ModelCheckpoint": {"monitor": "val_loss", "keep": 100},
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
    spec = {**spec, "name": "frugal", "callbacks": [
        {"class_name": "ModelCheckpoint", "config": {"monitor": "val_loss", "keep": 1}} if entry["class_name"] == "ModelCheckpoint"
        else entry for entry in spec["callbacks"]]}
    result = run_cli("submit", write_spec(tmp_path / "frugal.json", spec), "--in-process", "--storage", storage,
                     "--datasets", mnist_dir, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
