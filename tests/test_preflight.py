"""Pre-flight: what would fail on the workers fails in `validate` and
`submit`, before any job folder, as one problem naming the spec field.

The trial step (one training and one evaluation step on two examples of the
data) catches the specs that build but cannot train; the resource checks
size a worker without allocating its model and refuse what the machines
cannot hold. Real Keras, real files; no Ray (the cluster's nodes are given
as `Node`s where a cluster is meant)."""

from __future__ import annotations

import json
import resource
import threading

import numpy as np
import pytest

from orchestra import cli
from orchestra.driver.resources import GB, Node, fit_problems, footprint
from orchestra.driver.trial import Sample, trial_step
from orchestra.errors import FieldError
from orchestra.spec import JobSpec, LayerSpec

CLASSES = 3


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """tiny.npz: 60 examples of 4x4 pixels in 3 classes; nan.npz: the same with a NaN pixel."""
    directory = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (60, 4, 4)).astype(np.uint8)
    y = np.arange(60) % CLASSES
    np.savez(directory / "tiny.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    poisoned = x.astype(np.float32)
    poisoned[:, 0, 0] = np.nan
    np.savez(directory / "nan.npz", x_train=poisoned, y_train=y)
    return directory


def spec_dict(**changes) -> dict:
    spec = {
        "name": "tiny",
        "data": {"source": "tiny", "rescale": "1/255", "validation_size": 10},
        "model": {"layers": [{"type": "Flatten"}, {"type": "Dense", "units": 8, "activation": "relu"},
                             {"type": "Dense", "units": CLASSES, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 1, "batch_size": 10},
        "scaling": {"workers": 2},
    }
    for path, value in changes.items():
        *parents, key = path.split(".")
        target = spec
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(key)] = value
        else:
            target[key] = value
    return spec


HOSTILE = {
    "reshape to a wrong size": (
        {"model.layers": [{"type": "Reshape", "target_shape": [3, 3]}, {"type": "Flatten"},
                          {"type": "Dense", "units": CLASSES, "activation": "softmax"}]},
        "model.layers.0", "total size"),
    "Embedding on float input": (
        {"model.layers": [{"type": "Embedding", "input_dim": 256, "output_dim": 2}, {"type": "Flatten"},
                          {"type": "Dense", "units": CLASSES, "activation": "softmax"}]},
        "model.layers.0", "whole-number"),
    "Embedding narrower than the data's values": (
        {"data.rescale": None,
         "model.layers": [{"type": "Embedding", "input_dim": 10, "output_dim": 2}, {"type": "Flatten"},
                          {"type": "Dense", "units": CLASSES, "activation": "softmax"}]},
        "model.layers.0", "input_dim 10"),
    "last layer narrower than the classes": (
        {"model.layers.2.units": CLASSES - 1}, "model.layers.2", f"one output per class, {CLASSES}"),
    "one unit with categorical cross-entropy": (
        {"data.labels": "one_hot", "compile.loss": "categorical_crossentropy", "model.layers.2.units": 1},
        "model.layers.2.units", "one output per class (at least 2)"),  # refused by the spec alone (orchestra/spec/)
    "binary cross-entropy with class indices": (
        {"compile.loss": "binary_crossentropy", "model.layers.2.units": 1,
         "model.layers.2.activation": "sigmoid"},
        "compile.loss", "between 0 and 1"),
    "labels of another shape than the outputs (the step itself fails)": (
        {"compile.loss": "mean_squared_error", "data.labels": "one_hot", "model.layers.2.units": 2},
        "model.layers.2", "outputs"),
    "NaN in the data": ({"data.source": "nan"}, "data", "are NaN or infinite"),
}


@pytest.mark.parametrize("verb", ["validate", "submit"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_specs_that_would_fail_on_the_workers_fail_here(tmp_path, capsys, datasets, case, verb):
    changes, field, words = HOSTILE[case]
    spec_path, storage = tmp_path / "spec.json", tmp_path / "storage"
    spec_path.write_text(json.dumps(spec_dict(**changes)))
    extra = ["--in-process"] if verb == "submit" else []
    assert cli.main([verb, str(spec_path), "--storage", str(storage), "--datasets", str(datasets), *extra]) == 2
    err = capsys.readouterr().err
    problems = [line.strip() for line in err.splitlines()[1:]]
    assert len(problems) == 1, err
    assert problems[0].startswith(f"{field}: ") and words.lower() in problems[0].lower(), err
    assert "Traceback" not in err
    assert not storage.exists() or not [p for p in storage.iterdir() if not p.name.startswith(".")]


def test_the_unchanged_spec_passes_and_its_trial_step_trains(tmp_path, capsys, datasets):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec_dict()))
    assert cli.main(["validate", str(spec_path), "--storage", str(tmp_path / "s"), "--datasets", str(datasets)]) == 0
    assert "valid" in capsys.readouterr().out


def test_schema_only_runs_the_trial_on_generated_examples(tmp_path, capsys):
    """Without the data, the examples are generated of the spec's shape:
    a last layer narrower than `num_classes` is still caught."""
    spec = spec_dict(**{"data.labels": "one_hot", "data.num_classes": 10, "compile.loss": "categorical_crossentropy",
                        "model.layers.2.units": 5})
    spec["model"]["input_shape"] = [4, 4]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    assert cli.main(["validate", "--schema-only", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.2.units: " in err and "10 classes" in err  # orchestra/spec/ refuses it from the spec alone


def _model(spec: JobSpec, shape):
    from orchestra.build.model import build_model

    return build_model(spec, shape)


def test_a_step_that_does_not_end_in_time_is_refused():
    """A stand-in for a model whose step never ends: the check returns at its limit."""
    spec = JobSpec.model_validate(spec_dict())
    release = threading.Event()

    class Stuck:
        layers, input_shape, output_shape = [], (None, 4, 4), (None, CLASSES)

        def train_on_batch(self, *args, **kwargs):
            release.wait(60)
            return {"loss": 1.0}

    try:
        with pytest.raises(FieldError, match="took more than 0.2 s") as raised:
            trial_step(spec, Stuck(), Sample.of_arrays(np.zeros((2, 4, 4), np.float32), np.array([0, 1])),
                       seconds=0.2)
        assert raised.value.field == "model"
    finally:
        release.set()


def test_the_trial_step_returns_the_evaluation_of_two_examples():
    spec = JobSpec.model_validate(spec_dict())
    model = _model(spec, (4, 4))
    logs = trial_step(spec, model, Sample.of_arrays(np.ones((5, 4, 4), np.float32), np.arange(5) % CLASSES))
    assert set(logs) == {"loss", "accuracy"} and np.isfinite(logs["loss"])
    assert model.optimizer.iterations.numpy() == 1  # one training step, no more


def test_a_huge_layer_is_sized_without_being_allocated():
    spec = JobSpec.model_validate(spec_dict())  # 3,000,000 units is past spec.MAX_UNITS: built as if it passed
    huge = LayerSpec.model_construct(type="Dense", units=3_000_000, activation="relu")
    spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"layers": [spec.model.layers[0], huge, *spec.model.layers[2:]]})})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    need = footprint(spec, (4, 4))
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    weights = 16 * 3_000_000 + 3_000_000 + 3_000_000 * CLASSES + CLASSES
    assert need.parameters == weights
    assert need.weights >= 4 * 3 * weights  # weights, gradients, Adam's two slots
    assert grown_kb * 1024 < need.weights / 10, "the weights were allocated"
    problems = fit_problems(spec, need, [Node("small", 8, int(need.total // 2), 0)], fixed=True)
    assert [field for field, _ in problems] == ["model.layers.1"]
    assert "largest node" in problems[0][1]


def test_workers_beyond_what_the_nodes_hold_are_refused():
    spec = JobSpec.model_validate(spec_dict(**{"scaling.workers": 200, "scaling.cpus_per_worker": 0.25,
                                               "fit.batch_size": 1000}))
    need = footprint(spec, (4, 4))
    nodes = [Node("a", 2, int(24 * GB), 0), Node("b", 2, int(24 * GB), 0)]
    problems = fit_problems(spec, need, nodes, fixed=False)
    assert [field for field, _ in problems] == ["scaling.workers"]
    assert "at most 16" in problems[0][1]  # 4 per CPU
    fewer = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"workers": 16})})
    assert fit_problems(fewer, need, nodes, fixed=False) == []


def test_cpus_beyond_an_embedded_ray_are_refused_but_a_cluster_may_wait_for_them():
    spec = JobSpec.model_validate(spec_dict(**{"scaling.cpus_per_worker": 2}))
    need = footprint(spec, (4, 4))
    nodes = [Node("this machine", 2, int(24 * GB), 0)]
    assert [field for field, _ in fit_problems(spec, need, nodes, fixed=True)] == ["scaling.workers"]
    assert fit_problems(spec, need, nodes, fixed=False) == []  # PENDING on a cluster, as before


def test_gpus_the_cluster_does_not_have_are_not_refused():
    """The job waits PENDING for them instead (tests/test_accelerators.py)."""
    spec = JobSpec.model_validate(spec_dict(**{"scaling.use_gpu": True}))
    need = footprint(spec, (4, 4))
    assert fit_problems(spec, need, [Node("cpu-only", 4, int(24 * GB), 0)], fixed=True) == []


def test_the_embedded_ray_refuses_auth_disabled(tmp_path, capsys, datasets, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec_dict()))
    assert cli.main(["submit", str(spec_path), "--storage", str(tmp_path / "s"), "--datasets", str(datasets)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestra: RAY_AUTH_MODE=disabled is refused") and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
