"""Cluster mode on a real two-node Ray cluster on this machine: jobs go
through the head's job server (Ray Jobs) with token authentication, and are
followed from the CLI and the Python client as from a laptop."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest
from conftest import read_job, run_cli, small_spec, write_spec
from ray_cluster import LoopbackCluster, wait_for

from orchestra import Client, JobState
from orchestra.errors import ClusterError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("cluster")
    cluster = LoopbackCluster(folder, env={"ORCHESTRA_DATASETS": str(mnist_dir)}).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def client(cluster, monkeypatch) -> Client:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    return Client(cluster.address)


def quick_spec(**overrides) -> dict:
    return small_spec(**{"fit.epochs": 3, "callbacks.EarlyStopping": None, **overrides})


def test_cli_submit_follows_the_job_and_the_client_reads_it_back(cluster, client, tmp_path):
    storage = tmp_path / "shared"
    spec = write_spec(tmp_path / "quick.json", quick_spec())
    result = run_cli("submit", spec, "--storage", storage, env=cluster.client_env())
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    assert "epoch 3/3" in result.stdout and "SUCCEEDED" in result.stdout
    assert "@orchestra-status" not in result.stdout

    record = read_job(storage / job_id)
    status = client.status(job_id)
    assert status.state is JobState.SUCCEEDED
    assert (status.epochs_completed, status.best_epoch, status.test_metrics) == (
        record["epochs_completed"], record["best_epoch"], record["test_metrics"])
    assert client.metrics(job_id) == record["history"]
    assert client.wait(job_id, timeout=5).state is JobState.SUCCEEDED
    assert job_id in [s.job_id for s in client.list()]
    assert "epoch 3/3" in client.logs(job_id)

    cli_status = run_cli("status", job_id, "--json", env=cluster.client_env())
    assert json.loads(cli_status.stdout) == status.model_dump(mode="json")

    # one worker on each node: the head's and the second one's
    nodes = cluster.actor_nodes(list(record["worker_pids"].values()))
    assert len(set(nodes.values())) == 2, nodes


def test_a_job_that_cannot_be_placed_waits_pending_and_cancel_stops_it(cluster, client, tmp_path):
    job_id = client.submit(write_spec(tmp_path / "big.json", quick_spec(**{"scaling.cpus_per_worker": 2})),
                           storage=str(tmp_path / "shared"))
    pending = wait_for(lambda: (s := client.status(job_id)).reason and "waiting for resources" in s.reason and s,
                       120, "the pending reason")
    assert pending.state is JobState.PENDING
    assert "2 workers x 2 CPU" in pending.reason and "2 CPU in all" in pending.reason
    time.sleep(5)
    assert client.status(job_id).state is JobState.PENDING
    final = client.cancel(job_id)
    assert final.state is JobState.STOPPED


def test_two_jobs_at_once_then_cancel_one_and_its_workers_end(cluster, client, tmp_path):
    storage = tmp_path / "shared"
    half_cpu = {"scaling.cpus_per_worker": 0.5}
    long_job = client.submit(write_spec(tmp_path / "long.json", quick_spec(**half_cpu, **{"fit.epochs": 500})),
                             storage=str(storage))
    wait_for(lambda: client.status(long_job).epochs_completed >= 2, 300, "two epochs of the long job")
    short_job = client.submit(write_spec(tmp_path / "short.json", quick_spec(**half_cpu)), storage=str(storage))
    assert client.wait(short_job, timeout=300).state is JobState.SUCCEEDED
    assert client.status(long_job).state is JobState.RUNNING, "the long job should still be running"
    for job in (long_job, short_job):
        assert (storage / job / "job.json").is_file()
        assert list((storage / job / "tensorboard" / "validation").glob("events.out.tfevents.*"))

    final = client.cancel(long_job)
    assert final.state is JobState.STOPPED
    assert final.epochs_completed >= 2
    assert final.reason.startswith(("interrupted after epoch", "cancelled after epoch"))
    pids = read_job(storage / long_job)["worker_pids"].values()
    wait_for(lambda: not any(_running(pid) for pid in pids), 60, "the workers to end")
    assert run_cli("status", long_job, env=cluster.client_env()).stdout.split()[2] == "STOPPED"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_missing_or_wrong_token_is_a_clear_error(cluster, tmp_path):
    env = {k: v for k, v in cluster.client_env().items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    missing = run_cli("list", env=env)
    assert missing.returncode == 2
    assert "asks for a token and none was sent" in missing.stderr and "Traceback" not in missing.stderr

    wrong = run_cli("list", env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2
    assert "refused the token" in wrong.stderr and "Traceback" not in wrong.stderr
    token = cluster.token_path.read_text()
    assert "not-the-token" not in wrong.stderr + wrong.stdout and token not in wrong.stderr + wrong.stdout


def test_bad_input_is_refused_before_anything_reaches_the_cluster(cluster, client, tmp_path):
    before = {s.job_id for s in client.list()}
    bad = write_spec(tmp_path / "bad.json", quick_spec(**{"model.layers": [{"type": "Dense2", "units": 3}]}))
    result = run_cli("submit", bad, env=cluster.client_env())
    assert result.returncode == 2
    assert "model.layers.0.type" in result.stderr and "Dense" in result.stderr
    unknown = run_cli("status", "no-such-job", env=cluster.client_env())
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr
    assert {s.job_id for s in client.list()} == before
    with pytest.raises(ClusterError, match="cannot reach"):
        Client("http://127.0.0.1:9")


def job_driver(cluster: LoopbackCluster, job_id: str) -> psutil.Process:
    """The process of a Ray job's entrypoint: `python -m orchestra.driver run ... --job-id JOB`."""
    for process in cluster.processes():
        try:
            command = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "orchestra.driver" in command and job_id in command and "python" in Path(command[0]).name:
            return process
    raise AssertionError(f"no driver process of {job_id} among the cluster's processes")


def test_a_driver_killed_on_the_cluster_reads_as_lost_with_ray_s_reason(cluster, client, tmp_path):
    """The "driver lost" reading of a real Ray job whose driver process was
    killed: Ray Jobs has it FAILED with the entrypoint's exit, the driver's
    last status line said RUNNING, and status combines the two."""
    storage = tmp_path / "shared"
    job_id = client.submit(write_spec(tmp_path / "headless.json", quick_spec(**{"fit.epochs": 500})),
                           storage=str(storage))
    wait_for(lambda: client.status(job_id).epochs_completed >= 2, 300, "two epochs")
    driver = job_driver(cluster, job_id)
    pids = read_job(storage / job_id)["worker_pids"].values()
    driver.kill()
    killed = time.monotonic()
    final = wait_for(lambda: (s := client.status(job_id)).state.is_terminal and s, 120, "a final state")
    detected = time.monotonic() - killed
    ray_job = client._jobs._jobs.get_job_info(job_id)
    assert str(ray_job.status.value if hasattr(ray_job.status, "value") else ray_job.status) == "FAILED"
    assert final.state is JobState.FAILED, final.reason
    assert final.reason.startswith("driver lost: "), final.reason
    # SIGKILL, as Ray's job supervisor sees the entrypoint's shell report it (128 + 9) or Python's -9.
    assert re.fullmatch(r"driver lost: Job entrypoint command failed with exit code (137|-9)", final.reason), \
        final.reason
    assert final.epochs_completed >= 2  # what the driver last said survives
    cli = json.loads(run_cli("status", job_id, "--json", env=cluster.client_env()).stdout)
    assert (cli["state"], cli["reason"]) == ("FAILED", final.reason)
    wait_for(lambda: not any(_running(pid) for pid in pids), 60, "the workers to end with their driver")
    print(f"\ndriver SIGKILL on the cluster: FAILED {detected:.1f} s after, reason: {final.reason[:200]}")


# The node-loss tests stop the second node: they come last in this module.

def test_node_loss_with_max_failures_waits_for_a_node_and_resumes_from_the_checkpoint(cluster, client, tmp_path,
                                                                                        mnist_dir):
    spec = write_spec(tmp_path / "resilient.json", quick_spec(**{"fit.epochs": 40, "scaling.max_failures": 1}))
    reference = run_cli("submit", spec, "--in-process", "--storage", tmp_path / "reference",
                        "--datasets", mnist_dir)
    assert reference.returncode == 0, reference.stderr
    expected = read_job(tmp_path / "reference" / reference.stdout.split()[1].rstrip(":"))

    job_id = client.submit(spec, storage=str(tmp_path / "shared"))
    wait_for(lambda: client.status(job_id).epochs_completed >= 3, 300, "three epochs")
    cluster.stop_node(1)
    lost_at = time.monotonic()
    time.sleep(10)
    waiting = client.status(job_id)
    assert not waiting.state.is_terminal, waiting.reason
    cluster.add_node()
    final = client.wait(job_id, timeout=600)
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.restarts == 1 and final.epochs_completed == 40
    history = client.metrics(job_id)
    assert [h["epoch"] for h in history] == list(range(1, 41))
    for got, want in zip(history, expected["history"]):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4), got["epoch"]
    assert final.test_metrics == pytest.approx(expected["test_metrics"], rel=1e-4)
    print(f"node lost to SUCCEEDED: {time.monotonic() - lost_at:.1f} s")


def test_node_loss_without_max_failures_fails_with_the_reason_and_leaves_nothing(cluster, client, tmp_path):
    storage = tmp_path / "shared"
    job_id = client.submit(write_spec(tmp_path / "fragile.json", quick_spec(**{"fit.epochs": 500})),
                           storage=str(storage))
    wait_for(lambda: client.status(job_id).epochs_completed >= 2, 300, "two epochs")
    pids = read_job(storage / job_id)["worker_pids"].values()
    cluster.stop_node(len(cluster.nodes) - 1)
    lost_at = time.time()
    final = client.wait(job_id, timeout=300)
    assert final.state is JobState.FAILED
    assert "worker" in final.reason.lower() or "node" in final.reason.lower(), final.reason
    wait_for(lambda: not any(_running(pid) for pid in pids), 60, "the surviving worker to end")
    print(f"node lost to FAILED: {final.ended_at - lost_at:.1f} s, reason: {final.reason}")


def fake_orchestra_job(jobs, job_id: str, *, lines: int = 0, pause: float = 0.0) -> None:
    """A Ray job that looks like a finished orchestra job to a client: it
    prints `lines` epoch lines (`pause` s apart), then a final status line."""
    import shlex

    from orchestra.storage import status_lines
    from orchestra.storage.record import JobRecord

    record = JobRecord(job_id=job_id, name="fake", workers=2, spec={})
    record.start()
    record.epochs_completed = lines
    record.finish()
    script = f"import time\nfor i in range({lines}):\n    print(f'epoch {{i + 1}}/{lines}', flush=True)\n" \
             f"    time.sleep({pause})\nprint({status_lines.status_line(record)!r}, flush=True)\n"
    jobs.submit_job(entrypoint=shlex.join(["python", "-c", script]), submission_id=job_id,
                    metadata={"orchestra": "1", "name": "fake", "workers": "2"})


class CountingLogs:
    """Counts the job server's log downloads a client makes (the real calls, passed through)."""

    def __init__(self, client: Client):
        self.calls: list[str] = []
        jobs = client._jobs._jobs
        real = jobs.get_job_logs

        def get_job_logs(job_id):
            self.calls.append(job_id)
            return real(job_id)

        jobs.get_job_logs = get_job_logs


def test_remote_list_reads_each_finished_log_once_and_follow_streams_it(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    monkeypatch.setenv("ORCHESTRA_CACHE", str(tmp_path / "cache"))
    first = Client(cluster.address)
    ids = [f"fake-{i}" for i in range(4)]
    for job_id in ids:
        fake_orchestra_job(first._jobs._jobs, job_id)
    streamed = "fake-follow"
    fake_orchestra_job(first._jobs._jobs, streamed, lines=120, pause=0.02)
    chunks = list(first.follow(streamed))  # returns once the job has ended
    log = first.logs(streamed)
    assert "".join(chunks) == log and len(chunks) > 1  # streamed in pieces, each byte once
    assert sum(line.startswith("epoch ") for line in log.splitlines()) == 120

    wait_for(lambda: all(first._jobs._jobs.get_job_status(job_id).is_terminal() for job_id in ids), 120,
             "the fake jobs to end")
    counting = CountingLogs(first)
    listed = {status.job_id: status for status in first.list() if status.job_id.startswith("fake-")}
    assert set(listed) == {*ids, streamed} and all(s.state is JobState.SUCCEEDED for s in listed.values())
    assert sorted(c for c in counting.calls if c.startswith("fake-")) == sorted([*ids, streamed])  # once each
    again = Client(cluster.address)  # a new client, as a second `orchestra list` would be
    counting = CountingLogs(again)
    assert {s.job_id for s in again.list()} >= set(listed)
    assert [c for c in counting.calls if c.startswith("fake-")] == []  # finished jobs come from the cache
    assert again.status(ids[0]).state is JobState.SUCCEEDED and not any(c == ids[0] for c in counting.calls)
