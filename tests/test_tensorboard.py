"""TensorBoard over HTTP, served by `orchestra tensorboard`; `orchestra plot`;
the TensorBoard page rendered in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import free_port, get_json, run_cli, small_spec

from orchestra.spec import JobSpec

pytestmark = pytest.mark.integration


@contextmanager
def board(storage, *jobs, extra=()):
    """`orchestra tensorboard` on a free loopback port, stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestra.cli", "tensorboard", *jobs, "--storage", str(storage),
         "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert f"at http://127.0.0.1:{port}/" in line, line + process.stderr.read()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def scalars(base, run, tag):
    return get_json(f"{base}/data/plugin/scalars/scalars?run={run}&tag={tag}")


def test_every_epoch_is_served_with_the_recorded_value(finished_job):
    job, history = finished_job["job_id"], finished_job["record"]["history"]
    with board(finished_job["storage"], job) as base:
        runs = get_json(f"{base}/data/runs")
        assert {f"{job}/train", f"{job}/validation"} <= set(runs)
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_time_seconds",
                "epoch_samples_per_second"} <= set(tags[f"{job}/train"])
        assert {"epoch_loss", "epoch_accuracy"} <= set(tags[f"{job}/validation"])
        for run, tag, key in [("train", "epoch_loss", "loss"), ("train", "epoch_accuracy", "accuracy"),
                              ("validation", "epoch_loss", "val_loss"),
                              ("validation", "epoch_accuracy", "val_accuracy")]:
            series = scalars(base, f"{job}/{run}", tag)
            assert [step for _, step, _ in series] == [h["epoch"] for h in history]
            assert [value for _, _, value in series] == pytest.approx([h[key] for h in history], rel=1e-6)

        histograms = get_json(f"{base}/data/plugin/histograms/tags")[f"{job}/train"]
        kernel = next(tag for tag in histograms if "kernel" in tag)
        steps = [s for _, s, _ in get_json(f"{base}/data/plugin/histograms/histograms?run={job}/train&tag={kernel}")]
        assert steps == [e for e in range(1, len(history) + 1) if e % 2 == 0]  # histogram_freq 2

        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {info["name"]: info for info in experiment["hparamInfos"]}
        assert {"optimizer", "learning_rate", "batch_size", "layers", "workers"} <= set(hparams)
        assert hparams["layers"]["domainDiscrete"] == ["Dense(32) > Dense(10)"]
        text_tags = get_json(f"{base}/data/plugin/text/tags")
        assert sorted(text_tags[f"{job}/."]) == ["model", "summary"]
        summary = get_json(f"{base}/data/plugin/text/text?run={job}/.&tag=summary")[0]["text"].replace("\n", "")
        status = finished_job["status"]
        assert f"<td>stopped epoch</td><td>{status['stopped_epoch']}</td>" in summary
        assert f"<td>test accuracy</td><td>{status['test_metrics']['accuracy']}</td>" in summary


def test_series_grow_while_the_job_runs(tmp_path, mnist_dir):
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_in_process

    # Slow enough to watch: 1,000 steps an epoch, one step per call.
    spec = JobSpec.model_validate(small_spec(**{"data.train_size": 20000, "fit.epochs": 8,
                                                "callbacks.EarlyStopping": None,
                                                "performance.steps_per_execution": 1}))
    prepared = preflight(spec, storage=str(tmp_path), datasets=str(mnist_dir), check_cluster=False)
    record = create_job(prepared, in_process=True)
    with board(tmp_path, record.job_id, extra=("--reload-interval", "1")) as base:
        runner = threading.Thread(target=run_in_process, args=(prepared, record))
        runner.start()
        seen = []
        while runner.is_alive():
            try:
                seen.append(len(scalars(base, f"{record.job_id}/validation", "epoch_loss")))
            except urllib.error.HTTPError:  # the run has no events yet
                pass
            time.sleep(0.5)
        runner.join()
    growing = sorted(set(n for n in seen if 0 < n < 8))
    assert len(growing) >= 3, seen  # several sizes seen before the job ended


def test_port_in_use_is_a_clear_error(tmp_path, finished_job):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("tensorboard", "--storage", finished_job["storage"], "--host", "0.0.0.0",
                         "--port", port, timeout=120)
    assert result.returncode == 2
    assert "warning: TensorBoard has no authentication" in result.stderr
    message = f"port {port} on 0.0.0.0 is in use; try --port "
    assert message in result.stderr and "Traceback" not in result.stderr
    suggested = int(result.stderr.split(message)[1].split()[0])
    assert suggested != port
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", suggested))  # the suggestion is free


def test_unknown_job_is_a_clear_error(finished_job):
    result = run_cli("tensorboard", "nosuch-job", "--storage", finished_job["storage"], timeout=120)
    assert result.returncode == 2
    assert f"no job 'nosuch-job' in {finished_job['storage']}" in result.stderr


def test_plot_draws_the_seeds_figure(tmp_path, finished_job):
    import matplotlib.image

    one, two = tmp_path / "one.png", tmp_path / "two.png"
    job = finished_job["job_id"]
    assert run_cli("plot", job, "--storage", finished_job["storage"], "-o", one).returncode == 0
    assert run_cli("plot", job, job, "--storage", finished_job["storage"], "-o", two).returncode == 0
    image = matplotlib.image.imread(one)
    assert image.shape[:2] == (450, 700)
    assert matplotlib.image.imread(two).shape[:2] == (450, 1400)
    pixels = image[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50      # curves, text and markers, not a blank canvas
    assert (pixels < 0.9).any(axis=1).mean() > 0.02


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_tensorboard_page_shows_the_job_in_chromium(tmp_path, finished_job):
    job = finished_job["job_id"]
    with board(finished_job["storage"], job) as base:
        get_json(f"{base}/data/runs")
        result = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
             f"{base}/"],
            capture_output=True, text=True, timeout=180,
        )
    assert f"{job}/train" in result.stdout, result.stderr[-2000:]
    assert f"{job}/validation" in result.stdout


def test_batch_level_tensorboard_has_every_step(tmp_path, mnist_dir):
    """update_freq="batch" needs every step's loss: one execution per step."""
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_in_process

    spec = JobSpec.model_validate(small_spec(**{"fit.epochs": 3, "callbacks.EarlyStopping": None,
                                                "callbacks.TensorBoard": {"update_freq": "batch"}}))
    prepared = preflight(spec, storage=str(tmp_path), datasets=str(mnist_dir), check_cluster=False)
    record = run_in_process(prepared, create_job(prepared, in_process=True))
    assert record.state.value == "SUCCEEDED", record.reason
    with board(tmp_path, record.job_id) as base:
        series = scalars(base, f"{record.job_id}/train", "batch_loss")
    steps = 400 // 20
    assert [step for _, step, _ in series] == list(range(1, 3 * steps + 1))
    # Keras's batch logs are the running mean of the epoch: the last one is the epoch's loss.
    assert series[steps - 1][2] == pytest.approx(record.history[0]["loss"], rel=1e-6)


def test_watch_serves_jobs_that_appear_after_it_started(tmp_path, finished_job):
    storage = tmp_path / "storage"
    with board(storage, extra=("--watch", "--reload-interval", "1")) as base:
        assert get_json(f"{base}/data/runs") == []
        job = finished_job["job_id"]
        shutil.copytree(finished_job["storage"] / job, storage / job)
        deadline = time.time() + 60
        while f"{job}/tensorboard/validation" not in get_json(f"{base}/data/runs"):
            assert time.time() < deadline, get_json(f"{base}/data/runs")
            time.sleep(1)
        points = scalars(base, f"{job}/tensorboard/validation", "epoch_loss")
        assert [p[2] for p in points] == pytest.approx(
            [h["val_loss"] for h in finished_job["record"]["history"]], rel=1e-6)
