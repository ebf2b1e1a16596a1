"""`performance.mixed_precision`: Keras's mixed precision policies on the
workers, the last layer in float32, loss scaling for float16; and, for
real, a 2-worker bfloat16 job against the same job in float32 (this
machine's CPU computes bfloat16: AVX512_BF16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_spec

from orchestra import cli
from orchestra.build.model import build_model
from orchestra.driver.resources import footprint
from orchestra.errors import SpecError
from orchestra.keras_compat import keras
from orchestra.spec import JobSpec, parse_spec

POLICIES = [None, "mixed_float16", "mixed_bfloat16"]


def spec_dict(policy: str | None = None, layers: list[dict] | None = None, **data) -> dict:
    return {
        "name": "precision", "seed": 4,
        "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "sparse", "test": False,
                 "train_size": 400, "validation_size": 200, "seed": 2, **data},
        "model": {"layers": layers or [{"type": "Dense", "units": 32, "activation": "relu"},
                                       {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 2, "batch_size": 20},
        "scaling": {"workers": 2},
        "performance": {"mixed_precision": policy},
    }


@pytest.mark.parametrize("policy", POLICIES)
def test_layers_compute_in_the_policy_and_the_output_stays_float32(policy):
    model = build_model(JobSpec.model_validate(spec_dict(policy)), (784,))
    hidden, last = model.layers
    assert hidden.compute_dtype == {None: "float32", "mixed_float16": "float16",
                                    "mixed_bfloat16": "bfloat16"}[policy]
    assert (last.compute_dtype, model.output.dtype.name) == ("float32", "float32")
    assert {weight.dtype.name for weight in model.weights} == {"float32"}
    assert keras().mixed_precision.global_policy().name == "float32"  # put back after the build


@pytest.mark.parametrize("policy, scaled", [(None, False), ("mixed_float16", True), ("mixed_bfloat16", False)])
def test_float16_gets_keras_s_loss_scaling(policy, scaled):
    model = build_model(JobSpec.model_validate(spec_dict(policy)), (784,))
    assert isinstance(model.optimizer, keras().mixed_precision.LossScaleOptimizer) is scaled


def test_a_dtype_the_spec_gives_the_last_layer_is_kept():
    layers = [{"type": "Dense", "units": 32, "activation": "relu"},
              {"type": "Dense", "units": 10, "activation": "softmax", "dtype": "mixed_bfloat16"}]
    model = build_model(JobSpec.model_validate(spec_dict("mixed_bfloat16", layers)), (784,))
    assert model.layers[-1].compute_dtype == "bfloat16"


def test_bfloat16_trains_a_step_and_keeps_float32_loss():
    model = build_model(JobSpec.model_validate(spec_dict("mixed_bfloat16")), (784,))
    x = np.random.default_rng(0).random((40, 784), dtype=np.float32)
    history = model.fit(x, np.arange(40) % 10, epochs=2, batch_size=20, verbose=0).history
    assert all(np.isfinite(history["loss"]))
    assert model.predict(x[:2], verbose=0).dtype == np.float32


def test_activations_are_sized_at_two_bytes_under_a_mixed_policy():
    single = footprint(JobSpec.model_validate(spec_dict()), (784,))
    mixed = footprint(JobSpec.model_validate(spec_dict("mixed_bfloat16")), (784,))
    assert mixed.activations * 2 == single.activations and mixed.weights == single.weights


def test_an_unknown_policy_names_the_field():
    with pytest.raises(SpecError) as caught:
        parse_spec(json.dumps(spec_dict("bfloat16")))
    [(field, message)] = caught.value.problems
    assert field == "performance.mixed_precision" and "'mixed_bfloat16'" in message


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_pre_flight_builds_and_tries_the_model_under_the_policy(policy, tmp_path, capsys, mnist_dir):
    path = write_spec(tmp_path / "spec.json", spec_dict(policy))
    assert cli.main(["validate", str(path), "--storage", str(tmp_path / "s"), "--datasets", str(mnist_dir)]) == 0
    assert "valid" in capsys.readouterr().out
    assert keras().mixed_precision.global_policy().name == "float32"


# For real: the same 2-worker job in float32 and in bfloat16. 6,000 training
# examples, 4 epochs of 100 steps: both reach about 0.95 on 3,000 validation
# examples, where one example is 0.00033 of accuracy.
COMPARED = {"train_size": 6000, "validation_size": 3000}
COMPARED_LAYERS = [{"type": "Dense", "units": 128, "activation": "relu"},
                   {"type": "Dense", "units": 10, "activation": "softmax"}]


def _run(spec: dict, storage, mnist_dir):
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job

    prepared = preflight(JobSpec.model_validate(spec), storage=str(storage), datasets=str(mnist_dir))
    record = run_job(prepared, create_job(prepared))
    assert record.state.value == "SUCCEEDED", record.reason
    return record


@pytest.mark.integration
def test_a_bfloat16_job_reaches_the_float32_job_s_validation_accuracy(tmp_path, mnist_dir):
    runs = {}
    for policy in (None, "mixed_bfloat16"):
        spec = spec_dict(policy, COMPARED_LAYERS, **COMPARED)
        spec["fit"] = {"epochs": 4, "batch_size": 60}
        runs[policy] = _run(spec, tmp_path / "storage", mnist_dir)
    float32, bfloat16 = runs[None].history, runs["mixed_bfloat16"].history
    assert [h["epoch"] for h in float32] == [h["epoch"] for h in bfloat16] == [1, 2, 3, 4]
    assert float32[-1]["val_accuracy"] > 0.9  # both learnt: the comparison is not of two chance levels
    assert abs(bfloat16[-1]["val_accuracy"] - float32[-1]["val_accuracy"]) <= 0.01
    assert bfloat16[-1]["val_loss"] != float32[-1]["val_loss"]  # bfloat16 did run: its arithmetic differs

    from orchestra.client.inference import load_record_model

    model = load_record_model(runs["mixed_bfloat16"])  # the saved model, rebuilt under its policy
    assert model.layers[0].compute_dtype == "bfloat16"
    assert model.predict(np.zeros((2, 784), np.float32), verbose=0).dtype == np.float32
