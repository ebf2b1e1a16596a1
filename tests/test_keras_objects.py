"""Keras objects with arguments in a spec, in Keras's serialized form
(issue 19): every form a spec may use, every refusal (hostile ones too),
before dispatch and naming the field; what orchestra builds equals what
Keras builds from the same config; a learning-rate schedule counts global
steps, on 1 and 2 workers and across a checkpoint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_job, run_cli, tensorboard_steps, write_spec

from orchestra import cli
from orchestra.errors import FieldError, SpecError
from orchestra.spec import JobSpec, parse_spec

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.001, "beta_1": 0.9, "clipnorm": 1.0}}
COSINE = {"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.05, "decay_steps": 60, "alpha": 0.1}}


def tiny_spec(**compile_section) -> dict:
    spec = {
        "name": "tiny",
        "data": {"source": "tiny", "rescale": "1/255", "flatten": True, "validation_size": 10},
        "model": {"layers": [{"type": "Dense", "units": 4, "activation": "relu"},
                             {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 2, "batch_size": 10},
        "scaling": {"workers": 2},
    }
    spec["compile"].update(compile_section)
    return spec


def with_layer_argument(spec: dict, key: str, value) -> dict:
    spec = copy.deepcopy(spec)
    spec["model"]["layers"][0][key] = value
    return spec


def spec_problems(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(spec))
    return dict(info.value.problems)


def keras_problems(spec: dict) -> dict[str, str]:
    from orchestra.build.model import check_keras_names

    return dict(check_keras_names(JobSpec.model_validate(spec)))


# --- the forms a spec may use ---------------------------------------------------------------------------------

def test_the_short_form_and_kerass_config_form_are_one_optimizer():
    short = JobSpec.model_validate(tiny_spec(optimizer={"type": "Adam", **ADAM["config"]}))
    config = JobSpec.model_validate(tiny_spec(optimizer=ADAM))
    assert short.compile.optimizer_object == config.compile.optimizer_object
    assert config.compile.optimizer_spec.type == "Adam" and config.compile.optimizer_spec.learning_rate == 0.001
    named = JobSpec.model_validate(tiny_spec(optimizer="sgd"))
    assert named.compile.optimizer_object.class_name == "sgd" and named.compile.optimizer_object.config == {}


def test_a_schedule_in_either_optimizer_form_is_the_same_object():
    short = JobSpec.model_validate(tiny_spec(optimizer={"type": "SGD", "learning_rate": COSINE}))
    config = JobSpec.model_validate(tiny_spec(optimizer={"class_name": "SGD", "config": {"learning_rate": COSINE}}))
    assert short.compile.optimizer_object == config.compile.optimizer_object
    assert config.compile.optimizer_spec.learning_rate.class_name == "CosineDecay"
    for spec in (short, config):  # what a record (and a prepared driver) stores reads back the same
        assert JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_metrics_take_a_single_string_as_keras_does():
    spec = JobSpec.model_validate(tiny_spec(metrics="accuracy"))
    assert spec.compile.metrics == ["accuracy"]
    assert spec.logged_metrics == ["loss", "accuracy", "val_loss", "val_accuracy"]


@pytest.mark.parametrize("metric,logged", [
    ({"class_name": "AUC", "config": {"name": "auc_50", "num_thresholds": 50}}, "auc_50"),
    ({"class_name": "AUC", "config": {"num_thresholds": 50}}, "auc"),
    ({"class_name": "TopKCategoricalAccuracy", "config": {"k": 2}}, "top_k_categorical_accuracy"),
    ({"class_name": "FBetaScore", "config": {"average": "macro"}}, "fbeta_score"),
    ("FBetaScore", "fbeta_score"),
    ("KLDivergence", "kullback_leibler_divergence"),
    ("acc", "acc"),
])
def test_logged_names_follow_keras(metric, logged):
    raw = tiny_spec(metrics=[metric], loss="categorical_crossentropy")
    raw["data"]["labels"] = "one_hot"
    spec = JobSpec.model_validate(raw)
    assert spec.compile.metric_names == [logged]
    assert f"val_{logged}" in spec.logged_metrics


def test_every_default_metric_name_is_kerass_own():
    """`metric_default_name` (spec layer, no TensorFlow) against the name
    Keras gives each metric class of keras.metrics that can be built."""
    from orchestra.build.model import constructor_arguments, keras_classes
    from orchestra.spec.training import metric_default_name

    needs = {"num_classes": 3, "target_class_ids": [0], "recall": 0.5, "precision": 0.5, "specificity": 0.5,
             "sensitivity": 0.5, "normalizer": [1.0]}
    checked = 0
    for name, cls in keras_classes("metric").items():
        _, required = constructor_arguments(cls)
        metric = cls(**{argument: needs[argument] for argument in required})
        assert metric_default_name(name) == metric.name, name
        checked += 1
    assert checked > 40


def test_a_metric_with_arguments_is_monitored_by_its_logged_name():
    spec = tiny_spec(metrics=[{"class_name": "AUC", "config": {"name": "auc_50", "num_thresholds": 50}}])
    spec["callbacks"] = [{"class_name": "EarlyStopping", "config": {"monitor": "val_auc_50", "mode": "max"}}]
    assert JobSpec.model_validate(spec).logged_metrics == ["loss", "auc_50", "val_loss", "val_auc_50"]
    spec["callbacks"][0]["config"]["monitor"] = "val_auc"
    assert "allowed: loss, auc_50, val_loss, val_auc_50" in spec_problems(spec)["callbacks.0.config.monitor"]


def test_label_kind_rules_read_class_names():
    smoothing = {"class_name": "CategoricalCrossentropy", "config": {"label_smoothing": 0.1}}
    found = spec_problems(tiny_spec(loss=smoothing))  # tiny's labels are sparse
    assert "expects one-hot labels" in found["data.labels"]
    sparse_metric = {"class_name": "SparseTopKCategoricalAccuracy", "config": {"k": 2}}
    one_hot = tiny_spec(loss=smoothing, metrics=[sparse_metric])
    one_hot["data"]["labels"] = "one_hot"
    assert "reads integer labels" in spec_problems(one_hot)["compile.metrics.0"]
    binary = tiny_spec(loss={"class_name": "BinaryCrossentropy", "config": {"from_logits": True}})
    assert "needs 1: set units to 1" in spec_problems(binary)["model.layers.1.units"]
    binary["model"]["layers"][1]["units"] = 1
    assert JobSpec.model_validate(binary).output_problems(3)[0][0] == "compile.loss"


def test_layer_initializers_regularizers_and_constraints_take_keras_objects():
    spec = tiny_spec()
    spec = with_layer_argument(spec, "kernel_initializer", {"class_name": "GlorotUniform", "config": {"seed": 3}})
    spec = with_layer_argument(spec, "kernel_regularizer", {"class_name": "L1L2", "config": {"l2": 1e-4}})
    spec = with_layer_argument(spec, "kernel_constraint", {"class_name": "MaxNorm", "config": {"max_value": 2}})
    assert keras_problems(spec) == {}


# --- refusals: structure (the spec alone, no TensorFlow) ------------------------------------------------------

@pytest.mark.parametrize("spec,field,expected", [
    (tiny_spec(optimizer={**ADAM, "module": "keras.optimizers"}), "compile.optimizer", "'module' is not allowed"),
    (tiny_spec(optimizer={**ADAM, "registered_name": "Custom>Adam"}), "compile.optimizer",
     "'registered_name' is not allowed"),
    (tiny_spec(optimizer={"class_name": "os.system", "config": {}}), "compile.optimizer.class_name", "pattern"),
    (tiny_spec(loss={"class_name": "subprocess.Popen", "config": {"args": "sh"}}), "compile.loss.class_name",
     "pattern"),
    (tiny_spec(optimizer={"class_name": "Adam", "config": {"beta_1": {"class_name": "Constant", "config": {}}}}),
     "compile.optimizer.config.beta_1", "only an optimizer's learning_rate may be a schedule"),
    (tiny_spec(optimizer={"class_name": "Adam", "config": {"learning_rate": {"class_name": "Adam"}}}),
     "compile.optimizer.config.learning_rate.class_name", "not a learning-rate schedule"),
    (tiny_spec(optimizer={"type": "adam", "learning_rate": {**COSINE, "module": "os"}}),
     "compile.optimizer.learning_rate", "'module' is not allowed"),
    (tiny_spec(optimizer={"type": "adam", "learning_rate": {"class_name": "CosineDecay", "config": {
        "initial_learning_rate": {"class_name": "Constant", "config": {}}, "decay_steps": 5}}}),
     "compile.optimizer.learning_rate.config.initial_learning_rate", "schedule arguments are plain values"),
    (tiny_spec(metrics=[{"class_name": "AUC", "config": {"thresholds": {"class_name": "Lambda"}}}]),
     "compile.metrics.0.config.thresholds", "metric arguments are plain values"),
    (tiny_spec(loss={"class_name": "Huber", "config": {"delta": float("nan")}}), "compile.loss.config.delta",
     "finite"),
    (tiny_spec(loss={"type": "Huber", "delta": 1.0}), "compile.loss", "the short form {\"type\": ...} is "
                                                                     "compile.optimizer's only"),
    (tiny_spec(optimizer={"class_name": "SGD", "config": {"learning_rate": 0}}),
     "compile.optimizer.config.learning_rate", "must be greater than 0, or a schedule"),
    (tiny_spec(optimizer={"class_name": "Adam", "config": {"__class__": 1, "a b": 2}}),
     "compile.optimizer.config.a b", "not a Keras argument name"),
    (with_layer_argument(tiny_spec(), "kernel_initializer",
                         {"class_name": "GlorotUniform", "module": "os", "config": {}}),
     "model.layers.0.kernel_initializer", "'module' is not allowed"),
    (with_layer_argument(tiny_spec(), "activation", {"class_name": "Lambda", "config": {"function": "x"}}),
     "model.layers.0.activation", "only *_initializer, *_regularizer and *_constraint take an object"),
    (with_layer_argument(tiny_spec(), "kernel_regularizer", {"class_name": "L2", "config": {"l2": [[[[1]]]]}}),
     "model.layers.0.kernel_regularizer.config.l2", "nested 3 deep"),
])
def test_structural_refusals_name_the_field(spec, field, expected):
    found = spec_problems(spec)
    assert field in found, found
    assert expected in found[field]


# --- refusals: against Keras (before dispatch) ----------------------------------------------------------------

@pytest.mark.parametrize("spec,field,expected", [
    (tiny_spec(optimizer={"class_name": "Adam", "config": {"beta1": 0.9}}), "compile.optimizer.config.beta1",
     "Adam takes no argument 'beta1'; did you mean 'beta_1'? (it takes: learning_rate, beta_1,"),
    (tiny_spec(optimizer={"type": "adam", "lr": 0.1}), "compile.optimizer.lr", "did you mean 'learning_rate'?"),
    (tiny_spec(optimizer={"class_name": "CategoricalCrossentropy", "config": {}}), "compile.optimizer.class_name",
     "is a class of keras.losses, not of keras.optimizers"),
    (tiny_spec(optimizer={"class_name": "Optimizer", "config": {}}), "compile.optimizer.class_name",
     "unknown optimizer class 'Optimizer'"),
    (tiny_spec(loss={"class_name": "Lambda", "config": {}}), "compile.loss.class_name", "unknown loss class"),
    (tiny_spec(loss={"class_name": "Loss", "config": {}}), "compile.loss.class_name", "unknown loss class"),
    (tiny_spec(loss={"class_name": "sparse_categorical_crossentropy", "config": {}}), "compile.loss.class_name",
     "is a function: give it as a name"),
    (tiny_spec(metrics=[{"class_name": "MeanMetricWrapper", "config": {"fn": "mae"}}]),
     "compile.metrics.0.class_name", "unknown metric class"),
    (tiny_spec(metrics=[{"class_name": "MeanIoU", "config": {}}]), "compile.metrics.0.config",
     "MeanIoU needs num_classes"),
    (tiny_spec(metrics=[{"class_name": "Mean", "config": {}}]), "compile.metrics.0.class_name",
     "reduces a tensor of values"),
    (tiny_spec(optimizer={"type": "sgd", "learning_rate": {"class_name": "CosineDecay", "config": {
        "initial_learning_rate": 0.1, "decay_step": 10}}}), "compile.optimizer.learning_rate.config.decay_step",
     "did you mean 'decay_steps'?"),
    (tiny_spec(optimizer={"type": "sgd", "learning_rate": {"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.1}}}), "compile.optimizer.learning_rate.config",
     "ExponentialDecay needs decay_steps, decay_rate"),
    (with_layer_argument(tiny_spec(), "kernel_initializer", {"class_name": "GlorotUniform", "config": {"sed": 1}}),
     "model.layers.0.kernel_initializer.config.sed", "did you mean 'seed'?"),
    (with_layer_argument(tiny_spec(), "kernel_regularizer", {"class_name": "Dense", "config": {}}),
     "model.layers.0.kernel_regularizer.class_name", "unknown regularizer class 'Dense'"),
])
def test_keras_refusals_name_the_field(spec, field, expected):
    found = keras_problems(spec)
    assert field in found, found
    assert expected in found[field]


# Metrics whose result is not one number: the rule is their result's shape on two examples (pre-flight).
@pytest.mark.parametrize("metric,refused", [
    ("F1Score", True),  # average=None by default: one value a class (it passed validate and failed on workers)
    ("FBetaScore", True),
    ({"class_name": "F1Score", "config": {"average": "macro"}}, False),
    ({"class_name": "FBetaScore", "config": {"average": "weighted", "beta": 2.0}}, False),
    ({"class_name": "Precision", "config": {"thresholds": [0.3, 0.6]}}, True),
    ({"class_name": "Recall", "config": {"thresholds": [0.3, 0.6], "name": "r"}}, True),
    ({"class_name": "Precision", "config": {"thresholds": 0.6}}, False),
    ({"class_name": "AUC", "config": {"multi_label": True, "num_labels": 3}}, False),
    ({"class_name": "OneHotMeanIoU", "config": {"num_classes": 3}}, False),
    ({"class_name": "OneHotIoU", "config": {"num_classes": 3, "target_class_ids": [0, 2]}}, False),
])
def test_a_metric_is_one_number_or_refused_with_the_reason(metric, refused):
    spec = tiny_spec(loss="categorical_crossentropy", metrics=[metric])
    spec["data"]["labels"] = "one_hot"
    found = keras_problems(spec)
    if refused:
        assert "not one number" in found.get("compile.metrics.0", ""), found
    else:
        assert found == {}


def test_the_trial_step_refuses_a_vector_result_the_shape_check_missed():
    """The trial step's own check, for a metric whose shape comes from the data."""
    from orchestra.driver.trial import check_scalar_metrics

    spec = JobSpec.model_validate(tiny_spec(metrics=["accuracy", {"class_name": "AUC", "config": {"name": "a"}}]))
    check_scalar_metrics(spec, {"loss": 1.0, "accuracy": 0.5, "a": np.float32(0.5)})
    with pytest.raises(FieldError, match="not one number") as info:
        check_scalar_metrics(spec, {"loss": 1.0, "accuracy": 0.5, "a": np.array([0.5, 0.2])})
    assert info.value.field == "compile.metrics.1"


# --- through the CLI: exit 2, one line naming the field, nothing left behind ----------------------------------

@pytest.mark.parametrize("spec,line", [
    (tiny_spec(optimizer={"class_name": "Adam", "config": {"beta1": 0.9}}),
     "  compile.optimizer.config.beta1: Adam takes no argument 'beta1'; did you mean 'beta_1'?"),
    (tiny_spec(optimizer={**ADAM, "module": "os"}), "  compile.optimizer: 'module' is not allowed"),
    (tiny_spec(loss={"class_name": "subprocess.Popen", "config": {}}), "  compile.loss.class_name: "),
    (tiny_spec(optimizer={"class_name": "SparseCategoricalCrossentropy", "config": {}}),
     "  compile.optimizer.class_name: unknown optimizer class"),
    (tiny_spec(metrics="F1Score"), "  compile.metrics.0: F1Score's result is 1-dimensional"),
    (tiny_spec(metrics=[{"class_name": "Lambda", "config": {"function": "os.system"}}]),
     "  compile.metrics.0.class_name: unknown metric class 'Lambda'"),
    # MeanIoU reads class indices; on one-hot labels it failed on the workers: the trial step names it.
    (dict(tiny_spec(loss="categorical_crossentropy", metrics=[
        "accuracy", {"class_name": "MeanIoU", "config": {"num_classes": 3, "sparse_y_pred": False}}]),
        data={**tiny_spec()["data"], "labels": "one_hot"}),
     "  compile.metrics.1: fails on 2 examples of the data's labels and the model's outputs"),
])
def test_validate_refuses_in_one_line_naming_the_field(tmp_path, tiny_datasets, capsys, spec, line):
    path = write_spec(tmp_path / "spec.json", spec)
    storage = tmp_path / "storage"
    code = cli.main(["validate", str(path), "--storage", str(storage), "--datasets", str(tiny_datasets)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{path}: invalid job spec", err
    assert any(found.startswith(line) for found in lines[1:]), err
    assert not storage.exists() or not any(storage.iterdir())


def test_the_orchestra_command_refuses_and_accepts(tmp_path, tiny_datasets):
    """`orchestra validate` as a user runs it, once refusing, once accepting every form at once."""
    bad = write_spec(tmp_path / "bad.json", tiny_spec(optimizer={"type": "adam", "beta1": 0.9}))
    result = subprocess.run([sys.executable, "-m", "orchestra.cli", "validate", str(bad), "--storage",
                             str(tmp_path / "s"), "--datasets", str(tiny_datasets)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "  compile.optimizer.beta1: Adam takes no argument 'beta1'; did you mean 'beta_1'?" in result.stderr
    good = tiny_spec(
        optimizer={"class_name": "Adam", "config": {**ADAM["config"], "learning_rate": COSINE}},
        loss={"class_name": "CategoricalCrossentropy", "config": {"label_smoothing": 0.1}},
        metrics=["accuracy", {"class_name": "TopKCategoricalAccuracy", "config": {"k": 2, "name": "top2"}},
                 {"class_name": "F1Score", "config": {"average": "macro"}}])
    good["data"]["labels"] = "one_hot"
    good = with_layer_argument(good, "kernel_regularizer", {"class_name": "L2", "config": {"l2": 1e-4}})
    result = run_cli("validate", write_spec(tmp_path / "good.json", good), "--storage", tmp_path / "s",
                     "--datasets", tiny_datasets, timeout=300)
    assert result.returncode == 0, result.stderr


# --- what orchestra builds is what Keras builds from the same config ------------------------------------------

@pytest.mark.parametrize("slot,config", [
    ("optimizer", {"class_name": "Adam", "config": {**ADAM["config"], "learning_rate": COSINE}}),
    ("optimizer", {"class_name": "SGD", "config": {"learning_rate": {
        "class_name": "PiecewiseConstantDecay", "config": {"boundaries": [10, 20], "values": [0.1, 0.01, 0.001]}},
        "momentum": 0.9, "nesterov": True}}),
    ("optimizer", {"class_name": "AdamW", "config": {"weight_decay": 0.01, "global_clipnorm": 2.0}}),
    ("loss", {"class_name": "CategoricalCrossentropy", "config": {"label_smoothing": 0.1, "from_logits": True}}),
    ("loss", {"class_name": "Huber", "config": {"delta": 0.5}}),
    ("metric", {"class_name": "AUC", "config": {"num_thresholds": 50, "curve": "PR", "name": "pr"}}),
    ("metric", {"class_name": "MeanIoU", "config": {"num_classes": 3, "sparse_y_pred": False, "name": "iou"}}),
    ("initializer", {"class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_out", "seed": 1}}),
    ("regularizer", {"class_name": "L1L2", "config": {"l1": 1e-5, "l2": 1e-4}}),
    ("constraint", {"class_name": "MinMaxNorm", "config": {"min_value": 0.1, "max_value": 2.0}}),
])
def test_built_objects_equal_kerass_own(slot, config):
    from orchestra.build.model import make_object
    from orchestra.keras_compat import keras
    from orchestra.spec import KerasObjectSpec

    k = keras()
    module = {"optimizer": k.optimizers, "loss": k.losses, "metric": k.metrics, "initializer": k.initializers,
              "regularizer": k.regularizers, "constraint": k.constraints}[slot]
    ours = make_object(KerasObjectSpec.model_validate(config), slot)
    config = copy.deepcopy(config)
    if slot == "optimizer":
        # tf-keras deserializes a config without this key (one a user writes) to its legacy optimizers;
        # orchestra trains with the current ones, which Keras's own get_config marks so.
        config["config"]["is_legacy_optimizer"] = False
    theirs = module.deserialize(config)
    assert type(ours) is type(theirs)
    assert ours.get_config() == theirs.get_config()


def test_the_compiled_model_holds_kerass_objects():
    from orchestra.build.model import build_model
    from orchestra.keras_compat import keras

    k = keras()
    spec = tiny_spec(optimizer={"type": "adam", "beta_1": 0.8, "learning_rate": COSINE},
                     loss={"class_name": "CategoricalCrossentropy", "config": {"label_smoothing": 0.1}},
                     metrics=["accuracy", {"class_name": "TopKCategoricalAccuracy", "config": {"k": 2}}])
    spec["data"]["labels"] = "one_hot"
    model = build_model(JobSpec.model_validate(spec), (16,))
    expected = k.optimizers.Adam(beta_1=0.8, learning_rate=k.optimizers.schedules.CosineDecay(**COSINE["config"]))
    assert model.optimizer.get_config() == expected.get_config()
    assert model.loss.get_config() == k.losses.CategoricalCrossentropy(label_smoothing=0.1).get_config()
    x, y = np.zeros((4, 16), np.float32), np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert set(logs) == {"loss", "accuracy", "top_k_categorical_accuracy"}


def test_kerass_own_get_config_is_a_spec_config():
    """What `optimizer.get_config()` prints can be pasted into a spec."""
    from orchestra.build.model import check_keras_names, make_object
    from orchestra.keras_compat import keras
    from orchestra.spec import KerasObjectSpec

    config = json.loads(json.dumps(keras().optimizers.Adam(beta_1=0.8, clipnorm=1.0).get_config(), default=float))
    spec = JobSpec.model_validate(tiny_spec(optimizer={"class_name": "Adam", "config": config}))
    assert check_keras_names(spec) == []
    built = make_object(KerasObjectSpec(class_name="Adam", config=config), "optimizer")
    assert built.get_config() == config
    legacy = tiny_spec(optimizer={"class_name": "Adam", "config": {**config, "is_legacy_optimizer": True}})
    assert "current optimizers" in keras_problems(legacy)["compile.optimizer.config.is_legacy_optimizer"]


def test_metric_objects_are_logged_under_the_same_name_in_every_build():
    """Keras numbers a second unnamed metric of a class in a process
    (`auc_1`); orchestra names each as the spec logs it, so a second build
    (pre-flight after its shape check, a retried worker) logs the same keys."""
    from orchestra.build.model import build_model

    raw = tiny_spec(loss="categorical_crossentropy",
                    metrics=[{"class_name": "OneHotMeanIoU", "config": {"num_classes": 3}}, "AUC"])
    raw["data"]["labels"] = "one_hot"
    spec = JobSpec.model_validate(raw)
    x, y = np.zeros((4, 16), np.float32), np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    for _ in range(2):
        logs = build_model(spec, (16,)).train_on_batch(x, y, return_dict=True)
        assert sorted(logs) == sorted(["loss", *spec.compile.metric_names]) == ["auc", "loss", "one_hot_mean_io_u"]


def test_a_schedule_continues_from_the_iterations_a_checkpoint_restores(tmp_path):
    """A checkpoint of a scheduled optimizer is written (its rate is not
    settable) and, loaded as a resume loads it, carries `iterations`: the
    rate after it is the schedule's at the global step that follows."""
    from orchestra.build.model import build_model
    from orchestra.keras_compat import keras
    from orchestra.storage.folders import model_file
    from orchestra.worker.saving import CheckpointWriter

    spec = JobSpec.model_validate(tiny_spec(optimizer={"type": "sgd", "learning_rate": COSINE}))
    x, y = np.random.default_rng(0).random((40, 16), np.float32), np.arange(40) % 3
    model = build_model(spec, (16,))
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)  # 4 steps
    writer = CheckpointWriter(0, lambda ref: None)
    writer.save(model, tmp_path / "epoch-1", False, {"epoch": 1}, None, "ref")
    writer.close()

    restored = build_model(spec, (16,))
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(str(model_file(tmp_path / "epoch-1")))
    assert int(restored.optimizer.iterations.numpy()) == 4
    restored.fit(x, y, batch_size=10, epochs=1, verbose=0)  # steps 5 to 8
    schedule = keras().optimizers.schedules.CosineDecay(**COSINE["config"])
    assert int(restored.optimizer.iterations.numpy()) == 8
    # Keras computes the rate of a step before counting it: the last step (the 8th) used schedule(7).
    assert float(restored.optimizer.learning_rate.numpy()) == pytest.approx(float(schedule(7)), rel=1e-6)


# --- end to end: 2 workers, the schedule counts global steps ----------------------------------------------------

def _mnist_job(workers: int, epochs: int = 3, schedule: dict = COSINE) -> dict:
    return {
        "name": f"keras-objects-{workers}",
        "seed": 1,
        "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "one_hot",
                 "train_size": 400, "validation_size": 100, "seed": 7},
        "model": {"layers": [{"type": "Dense", "units": 16, "activation": "relu",
                              "kernel_regularizer": {"class_name": "L2", "config": {"l2": 1e-4}}},
                             {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {
            "optimizer": {"class_name": "Adam", "config": {"beta_1": 0.8, "clipnorm": 1.0, "learning_rate": schedule}},
            "loss": {"class_name": "CategoricalCrossentropy", "config": {"label_smoothing": 0.1}},
            "metrics": ["accuracy", {"class_name": "TopKCategoricalAccuracy", "config": {"k": 3, "name": "top3"}},
                       {"class_name": "F1Score", "config": {"average": "macro"}}],
        },
        "fit": {"epochs": epochs, "batch_size": 20},
        # The metric with arguments is monitored by a callback and charted, under its own name.
        "callbacks": [{"class_name": "EarlyStopping", "config": {"monitor": "val_top3", "mode": "max",
                                                                  "patience": 10}},
                      {"class_name": "TensorBoard", "config": {}},
                      # A checkpoint of a scheduled optimizer (its rate is not settable; iterations carry it).
                      {"class_name": "ModelCheckpoint", "config": {"monitor": "val_top3", "keep": 1}}],
        "performance": {"steps_per_execution": 4},
        "scaling": {"workers": workers},
    }


@pytest.mark.integration
def test_a_schedule_counts_global_steps_on_one_and_two_workers(tmp_path, mnist_dir):
    """400 examples in global batches of 20: 20 global steps an epoch on 1
    or 2 workers; the rate logged at each epoch's end is the schedule's at
    that epoch's last global step, the same on both."""
    from orchestra.keras_compat import keras

    schedule = keras().optimizers.schedules.CosineDecay(**COSINE["config"])
    rates = {}
    for workers in (1, 2):
        storage = tmp_path / f"storage-{workers}"
        spec = write_spec(tmp_path / f"job-{workers}.json", _mnist_job(workers))
        result = run_cli("submit", spec, "--storage", storage, "--datasets", mnist_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        job_id = result.stdout.split()[1].rstrip(":")
        record = read_job(Path(storage) / job_id)
        assert record["state"] == "SUCCEEDED", record.get("error")
        history = record["history"]
        assert [entry["epoch"] for entry in history] == [1, 2, 3]
        assert record["checkpoints"], "no checkpoint was written"
        for entry in history:
            assert {"top3", "val_top3", "f1_score", "val_f1_score", "accuracy"} <= set(entry), entry
        board = Path(storage) / job_id / "tensorboard"
        assert tensorboard_steps(board / "train", "epoch_top3") == [1, 2, 3]
        assert tensorboard_steps(board / "validation", "epoch_f1_score") == [1, 2, 3]
        rates[workers] = [entry["learning_rate"] for entry in history]
        expected = [float(schedule(20 * epoch - 1)) for epoch in (1, 2, 3)]
        assert rates[workers] == pytest.approx(expected, rel=1e-5), (workers, rates[workers], expected)
    assert rates[1] == pytest.approx(rates[2], rel=1e-6)


@pytest.mark.integration
def test_after_a_resume_the_schedule_continues_from_the_restored_step(tmp_path, mnist_dir):
    """Stopped by Ctrl-C after epoch 2 and resumed from its checkpoint, a
    2-worker job's rate at each epoch end is still the schedule's at that
    epoch's last global step: the checkpoint carried `iterations`."""
    import signal
    import time

    from orchestra.keras_compat import keras

    decay = {"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.05, "decay_steps": 120}}
    spec = write_spec(tmp_path / "job.json", _mnist_job(2, epochs=6, schedule=decay))
    storage, log = tmp_path / "storage", tmp_path / "driver.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "orchestra.cli", "submit", str(spec), "--storage",
                                    str(storage), "--datasets", str(mnist_dir)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(json.loads(path.read_text())["epochs_completed"] >= 2 for path in storage.glob("*/job.json")):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 1, log.read_text()
    job_id = next(storage.glob("*/job.json")).parent.name
    stopped = read_job(storage / job_id)
    assert stopped["state"] == "STOPPED" and stopped["epochs_completed"] < 6, stopped.get("reason")

    resumed = run_cli("resume", job_id, "--storage", storage, "--datasets", mnist_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = read_job(storage / job_id)
    assert record["state"] == "SUCCEEDED" and record["resumes"] == 1
    schedule = keras().optimizers.schedules.CosineDecay(**decay["config"])
    rates = [entry["learning_rate"] for entry in record["history"]]
    assert [entry["epoch"] for entry in record["history"]] == [1, 2, 3, 4, 5, 6]
    assert rates == pytest.approx([float(schedule(20 * epoch - 1)) for epoch in range(1, 7)], rel=1e-5), rates
