"""The learning-rate and NaN callbacks on a real 2-worker job: what the
driver decides, every worker obeys in the same epoch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_job, run_cli, small_spec, write_spec

from orchestra.keras_compat import keras

pytestmark = pytest.mark.integration


def submit(tmp_path, mnist_dir, spec: dict) -> dict:
    result = run_cli("submit", write_spec(tmp_path / "job.json", spec), "--storage", tmp_path / "storage",
                     "--datasets", mnist_dir)
    job_id = result.stdout.split()[1].rstrip(":")
    return {"returncode": result.returncode, "output": result.stdout + result.stderr,
            "record": read_job(tmp_path / "storage" / job_id), "job_dir": tmp_path / "storage" / job_id}


def keras_rates(history: list[dict], initial: float, **config) -> list[float]:
    """The rate of each epoch that Keras's ReduceLROnPlateau would set, fed the job's own history."""
    k = keras()
    model = k.Sequential([k.Input(shape=(1,)), k.layers.Dense(1)])
    model.compile(optimizer=k.optimizers.SGD(learning_rate=initial), loss="mse")
    reducer = k.callbacks.ReduceLROnPlateau(**config)
    reducer.set_model(model)
    reducer.on_train_begin()
    rates = []
    for epoch, entry in enumerate(history):
        rates.append(float(k.backend.get_value(model.optimizer.learning_rate)))
        reducer.on_epoch_end(epoch, {key: value for key, value in entry.items() if key != "learning_rate"})
    return rates


def test_reduce_lr_on_plateau_lowers_the_rate_of_every_worker_mid_job(tmp_path, mnist_dir):
    """min_delta 10 in mode max: no epoch after the first improves, so with
    patience 1 the rate halves after epoch 2 and every epoch after. Each
    epoch's learning_rate in the history is the mean of both workers'
    reports: it equals the decided rate only if both set it."""
    config = {"monitor": "loss", "mode": "max", "min_delta": 10.0, "factor": 0.5, "patience": 1}
    job = submit(tmp_path, mnist_dir, small_spec(**{
        "data.train_size": 200, "data.validation_size": 40, "data.test": False, "fit.epochs": 4,
        "compile.optimizer": {"type": "sgd", "learning_rate": 0.1},
        "callbacks": [{"class_name": "ReduceLROnPlateau", "config": config}]}))
    assert job["returncode"] == 0, job["output"]
    history = job["record"]["history"]
    assert len(history) == 4
    rates = [entry["learning_rate"] for entry in history]
    assert rates == pytest.approx(keras_rates(history, 0.1, **config), rel=0, abs=0)
    assert rates == [np.float32(0.1), np.float32(0.1), np.float32(0.05), np.float32(0.025)]


def test_terminate_on_nan_fails_the_job_with_the_metric_and_the_epoch(tmp_path, mnist_dir):
    """A learning rate of 1e6 on a linear output with squared error diverges
    in the first epoch: the job ends FAILED after it, saving nothing of it."""
    job = submit(tmp_path, mnist_dir, small_spec(**{
        "data.train_size": 200, "data.validation_size": 40, "fit.epochs": 5,
        "model.layers": [{"type": "Dense", "units": 32, "activation": "relu"}, {"type": "Dense", "units": 10}],
        "compile": {"optimizer": {"type": "sgd", "learning_rate": 1e6}, "loss": "mean_squared_error"},
        "callbacks": [{"class_name": "TerminateOnNaN"},
                      {"class_name": "ModelCheckpoint", "config": {"monitor": "loss", "keep": 5}}]}))
    record = job["record"]
    assert job["returncode"] != 0, job["output"]
    assert record["state"] == "FAILED"
    last = record["history"][-1]
    assert not np.isfinite(last["loss"])
    assert all(np.isfinite(entry["loss"]) for entry in record["history"][:-1])
    assert record["reason"] == f"TerminateOnNaN: loss is {last['loss']} at epoch {last['epoch']}"
    assert last["epoch"] < 5
    saved = sorted(path.name for path in (job["job_dir"] / "checkpoints").glob("epoch-*"))
    assert f"epoch-{last['epoch']:04d}" not in saved  # nothing of the failed epoch is kept
    assert not (job["job_dir"] / "model").exists()     # and no final model
