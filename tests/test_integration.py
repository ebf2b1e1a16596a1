"""Real Ray, real TensorFlow: 2 workers under MultiWorkerMirroredStrategy on
an MNIST subset, driven by the CLI and by the Python API."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import run_cli, small_spec

from orchestra.build import data as data_lib
from orchestra.keras_compat import keras
from orchestra.spec import JobSpec

pytestmark = pytest.mark.integration


def keras_replay_early_stopping(history, **config):
    """Keras's own EarlyStopping fed the job's history: (stop epoch, best epoch), from 1."""
    k = keras()
    model = k.Sequential([k.Input(shape=(1,)), k.layers.Dense(1)])
    stopper = k.callbacks.EarlyStopping(**config)
    stopper.set_model(model)
    model.stop_training = False
    stopper.on_train_begin()
    for epoch, entry in enumerate(history):
        stopper.on_epoch_end(epoch, entry)
        if model.stop_training:
            break
    return stopper.stopped_epoch + 1, stopper.best_epoch + 1


def test_job_stops_early_like_keras(finished_job):
    status, record = finished_job["status"], finished_job["record"]
    assert status["state"] == "SUCCEEDED"
    assert "epoch 1/30  " in finished_job["stdout"]
    history = record["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    stop, best = keras_replay_early_stopping(history, monitor="val_loss", patience=2)
    assert status["stopped_epoch"] == stop == status["epochs_completed"] == len(history) < 30
    assert status["best_epoch"] == best
    assert status["monitor"] == "val_loss"
    assert status["best_value"] == pytest.approx(history[best - 1]["val_loss"])
    assert status["metrics"]["val_loss"] == history[-1]["val_loss"]
    assert all(h["samples_per_second"] > 0 and h["epoch_time"] > 0 for h in history)


def test_workers_train_as_one_job(finished_job):
    """Both workers reported every epoch and have exited: none was left in a collective."""
    pids = finished_job["record"]["worker_pids"]
    assert sorted(pids) == ["0", "1"]
    deadline = time.time() + 30
    while any(psutil.pid_exists(int(p)) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(psutil.pid_exists(int(p)) for p in pids.values())
    # 400 examples / global batch 20 = 20 steps: each worker took 10 examples a step.
    first = finished_job["record"]["history"][0]
    assert first["samples_per_second"] == pytest.approx(400 / first["epoch_time"], rel=1e-6)


def validation_arrays(record, mnist_dir):
    spec = JobSpec.model_validate(record["spec"])
    return data_lib.prepare(spec.data, mnist_dir / "mnist.npz", mnist_dir)


def test_best_checkpoint_is_the_argmin_of_val_loss_and_loads(finished_job):
    from orchestra import load_model

    record, storage = finished_job["record"], finished_job["storage"]
    history = record["history"]
    argmin = int(np.argmin([h["val_loss"] for h in history])) + 1
    assert record["best_checkpoint"].endswith(f"epoch-{argmin:04d}")
    kept = sorted(p.name for p in (storage / finished_job["job_id"] / "checkpoints").iterdir())
    assert f"epoch-{argmin:04d}" in kept and len(kept) <= 2 + 1
    assert not [p for p in kept if p.startswith(".staging")]

    arrays = validation_arrays(record, finished_job["mnist_dir"])
    best = load_model(finished_job["job_id"], storage=str(storage), checkpoint="best")
    val = best.evaluate(arrays.x_val, arrays.y_val, verbose=0, return_dict=True)
    assert val["loss"] == pytest.approx(history[argmin - 1]["val_loss"], rel=1e-5)
    assert val["accuracy"] == pytest.approx(history[argmin - 1]["val_accuracy"], abs=1e-6)

    final = load_model(finished_job["job_id"], storage=str(storage))
    # restore_best_weights: training ended with the best epoch's weights, the best checkpoint's.
    for ours, best_weights in zip(final.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, best_weights)
    test = final.evaluate(arrays.x_test, arrays.y_test, verbose=0, return_dict=True)
    assert len(arrays.x_test) == 500
    assert test["loss"] == pytest.approx(record["test_metrics"]["loss"], rel=1e-5)
    assert test["accuracy"] == pytest.approx(record["test_metrics"]["accuracy"], abs=1e-6)


def test_worker_error_fails_the_job_with_its_reason(tmp_path, mnist_dir):
    """A worker that raises ends the job FAILED with the worker's error, and
    the driver does not hang."""
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job

    doomed = tmp_path / "doomed.npz"
    doomed.write_bytes((mnist_dir / "mnist.npz").read_bytes())
    spec = JobSpec.model_validate(small_spec(**{"data.source": str(doomed)}))
    prepared = preflight(spec, storage=str(tmp_path / "storage"), datasets=str(mnist_dir))
    record = create_job(prepared)
    doomed.unlink()  # after the checks, before the workers read it
    final = run_job(prepared, record)
    assert final.state.value == "FAILED"
    assert "No such file or directory" in final.reason and "doomed.npz" in final.reason
    assert prepared.storage.read_record(record.job_id).state.value == "FAILED"


def test_list_shows_the_job(finished_job):
    result = run_cli("list", "--storage", finished_job["storage"], "--json")
    listed = json.loads(result.stdout)
    assert [s["job_id"] for s in listed] == [finished_job["job_id"]]
    assert listed[0] == finished_job["status"]


def test_killed_worker_is_replaced_and_training_resumes(tmp_path, mnist_dir):
    """max_failures=1: kill -9 one worker mid-run; Ray Train restarts the group,
    training resumes from the latest checkpoint, and early stopping carries on
    with its best value and wait count as if nothing happened."""
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job

    spec = JobSpec.model_validate(small_spec(**{
        "data.train_size": 2000,
        "callbacks.EarlyStopping": {"monitor": "loss", "mode": "max", "patience": 4,
                                     "restore_best_weights": True},
        "callbacks.ModelCheckpoint": {"monitor": "loss", "mode": "max", "keep": 1, "save_weights_only": True},
        "scaling.max_failures": 1,
    }))
    prepared = preflight(spec, storage=str(tmp_path / "storage"), datasets=str(mnist_dir))
    record = create_job(prepared)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(record=run_job(prepared, record)))
    runner.start()
    storage = prepared.storage
    deadline = time.time() + 300
    while storage.read_record(record.job_id).epochs_completed < 2:
        assert time.time() < deadline and runner.is_alive()
        time.sleep(0.1)
    victim = storage.read_record(record.job_id).worker_pids["1"]
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=600)
    final = outcome["record"]
    assert final.state.value == "SUCCEEDED", final.reason
    assert final.restarts == 1
    assert final.worker_pids["1"] != victim
    # Epoch 1 has the highest training loss: with patience 4 a run that never
    # failed stops at epoch 5. A reset early-stopping state would stop later.
    assert [h["epoch"] for h in final.history] == [1, 2, 3, 4, 5]
    assert (final.stopped_epoch, final.best_epoch) == (5, 1)
    stop, best = keras_replay_early_stopping(final.history, monitor="loss", mode="max", patience=4)
    assert (stop, best) == (5, 1)
    from orchestra import load_model

    assert final.checkpoints[-1].path.endswith("epoch-0005")
    assert final.best_checkpoint.endswith("epoch-0001")
    latest = load_model(record.job_id, storage=str(storage.root), checkpoint="latest")  # weights only
    best = load_model(record.job_id, storage=str(storage.root), checkpoint="best")
    ended_with = load_model(record.job_id, storage=str(storage.root))
    # The best-weights snapshot survived the restart: the job ended with epoch 1's weights.
    for ours, epoch_one in zip(ended_with.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, epoch_one)
    assert not np.array_equal(latest.get_weights()[0], best.get_weights()[0])
