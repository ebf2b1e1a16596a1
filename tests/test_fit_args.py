"""fit's arguments under MultiWorkerMirroredStrategy on 2 real workers:
class_weight weighs the loss as Keras documents, steps_per_epoch sets the
epoch's length, validation_freq and validation_steps decide when and on
what validation runs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_job, run_cli, small_spec, write_spec

from orchestra.build import data as data_lib
from orchestra.build.model import build_model
from orchestra.keras_compat import keras
from orchestra.spec import JobSpec

pytestmark = pytest.mark.integration

CLASS_WEIGHT = {"0": 5.0, "1": 0.0, "7": 2.5}


@pytest.fixture(scope="module")
def fit_args_job(tmp_path_factory, mnist_dir):
    """A job whose weights barely move (learning rate 1e-9), so each logged
    loss can be recomputed from the initial model."""
    root = tmp_path_factory.mktemp("fit_args")
    spec = small_spec(**{
        "data.train_size": 100, "data.validation_size": 40, "data.test": False,
        "compile.optimizer": {"type": "sgd", "learning_rate": 1e-9},
        "fit": {"epochs": 4, "batch_size": 20, "steps_per_epoch": 3, "validation_freq": 2,
                "validation_steps": 1, "validation_batch_size": 8, "class_weight": CLASS_WEIGHT},
        "callbacks": [],
    })
    result = run_cli("submit", write_spec(root / "fit.json", spec), "--storage", root / "storage",
                     "--datasets", mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    record = read_job(root / "storage" / job_id)
    return JobSpec.model_validate(spec), record, mnist_dir


def per_example_loss(model, x, y):
    return keras().losses.categorical_crossentropy(y, model(x, training=False)).numpy()


def test_class_weight_scales_each_examples_loss(fit_args_job):
    spec, record, mnist_dir = fit_args_job
    arrays = data_lib.prepare(spec.data, mnist_dir / "mnist.npz", mnist_dir)
    pipeline = data_lib.training_dataset(
        arrays.x_train, arrays.y_train, global_batch=20, rank=0, world_size=1, shuffle=True, seed=spec.seed,
        initial_epoch=0, class_weight=spec.fit.class_weight, parallel_calls=1, prefetch=0)
    x, y, weight = (np.concatenate(parts) for parts in zip(*[[t.numpy() for t in b] for b in pipeline.take(3)]))
    np.testing.assert_array_equal(weight, [{0: 5.0, 1: 0.0, 7: 2.5}.get(int(c), 1.0) for c in y.argmax(-1)])
    losses = per_example_loss(build_model(spec, arrays.input_shape), x, y)
    # Keras: the loss of a batch is sum(class_weight[y] * loss) / batch size.
    weighted, plain = float(np.mean(weight * losses)), float(np.mean(losses))
    assert abs(weighted - plain) > 0.05
    assert record["history"][0]["loss"] == pytest.approx(weighted, rel=1e-4)


def test_steps_and_validation_arguments_are_honoured(fit_args_job):
    spec, record, mnist_dir = fit_args_job
    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert ["val_loss" in h for h in history] == [False, True, False, True]  # validation_freq 2
    # validation_steps 1 with a global validation batch of 8: each worker's first 4 validation examples.
    arrays = data_lib.prepare(spec.data, mnist_dir / "mnist.npz", mnist_dir)
    shares = np.linspace(0, 40, 3).astype(int)
    first = np.concatenate([np.arange(start, start + 4) for start in shares[:2]])
    losses = per_example_loss(build_model(spec, arrays.input_shape), arrays.x_val[first], arrays.y_val[first])
    assert history[1]["val_loss"] == pytest.approx(float(losses.mean()), rel=1e-4)
    whole = per_example_loss(build_model(spec, arrays.input_shape), arrays.x_val, arrays.y_val).mean()
    assert abs(float(whole) - history[1]["val_loss"]) > 1e-3
    # steps_per_epoch 3 of 20: 60 examples an epoch, not the 100 a full pass would take.
    for entry in history:
        assert entry["samples_per_second"] * entry["epoch_time"] == pytest.approx(60)


def test_validation_steps_without_validation_is_refused(tmp_path, mnist_dir):
    spec = small_spec(**{"data.validation_size": None, "fit.validation_steps": 2, "callbacks": []})
    del spec["data"]["validation_size"]
    result = run_cli("validate", write_spec(tmp_path / "bad.json", spec), "--storage", tmp_path / "s",
                     "--datasets", mnist_dir)
    assert result.returncode == 2
    assert "fit.validation_steps: is set but the job has no validation data" in result.stderr
