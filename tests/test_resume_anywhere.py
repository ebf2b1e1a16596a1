"""Resume anywhere, on any worker count: a job keeps its id across runs
(each resume is an attempt in its record; on a cluster, a new Ray job of
the same job), and continues on another worker count with the numbers of
the run that was never stopped.

Why the numbers can match: `fit.batch_size` is the global batch, an
epoch's order is one seeded permutation cut into global batches and each
batch is split among the workers, the gradients are averaged over the
global batch, and the optimizer's state (Adam's moments and step count)
travels in the checkpoint. So a job stopped on 2 workers and resumed on 1
(or the other way round) must give, epoch by epoch, what the job's own
count gives uninterrupted, within float noise (the sums of a global batch
in another order: relative 1e-5, as tests/test_fidelity.py allows)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_job, run_cli, small_spec, write_spec
from ray_cluster import wait_for

from orchestra import Client, JobState
from orchestra.cli import main
from orchestra.driver.resume import reopen
from orchestra.spec import JobSpec
from orchestra.storage.folders import Storage
from orchestra.storage.lease import held
from orchestra.storage.record import JobRecord

RTOL = 1e-5  # tests/test_fidelity.py's: float32 sums in another order
NUMBERS = ("loss", "accuracy", "val_loss", "val_accuracy")
EPOCHS = 10


def anywhere_spec(workers: int, name: str) -> dict:
    """An MNIST job of 150 steps an epoch (long enough to be stopped in)
    with Adam, whose moments and step count are state, and a checkpoint
    every epoch, so a resume starts from the last one.

    Adam's learning rate is 0.003: at 0.01 this job's training amplifies
    float noise itself, in one process: the same steps with each global
    batch's gradient summed in two halves differ by 2e-4 at epoch 8 and
    13% at epoch 9 (at 0.003, by at most 3e-7 in 10 epochs), so no two runs
    on different counts, resumed or not, agree to 1e-5 there."""
    return small_spec(**{
        "name": name, "data.train_size": 3000, "fit.epochs": EPOCHS, "scaling.workers": workers,
        "compile.optimizer": {"type": "adam", "learning_rate": 0.003},
        "callbacks": [{"class_name": "ModelCheckpoint", "config": {"keep": 2}}],
    })


def stopped_job(storage: Storage, workers: int = 2, **spec_fields) -> JobRecord:
    """A STOPPED job's record after 3 epochs, its spec as a driver writes it."""
    spec = JobSpec.model_validate({**anywhere_spec(workers, "stopped"), **spec_fields}).model_dump(mode="json")
    record = JobRecord(job_id="job-1", name="stopped", workers=workers, spec=spec, epochs_completed=3)
    record.begin_attempt()
    record.start()
    record.stop("interrupted after epoch 3")
    storage.create_job_dir(record.job_id)
    storage.write_record(record)
    return record


# Without Ray: what a resume on another count checks and writes.

def test_a_worker_count_the_global_batch_does_not_divide_among_is_refused_naming_the_field(tmp_path, capsys):
    storage = Storage(tmp_path)
    before = stopped_job(storage)
    files = sorted(p.name for p in (tmp_path / "job-1").iterdir())
    assert main(["resume", "job-1", "--workers", "3", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fit.batch_size: 20 must be a multiple of scaling.workers 3" in err and "Traceback" not in err
    assert main(["resume", "job-1", "--workers", "0", "--storage", str(tmp_path)]) == 2
    assert "--workers: must be at least 1, not 0" in capsys.readouterr().err
    after = storage.read_record("job-1")
    assert (after.state, after.workers, after.resumes, after.generation) == (
        JobState.STOPPED, 2, 0, before.generation)
    assert sorted(p.name for p in (tmp_path / "job-1").iterdir()) == files  # nothing written, no lease taken


def test_an_in_process_job_cannot_resume_on_workers(tmp_path, capsys):
    storage = Storage(tmp_path)
    record = stopped_job(storage)
    record.mode = "in_process"
    storage.write_record(record)
    assert main(["resume", "job-1", "--workers", "2", "--storage", str(tmp_path)]) == 2
    assert "--workers: does not go with a job trained in one process" in capsys.readouterr().err


def test_a_resume_on_another_count_is_an_attempt_of_the_same_job(tmp_path):
    storage = Storage(tmp_path)
    stopped_job(storage)
    checkpoint = tmp_path / "job-1" / "checkpoints" / "epoch-0003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"callbacks": {}}))
    one_worker = JobSpec.model_validate(anywhere_spec(1, "stopped"))
    try:
        record, resume_from = reopen(storage, "job-1", one_worker, ray_job="job-1.resume1")
    finally:
        held(tmp_path / "job-1").release()
    assert resume_from.epoch == 3 and record.state is JobState.PENDING
    stored = storage.read_record("job-1")
    assert (stored.workers, stored.spec["scaling"]["workers"], stored.resumes) == (1, 1, 1)
    assert [(a.workers, a.from_epoch, a.ray_job) for a in stored.attempts] == [(2, 0, None), (1, 3, "job-1.resume1")]
    assert stored.status().attempts == stored.attempts  # what `status --json` and a remote client see


def test_a_clusters_runs_of_one_job_are_told_apart_and_cached_apart(tmp_path):
    """A resume's Ray job names its job; the first run's entrypoint gives
    the resume its storage; a run's final status is cached under the run,
    so a job resumed after its first run was cached is not hidden by it."""
    import shlex
    from types import SimpleNamespace

    from orchestra.client.ray_jobs import StatusCache, _job_of, _option, resume_id

    first = shlex.join(["python", "-m", "orchestra.driver", "run", "spec.json", "--job-id", "j-1",
                        "--storage", "/mnt/shared storage"])
    assert (_option(first, "--storage"), _option(first, "--datasets")) == ("/mnt/shared storage", None)
    resumed = SimpleNamespace(submission_id=resume_id("j-1", 1), metadata={"orchestra": "1", "job_id": "j-1"})
    older = SimpleNamespace(submission_id="old-1", metadata={"orchestra": "1"})  # submitted before runs
    assert (resumed.submission_id, _job_of(resumed), _job_of(older)) == ("j-1.resume1", "j-1", "old-1")

    cache = StatusCache("http://head:8265", root=tmp_path)
    record = stopped_job(Storage(tmp_path / "storage"))
    cache.put(record.status(), key="job-1")
    record.reopen(3)
    record.start()
    record.finish()
    cache.put(record.status(), key="job-1.resume1")
    assert cache.get("job-1").state is JobState.STOPPED
    assert cache.get("job-1", key="job-1.resume1").state is JobState.SUCCEEDED
    assert cache.get("other", key="job-1.resume1") is None  # a run's file is its own job's only


# With Ray: real jobs stopped by Ctrl-C, resumed on another count.

def submit_in_background(tmp_path: Path, mnist_dir: Path, spec: dict) -> tuple[subprocess.Popen, Path, Path]:
    """`orchestra submit` in the foreground of a process of its own, as in a terminal."""
    storage, log = tmp_path / "storage", tmp_path / f"{spec['name']}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestra.cli", "submit", str(write_spec(tmp_path / "spec.json", spec)),
             "--storage", str(storage), "--datasets", str(mnist_dir)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, storage, log


def ctrl_c_after_epoch(tmp_path: Path, mnist_dir: Path, spec: dict, epoch: int) -> tuple[str, Path]:
    """Submit `spec`, Ctrl-C its driver once the record says `epoch` epochs
    are done; (job id, storage) of the STOPPED job."""
    process, storage, log = submit_in_background(tmp_path, mnist_dir, spec)
    deadline = time.monotonic() + 300
    while True:
        exited = process.poll() is not None  # before the read: a record written before the exit is seen
        records = list(storage.glob("*/job.json"))
        if records and json.loads(records[0].read_text())["epochs_completed"] >= epoch:
            break
        assert not exited and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 1, log.read_text()
    job_id = records[0].parent.name
    record = read_job(storage / job_id)
    assert record["state"] == "STOPPED" and epoch <= record["epochs_completed"] < EPOCHS, record["reason"]
    return job_id, storage


def uninterrupted(root: Path, mnist_dir: Path, workers: int) -> dict:
    spec = write_spec(root / f"uninterrupted-{workers}.json", anywhere_spec(workers, f"uninterrupted{workers}"))
    result = run_cli("submit", spec, "--storage", root, "--datasets", mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return read_job(root / result.stdout.split()[1].rstrip(":"))


@pytest.fixture(scope="module")
def uninterrupted_on_2(tmp_path_factory, mnist_dir) -> dict:
    return uninterrupted(tmp_path_factory.mktemp("uninterrupted-2"), mnist_dir, 2)


@pytest.fixture(scope="module")
def uninterrupted_on_1(tmp_path_factory, mnist_dir) -> dict:
    return uninterrupted(tmp_path_factory.mktemp("uninterrupted-1"), mnist_dir, 1)


def assert_same_numbers(record: dict, reference: dict) -> float:
    """Every epoch's numbers and the test metrics against the reference's;
    returns the largest relative difference."""
    assert record["state"] == "SUCCEEDED", record["reason"]
    assert [h["epoch"] for h in record["history"]] == [h["epoch"] for h in reference["history"]] == list(
        range(1, EPOCHS + 1))
    largest = 0.0
    for got, want in zip(record["history"], reference["history"]):
        for name in NUMBERS:
            assert got[name] == pytest.approx(want[name], rel=RTOL), f"epoch {got['epoch']} {name}"
            largest = max(largest, abs(got[name] - want[name]) / abs(want[name]))
    assert record["test_metrics"] == pytest.approx(reference["test_metrics"], rel=RTOL)
    return largest


def resumed_from(record: dict, workers: list[int]) -> int:
    """The epoch the second attempt continued from, after checking each
    attempt's worker count; some epochs were trained on the new count."""
    attempts = record["attempts"]
    assert [a["workers"] for a in attempts] == workers and record["workers"] == workers[-1]
    assert record["resumes"] == len(workers) - 1 and attempts[0]["from_epoch"] == 0
    assert 2 <= attempts[1]["from_epoch"] < EPOCHS, attempts
    return attempts[1]["from_epoch"]


@pytest.mark.integration
def test_stopped_on_2_workers_resumed_on_1_gives_the_numbers_of_2_workers_never_stopped(
        tmp_path, mnist_dir, uninterrupted_on_2):
    job_id, storage = ctrl_c_after_epoch(tmp_path, mnist_dir, anywhere_spec(2, "two-then-one"), 3)
    resumed = run_cli("resume", job_id, "--workers", "1", "--storage", storage, "--datasets", mnist_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 workers" in resumed.stdout
    record = read_job(storage / job_id)
    start = resumed_from(record, [2, 1])
    assert f"epoch {start + 1}/{EPOCHS}" in resumed.stdout and f"epoch {start}/{EPOCHS}" not in resumed.stdout
    largest = assert_same_numbers(record, uninterrupted_on_2)
    print(f"\n2 workers stopped, resumed on 1 from epoch {start}: epochs 1-{EPOCHS} as 2 workers never stopped "
          f"(largest relative difference {largest:.1e})")


@pytest.mark.integration
def test_stopped_on_1_worker_resumed_on_2_gives_the_numbers_of_1_worker_never_stopped(
        tmp_path, mnist_dir, uninterrupted_on_1):
    job_id, storage = ctrl_c_after_epoch(tmp_path, mnist_dir, anywhere_spec(1, "one-then-two"), 3)
    client = Client(storage=str(storage))
    client.resume(job_id, workers=2, datasets=str(mnist_dir))
    final = client.wait(job_id, timeout=600)
    assert final.state is JobState.SUCCEEDED, client.logs(job_id)
    record = read_job(storage / job_id)
    start = resumed_from(record, [1, 2])
    largest = assert_same_numbers(record, uninterrupted_on_1)
    print(f"\n1 worker stopped, resumed on 2 from epoch {start}: epochs 1-{EPOCHS} as 1 worker never stopped "
          f"(largest relative difference {largest:.1e})")


# On a real two-node Ray cluster on this machine, through its job server.

@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mnist_dir):
    from ray_cluster import LoopbackCluster

    cluster = LoopbackCluster(tmp_path_factory.mktemp("cluster"), env={"ORCHESTRA_DATASETS": str(mnist_dir)}).start()
    yield cluster
    cluster.stop()


@pytest.mark.integration
def test_a_cluster_job_resumes_through_the_job_server_as_one_job_with_one_history(
        cluster, tmp_path, monkeypatch, uninterrupted_on_2):
    """Submitted on 2 workers, cancelled after epoch 3, resumed on 1 worker
    through --address and cancelled again (cancel reaches the resume's Ray
    job), resumed once more: three Ray jobs, one orchestra job, one
    history with the numbers of 2 workers never stopped."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    monkeypatch.setenv("ORCHESTRA_CACHE", str(tmp_path / "cache"))
    env = {**cluster.client_env(), "ORCHESTRA_CACHE": str(tmp_path / "cache")}
    client, storage = Client(cluster.address), tmp_path / "shared"
    job_id = client.submit(write_spec(tmp_path / "spec.json", anywhere_spec(2, "cluster-anywhere")),
                           storage=str(storage))
    wait_for(lambda: client.status(job_id).epochs_completed >= 3, 300, "three epochs")
    assert client.cancel(job_id).state is JobState.STOPPED

    detached = run_cli("resume", job_id, "--workers", "1", "--detach", env=env)
    assert detached.returncode == 0, detached.stdout + detached.stderr
    resumed = client.status(job_id)  # its driver owns the job: it has reopened it, its workers are starting
    assert resumed.resumes == 1 and not resumed.state.is_terminal, resumed.reason
    start = resumed.attempts[-1].from_epoch
    # One worker trains an epoch of this job in a fraction of a second: cancelled while it starts, it cannot finish.
    cancelled = run_cli("cancel", job_id, "--json", env=env)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "STOPPED"
    assert client.status(job_id).epochs_completed < EPOCHS
    rays = client._jobs._jobs
    assert [str(rays.get_job_status(run)) for run in (job_id, f"{job_id}.resume1")] == ["STOPPED"] * 2

    final = run_cli("resume", job_id, env=env)  # on the count it last ran on: 1
    assert final.returncode == 0, final.stdout + final.stderr
    shown = final.stdout
    assert f"epoch {EPOCHS}/{EPOCHS}" in shown and "epoch 1/" not in shown and "SUCCEEDED" in shown, shown

    record = read_job(storage / job_id)
    assert [(a["workers"], a["ray_job"]) for a in record["attempts"]] == [
        (2, job_id), (1, f"{job_id}.resume1"), (1, f"{job_id}.resume2")]
    assert 2 <= start == record["attempts"][2]["from_epoch"] < EPOCHS  # the cancelled resume trained no epoch
    largest = assert_same_numbers(record, uninterrupted_on_2)
    assert client.metrics(job_id) == record["history"]  # one history, read back from the three runs' logs
    status = client.status(job_id)
    assert (status.state, status.resumes, status.workers) == (JobState.SUCCEEDED, 2, 1)
    assert json.loads(run_cli("status", job_id, "--json", env=env).stdout) == status.model_dump(mode="json")
    log = client.logs(job_id)
    assert "epoch 1/" in log and f"epoch {EPOCHS}/{EPOCHS}" in log
    assert [s.job_id for s in client.list()].count(job_id) == 1
    print(f"\ncluster job: cancelled after epoch 3, resumed on 1 worker through the job server, cancelled, resumed: "
          f"epochs 1-{EPOCHS} as 2 workers never stopped (largest relative difference {largest:.1e})")


@pytest.mark.integration
def test_a_job_from_before_runs_reads_as_before_and_a_refused_resume_leaves_its_status(cluster, tmp_path,
                                                                                     monkeypatch):
    """A Ray job submitted by an older client (no job id in its metadata)
    is still one job to status, logs and cancel; a resume its driver
    refuses (here, no such job in the storage) is an error with the
    driver's words, and the job reads as it did."""
    import shlex

    from orchestra.errors import JobStateError
    from orchestra.storage import status_lines

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    monkeypatch.setenv("ORCHESTRA_CACHE", str(tmp_path / "cache"))
    client = Client(cluster.address)
    record = JobRecord(job_id="old-job", name="old", workers=2, spec={})
    record.start()
    record.stop("interrupted after epoch 0")
    script = f"print('epoch 1/3', flush=True)\nprint({status_lines.status_line(record)!r}, flush=True)\n"
    client._jobs._jobs.submit_job(entrypoint=shlex.join(["python", "-c", script]), submission_id="old-job",
                                  metadata={"orchestra": "1", "name": "old", "workers": "2"})
    client.wait("old-job", timeout=120)
    assert client.status("old-job").state is JobState.STOPPED and "epoch 1/3" in client.logs("old-job")
    assert client.cancel("old-job").state is JobState.STOPPED  # it has ended: nothing to stop

    with pytest.raises(JobStateError, match="job old-job did not resume: .*no job 'old-job' in "):
        client.resume("old-job", storage=str(tmp_path / "shared"))
    assert client.status("old-job").state is JobState.STOPPED  # the refused run said nothing: as before
    assert client.status("old-job.resume1").state is JobState.FAILED  # that run, named by its Ray job

