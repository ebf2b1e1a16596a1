"""`Client()` with no address: jobs on this machine, each driven by a
background driver (`python -m orchestra.driver`) with its own embedded Ray."""

from __future__ import annotations

import ipaddress
import json
import time

import psutil
import pytest
from conftest import read_job, run_cli, small_spec, write_spec

from orchestra import Client, JobState, SpecError

pytestmark = pytest.mark.integration


def test_local_client_submits_follows_and_cancels(tmp_path, mnist_dir):
    storage = tmp_path / "storage"
    client = Client(storage=str(storage))
    spec = write_spec(tmp_path / "long.json", small_spec(**{"fit.epochs": 500, "callbacks.EarlyStopping": None}))
    job_id = client.submit(spec, datasets=str(mnist_dir))
    assert client.status(job_id).state in (JobState.PENDING, JobState.RUNNING)

    deadline = time.monotonic() + 240
    while client.status(job_id).epochs_completed < 2:
        assert time.monotonic() < deadline, client.logs(job_id)
        time.sleep(0.5)
    running = client.status(job_id)
    assert running.state is JobState.RUNNING
    assert_embedded_ray_listens_on_loopback(read_job(storage / job_id))
    history = client.metrics(job_id)
    assert len(history) >= 2 and [h["epoch"] for h in history[:2]] == [1, 2]
    assert "epoch 2/500" in client.logs(job_id)
    assert [s.job_id for s in client.list()] == [job_id]

    final = client.cancel(job_id)
    assert final.state is JobState.STOPPED and final.epochs_completed >= 2
    record = read_job(storage / job_id)
    assert record["state"] == "STOPPED"
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
              for pid in record["worker_pids"].values()):
        assert time.monotonic() < deadline, "workers outlived their cancelled job"
        time.sleep(0.5)

    wait = run_cli("wait", job_id, "--storage", storage, "--json")
    assert wait.returncode == 1 and json.loads(wait.stdout)["state"] == "STOPPED"


def assert_embedded_ray_listens_on_loopback(record: dict) -> None:
    """Every server of the job's processes (the driver, its embedded Ray's
    GCS, raylet, agents and workers) listens on loopback, except each
    training worker's TensorFlow collective server: TensorFlow binds it to
    every interface and has no setting for it (docs/cluster.md)."""
    driver = psutil.Process(record["driver_pid"])
    elsewhere: dict[str, list] = {}
    on_loopback = 0
    for process in [driver, *driver.children(recursive=True)]:
        try:
            listening = [c.laddr for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            name = " ".join(process.cmdline())[:60]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for address in listening:
            if ipaddress.ip_address(address.ip).is_loopback or address.ip.startswith("::ffff:127."):
                on_loopback += 1
            else:
                elsewhere.setdefault(f"{process.pid} {name}", []).append(address)
    training_workers = {str(pid) for pid in record["worker_pids"].values()}
    assert on_loopback >= 5  # GCS, raylet (2), agents, the driver's and each worker's gRPC server
    assert {key.split()[0] for key in elsewhere} == training_workers, elsewhere
    assert all(len(addresses) == 1 for addresses in elsewhere.values()), elsewhere


def test_local_client_refuses_a_bad_spec_before_starting_anything(tmp_path, mnist_dir):
    storage = tmp_path / "storage"
    bad = write_spec(tmp_path / "bad.json", small_spec(**{"compile.loss": "categorical_crossentropyy"}))
    with pytest.raises(SpecError, match="compile.loss"):
        Client(storage=str(storage)).submit(bad, datasets=str(mnist_dir))
    assert not storage.exists() or not any(storage.iterdir())
