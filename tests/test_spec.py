"""The job spec: every job in jobs/ is valid, and bad input is rejected with
the field's path and what is allowed, before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, small_spec, write_spec

from orchestra.errors import SpecError
from orchestra.spec import (
    EarlyStoppingSpec,
    JobSpec,
    TensorBoardSpec,
    config_of,
    json_schema,
    load_spec,
    parse_spec,
)


def problems(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(spec))
    return dict(info.value.problems)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.json")), ids=lambda p: p.name)
def test_every_job_in_jobs_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.comment


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.json")), ids=lambda p: p.name)
def test_every_job_passes_preflight(tmp_path, mnist_dir, path):
    """Keras names, layer arguments, shapes: with MNIST standing in for
    datasets that are not on this machine (Fashion-MNIST has its shape), a
    generated CIFAR-shaped file for CIFAR-10; image folders and weights
    files are the cluster's, so those specs are checked without files."""
    from orchestra.driver.preflight import preflight
    from orchestra.tools.samples import write_cifar_like

    spec = load_spec(path)
    if spec.data.images is not None:
        prepared = preflight(spec, storage=str(tmp_path / "storage"), check_files=False)
        assert prepared.input_shape == spec.data.images.image_shape
        return
    stand_in = tmp_path / "datasets"
    stand_in.mkdir()
    if spec.data.shards is not None:  # made as the spec's comment says: `orchestra data convert mnist ...`
        from orchestra.tools.convert import convert

        convert(str(mnist_dir / "mnist.npz"), stand_in / spec.data.shards.path, spec.data.shards.format, 8)
    elif spec.data.source == "cifar10":
        write_cifar_like(stand_in / "cifar10.npz", train=100, test=20)
    else:
        (stand_in / f"{spec.data.source}.npz").symlink_to(mnist_dir / "mnist.npz")
    prepared = preflight(spec, storage=str(tmp_path / "storage"), datasets=str(stand_in))
    assert prepared.input_shape in {(784,), (28, 28), (3072,)}
    assert not (tmp_path / "storage").exists()  # a check makes no storage root


def test_mnist_overfit_is_seed_002():
    spec = load_spec(ROOT / "jobs" / "mnist_overfit.json")
    assert (spec.data.train_size, spec.data.validation_size) == (700, 300)
    assert [layer.type for layer in spec.model.layers] == ["Dense", "Dense"]
    assert spec.model.layers[0].arguments == {"units": 2, "activation": "relu"}
    assert spec.compile.optimizer == "sgd" and spec.compile.loss == "categorical_crossentropy"
    assert spec.data.labels == "one_hot"
    assert (spec.fit.batch_size, spec.fit.epochs) == (10, 3000)
    assert config_of(spec.callbacks, EarlyStoppingSpec).patience == 30
    assert spec.scaling.workers == 2


def test_defaults_and_fraction():
    spec = JobSpec.model_validate(small_spec(**{"data.rescale": "1/255"}))
    assert spec.data.rescale == pytest.approx(1 / 255)
    assert spec.scaling.workers == 2
    assert config_of(spec.callbacks, TensorBoardSpec).update_freq == "epoch"
    assert spec.logged_metrics == ["loss", "accuracy", "val_loss", "val_accuracy"]


def test_malformed_json():
    with pytest.raises(SpecError) as info:
        parse_spec('{"data": ')
    assert "malformed JSON" in str(info.value)


@pytest.mark.parametrize("overrides,path,expected", [
    ({"data.bogus": 1}, "data.bogus", "unknown field; allowed: source, rescale"),
    ({"fit.epochs": "many"}, "fit.epochs", "valid integer"),
    ({"callbacks.EarlyStopping.patience": -1}, "callbacks.0.config.patience", "greater than or equal to 0"),
    ({"callbacks.EarlyStopping.mode": "up"}, "callbacks.0.config.mode", "'auto', 'min' or 'max'"),
    ({"data.validation_size": None, "data.validation_split": 1.5}, "data.validation_split", "less than 1"),
    ({"data.validation_size": None, "data.validation_split": 0}, "data.validation_split", "greater than 0"),
    ({"data.rescale": "1/0"}, "data.rescale", "not a number"),
    ({"fit.batch_size": 21}, "fit.batch_size", "multiple of scaling.workers 2"),
    ({"data.labels": "sparse"}, "data.labels", "expects one-hot labels"),
    ({"callbacks.ModelCheckpoint.monitor": "val_acc"}, "callbacks.1.config.monitor",
     "allowed: loss, accuracy, val_loss, val_accuracy"),
    ({"scaling.workers": 0}, "scaling.workers", "greater than or equal to 1"),
    ({"name": "../escape"}, "name", "should match pattern"),
    ({"performance.steps_per_execution": 0}, "performance.steps_per_execution",
     "must be greater than or equal to 1 (got 0) — or must be 'auto'"),
    ({"compile.optimizer": {"type": "adam", "lr": {"x": 1}}}, "compile.optimizer.lr",
     "objects are not arguments here"),
    ({"compile.optimizer": {"type": "adam", "learning_rate": -1}}, "compile.optimizer.learning_rate",
     "greater than 0 (got -1)"),
    ({"performance.steps_per_execution": 5, "callbacks.TensorBoard": {"update_freq": "batch"}},
     "performance.steps_per_execution", "hides all but every 5th batch"),
    ({"model.layers": [{"units": 3}]}, "model.layers.0.type", "required"),
])
def test_bad_field_is_named_with_what_is_allowed(overrides, path, expected):
    found = problems(small_spec(**overrides))
    assert path in found, found
    assert expected in found[path]


def test_every_problem_is_reported_at_once():
    found = problems(small_spec(**{"fit.batch_size": 21, "data.labels": "sparse"}))
    assert {"fit.batch_size", "data.labels"} <= set(found)


def test_schema_comes_from_the_model():
    schema = json_schema()
    assert set(schema["properties"]) >= {"data", "model", "compile", "fit", "callbacks", "scaling",
                                         "data_loader", "storage"}
    assert schema["$defs"]["EarlyStoppingSpec"]["properties"]["mode"]["enum"] == ["auto", "min", "max"]
    assert schema["$defs"]["EarlyStoppingSpec"]["additionalProperties"] is False


def orchestra_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "orchestra.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("overrides,expected", [
    ({"model.layers": [{"type": "Dens", "units": 3}]}, "model.layers.0.type: unknown layer 'Dens'; did you mean 'Dense'?"),
    ({"compile.optimizer": "adamm"}, "compile.optimizer: unknown optimizer 'adamm'; did you mean 'adam'"),
    ({"compile.loss": "categorical_crossentropyy"}, "compile.loss: unknown loss"),
    ({"compile.metrics": ["acuracy"]}, "compile.metrics.0: unknown metric 'acuracy'; did you mean 'accuracy'"),
    ({"model.layers": [{"type": "Dense", "unit": 3}]}, "model.layers.0: Dense:"),
    ({"compile.optimizer": {"type": "adam", "momentum": 0.9}}, "compile.optimizer.momentum: Adam takes no argument"),
    ({"compile.optimizer": {"type": "adam", "lr": 1}}, "compile.optimizer.lr: Adam takes no argument 'lr'; did you "
                                                       "mean 'learning_rate'?"),
    ({"data.train_size": 10}, "fit.batch_size: 20 is larger than the 10 training examples"),
    ({"data.source": "nosuch"}, "data.source: 'nosuch' is neither an .npz path nor a dataset in"),
    ({"scaling.workers": 64}, "scaling.workers: 64 workers x 1 CPU need 64 CPUs"),
])
def test_cli_rejects_before_any_worker_starts(tmp_path, mnist_dir, overrides, expected):
    storage = tmp_path / "storage"
    spec = small_spec(**overrides)
    if "scaling.workers" in overrides:
        spec["fit"]["batch_size"] = 64
    result = orchestra_cli("submit", write_spec(tmp_path / "bad.json", spec), "--storage", storage,
                           "--datasets", mnist_dir)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not storage.exists() or not any(storage.iterdir()), "a job folder was left behind"


def test_missing_keras_dataset_names_the_folder(tmp_path):
    spec = small_spec(**{"data.source": "fashion_mnist"})
    env = {**__import__("os").environ, "KERAS_HOME": str(tmp_path / "keras")}
    result = orchestra_cli("validate", write_spec(tmp_path / "f.json", spec), "--datasets", tmp_path / "empty",
                           "--storage", tmp_path / "s", env=env)
    assert result.returncode == 2
    assert f"put fashion_mnist.npz in Keras's array layout into {tmp_path / 'empty'}" in result.stderr


def test_cli_rejects_unwritable_storage(tmp_path, mnist_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = orchestra_cli("submit", write_spec(tmp_path / "s.json", small_spec()), "--storage", blocker / "sub",
                           "--datasets", mnist_dir)
    assert result.returncode == 2
    assert f"storage: storage root {blocker / 'sub'} is not writable" in result.stderr


def test_validate_makes_no_storage_root_and_names_one_it_could_not_make(tmp_path, mnist_dir):
    spec = write_spec(tmp_path / "s.json", small_spec())
    result = orchestra_cli("validate", spec, "--storage", tmp_path / "new" / "storage", "--datasets", mnist_dir)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = orchestra_cli("validate", spec, "--storage", blocker / "storage", "--datasets", mnist_dir)
    assert result.returncode == 2
    assert f"storage: storage root {blocker / 'storage'} is not writable: Not a directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s.json"]


@pytest.mark.parametrize("link_to", ["nowhere", "itself", "file"])
def test_a_storage_root_under_a_link_no_folder_is_at_is_not_writable(tmp_path, link_to):
    """A dangling link, a loop of links or a link to a file in the root's
    path: the first job could not make the root, so the check says so (and
    leaves nothing behind), as it does for the root itself being such a link."""
    from orchestra.errors import StorageError
    from orchestra.storage.folders import Storage

    (tmp_path / "file").write_text("not a folder")
    link = tmp_path / "link"
    link.symlink_to({"nowhere": tmp_path / "nowhere", "itself": link, "file": tmp_path / "file"}[link_to])
    for root in (link / "storage", link / "a" / "storage", link):
        with pytest.raises(StorageError, match=f"storage root {root} is not writable: "):
            Storage(root).check_writable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]
    target = tmp_path / "folder"
    target.mkdir()
    link.unlink()
    link.symlink_to(target)
    Storage(link / "a" / "storage").check_writable()  # a link to a folder is a folder
    assert list(target.iterdir()) == []


def test_validate_json_lists_the_problems_on_stdout(tmp_path):
    result = orchestra_cli("validate", write_spec(tmp_path / "s.json", small_spec()), "--set", "fit.epocs=3",
                           "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["valid"] is False and document["spec"].endswith("s.json")
    assert document["problems"][0]["field"] == "--set fit.epocs"
    assert "did you mean 'epochs'" in document["problems"][0]["message"]
    assert "did you mean 'epochs'" in result.stderr


def test_cli_rejects_malformed_json_and_bad_worker_override(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    result = orchestra_cli("validate", bad)
    assert result.returncode == 2 and "malformed JSON" in result.stderr
    result = orchestra_cli("validate", write_spec(tmp_path / "ok.json", small_spec()), "--workers", "3")
    assert result.returncode == 2
    assert "fit.batch_size: 20 must be a multiple of scaling.workers 3" in result.stderr


def test_cli_schema_prints_json_schema():
    result = orchestra_cli("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["title"] == "JobSpec"


# Reading a spec file: regular files only, the size cap before reading, UTF-8.

def file_problem(path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (field, message), = info.value.problems
    assert field == "(file)"
    return message


def test_a_fifo_a_device_or_a_folder_is_not_read_as_a_spec(tmp_path):
    import os

    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)  # no writer: a blocking read would wait for ever
    assert "not a regular file" in file_problem(fifo)
    assert "not a regular file" in file_problem("/dev/zero")  # endless: read whole, it fills the memory
    assert "not a regular file" in file_problem(tmp_path)


def test_a_huge_spec_is_refused_without_being_read(tmp_path):
    from orchestra.spec import MAX_SPEC_BYTES

    huge = tmp_path / "huge.json"
    with open(huge, "wb") as file:
        file.truncate(50 * 2**30)  # 50 GiB, sparse: reading it whole would never end on this machine
    assert f"larger than {MAX_SPEC_BYTES} bytes" in file_problem(huge)


def test_a_spec_that_is_not_utf8_is_a_spec_error(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(small_spec(comment="café"), ensure_ascii=False).encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    assert "not UTF-8" in file_problem(latin)


@pytest.mark.parametrize("storage,expected", [
    ("relative/storage", "is relative"), ("/tmp/a\x00b", "NUL character"), ("~nosuchuser/x", "another user's home"),
    ("file://relative", "is relative"),
])
def test_storage_must_be_an_absolute_path(storage, expected):
    assert expected in problems(small_spec(storage=storage))["storage"]


@pytest.mark.parametrize("storage", ["/shared/orchestra", "~/orchestra_storage", "~", "file:///shared/x"])
def test_absolute_and_home_storage_are_valid(storage):
    assert JobSpec.model_validate(small_spec(storage=storage)).storage == storage


def test_a_relative_storage_override_means_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.model_validate(small_spec()).with_overrides(storage="here")
    assert spec.storage == str(tmp_path / "here")


def test_a_lone_surrogate_anywhere_is_refused_in_python_too():
    """JSON's `\\ud800` escape makes a string that no file can be written with."""
    assert "lone surrogate" in problems(small_spec(comment="ok \ud800"))["comment"]
    with pytest.raises(Exception, match="lone surrogate"):
        JobSpec.model_validate(small_spec(comment="\udfff"))


def test_output_width_against_the_data_classes():
    one_hot = JobSpec.model_validate(small_spec())  # one-hot labels, last Dense of 10 units
    last = "model.layers.1.units"
    assert one_hot.output_problems(10) == []
    assert one_hot.output_problems(12) == [(last, "10 outputs, but the labels have 12 classes: set units to 12")]
    sparse = JobSpec.model_validate(small_spec(**{"data.labels": "sparse",
                                                  "compile.loss": "sparse_categorical_crossentropy"}))
    assert sparse.output_problems(3) == []  # a subset may miss the top classes
    assert sparse.output_problems(12)[0][1].startswith("10 outputs, but the labels have up to 12 classes")
    binary = small_spec(**{"data.labels": "sparse", "compile.loss": "binary_crossentropy"})
    assert "needs 1: set units to 1" in problems(binary)[last]  # known from the spec alone
    binary["model"]["layers"][1].update(units=1, activation="sigmoid")
    assert [field for field, _ in JobSpec.model_validate(binary).output_problems(10)] == ["compile.loss"]
