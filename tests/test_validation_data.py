"""`data.validation`: a split of the training arrays drawn as scikit-learn's
`train_test_split` draws it, the source's test arrays (Keras's
`validation_data=(x_test, y_test)`), or another `.npz`; checked against the
training arrays before dispatch; one job validating on the test set."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import read_job, run_cli, small_spec
from sklearn.model_selection import train_test_split

from orchestra.build import data, node_cache
from orchestra.errors import SpecError
from orchestra.spec import DataSpec, JobSpec, parse_spec


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """Example i is the number i (so indices can be read back), labels i % 3."""
    path = tmp_path_factory.mktemp("data") / "numbers.npz"
    np.savez(path, x_train=np.arange(103, dtype=np.float32).reshape(103, 1, 1), y_train=np.arange(103) % 3,
             x_test=-np.arange(1, 12, dtype=np.float32).reshape(11, 1, 1), y_test=(np.arange(11) % 3).reshape(11, 1))
    return path


def prepare(path, **fields):
    spec = DataSpec(source=str(path), **fields)
    return data.prepare(spec, data.resolve_source(spec.source, path.parent), path.parent)


def numbers(x: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(len(x))]


# The split, as scikit-learn draws it.

@pytest.mark.parametrize("n, fields", [
    (100, {"validation_split": 0.2, "seed": 42}),
    (103, {"validation_split": 0.2, "seed": 42}),
    (101, {"validation_split": 0.33, "seed": 7}),
    (7, {"validation_split": 0.5, "seed": 0}),
    (60000, {"validation_split": 0.2, "seed": 42}),  # seed 000's split of Fashion-MNIST
    (1000, {"validation_split": 0.1, "seed": 2**32 - 1}),
    (1000, {"validation_size": 300, "seed": 3}),
    (60000, {"validation_size": 300, "train_size": 700, "seed": 5}),  # seed 002's draw
    (1000, {"validation_split": 0.25, "train_size": 500, "seed": 11}),
    (1000, {"train_size": 700, "seed": 3}),
])
def test_split_is_scikit_learns_train_test_split(n, fields):
    spec = DataSpec(source="mnist", **fields)
    train, validation = data.split_indices(n, spec)
    test_size = fields.get("validation_split", fields.get("validation_size"))
    expected_train, expected_validation = train_test_split(np.arange(n), test_size=test_size,
                                                           train_size=fields.get("train_size"),
                                                           random_state=fields["seed"])
    assert train.tolist() == expected_train.tolist()  # the same examples, in the same order
    assert validation.tolist() == expected_validation.tolist()


def test_split_matches_scikit_learn_on_tiny_sets_and_refuses_what_it_refuses():
    """Every small case: the same indices, or both refuse, except one:
    train_size of all n without validation is a shuffle, which
    scikit-learn refuses (its test set would be empty)."""
    for n in (1, 2, 3, 7, 10):
        for test_size in (None, 0.1, 0.5, 0.9, 1, 3, 9, 10):
            for train_size in (None, 1, 3, 9, 10, 11):
                if test_size is None and train_size in (None, n):
                    continue
                fields = {"validation_split" if isinstance(test_size, float) else "validation_size": test_size,
                          "train_size": train_size, "seed": n}
                try:
                    expected = train_test_split(np.arange(n), test_size=test_size, train_size=train_size,
                                                random_state=n)
                    expected = None if len(expected[0]) == 0 else expected
                except ValueError:
                    expected = None
                if expected is None:
                    with pytest.raises(data.FieldError):
                        data.split_indices(n, DataSpec(source="mnist", **fields))
                else:
                    got = data.split_indices(n, DataSpec(source="mnist", **fields))
                    assert [part.tolist() for part in got] == [part.tolist() for part in expected], (n, fields)


def test_prepared_arrays_are_train_test_splits_arrays(npz):
    arrays = prepare(npz, validation_split=0.2, seed=42)
    raw = np.load(npz)
    x_train, x_val, y_train, y_val = train_test_split(raw["x_train"], raw["y_train"], test_size=0.2, random_state=42)
    assert numbers(arrays.x_train) == numbers(x_train) and numbers(arrays.x_val) == numbers(x_val)
    assert arrays.y_train.tolist() == y_train.tolist() and arrays.y_val.tolist() == y_val.tolist()
    assert len(arrays.x_val) == 21  # ceil(0.2 * 103), as scikit-learn rounds


def test_without_a_draw_every_example_trains_in_order(npz):
    arrays = prepare(npz)
    assert numbers(arrays.x_train) == list(range(103)) and arrays.x_val is None


@pytest.mark.parametrize("fields, field", [
    ({"validation_size": 103}, "data.validation_size"),
    ({"validation_size": 50, "train_size": 60}, "data.validation_size"),
    ({"train_size": 104}, "data.train_size"),
])
def test_draws_larger_than_the_source_name_the_field(npz, fields, field):
    with pytest.raises(data.FieldError) as info:
        prepare(npz, **fields)
    assert info.value.field == field and "103" in str(info.value)


# Validating on the test arrays.

def test_validation_on_the_test_arrays_is_validation_data_x_test_y_test(npz):
    arrays = prepare(npz, validation="test", labels="one_hot")
    assert numbers(arrays.x_train) == list(range(103))  # nothing held out of training
    assert numbers(arrays.x_val) == list(range(-1, -12, -1))
    assert arrays.x_val is arrays.x_test and arrays.y_val is arrays.y_test  # one copy of the same examples
    assert arrays.y_val.shape == (11, 3)


def test_test_size_cuts_the_validation_set_too_and_test_false_keeps_it(npz):
    arrays = prepare(npz, validation="test", test_size=4, test=False)
    assert numbers(arrays.x_val) == [-1, -2, -3, -4] and arrays.y_val.tolist() == [0, 1, 2, 0]
    assert arrays.x_test is None


def test_a_source_without_test_arrays_cannot_validate_on_them(tmp_path):
    path = tmp_path / "train_only.npz"
    np.savez(path, x_train=np.zeros((10, 2)), y_train=np.zeros(10, np.int64))
    with pytest.raises(data.FieldError, match="has no x_test, y_test") as info:
        prepare(path, validation="test")
    assert info.value.field == "data.validation"


# Validating on another .npz.

@pytest.mark.parametrize("arrays, expected", [
    ({"x_val": [[[5.0]]], "y_val": [1], "x_test": [[[6.0]]], "y_test": [2], "x": [[[7.0]]], "y": [0]}, 5),
    ({"x_test": [[[6.0]]], "y_test": [2], "x": [[[7.0]]], "y": [0]}, 6),
    ({"x": [[[7.0]]], "y": [[0]]}, 7),
])
def test_a_validation_npz_is_read_by_its_first_pair(tmp_path, npz, arrays, expected):
    path = tmp_path / "val.npz"
    np.savez(path, **{k: np.array(v) for k, v in arrays.items()})
    prepared = prepare(npz, validation=str(path))
    assert numbers(prepared.x_val) == [expected] and len(prepared.x_train) == 103
    assert numbers(prepared.x_test) == list(range(-1, -12, -1))  # the end's test set stays the source's


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 1, 1)), "labels": np.zeros(2)}, "holds images, labels; a validation .npz holds one of"),
    ({"x_val": np.zeros((2, 2, 1)), "y_val": np.zeros(2, np.int64)}, r"shape \(2, 1\) but the training examples are \(1, 1\)"),
    ({"x_val": np.zeros((2, 1, 1)), "y_val": np.zeros(3, np.int64)}, "2 examples but 3 labels"),
    ({"x_val": np.zeros((2, 1, 1)), "y_val": np.array([0, 7])}, "labels from 0 to 7 but the training labels"),
    ({"x_val": np.zeros((2, 1, 1)), "y_val": np.array([0.5, 1.0])}, "float64 labels but the training labels are integer"),
    ({"x_val": np.zeros((2, 1, 1)), "y_val": np.zeros((2, 3))}, r"labels of shape \(3,\) but the training labels are \(\)"),
    ({"x_val": np.zeros((0, 1, 1)), "y_val": np.zeros(0, np.int64)}, "hold no examples"),
    ({"x_val": np.full((2, 1, 1), "a"), "y_val": np.zeros(2, np.int64)}, "hold <U1 examples; examples are numbers"),
    ({"x_val": np.zeros((2, 1, 1), np.complex64), "y_val": np.zeros(2, np.int64)}, "hold complex64 examples"),
    ({"x_val": np.array(1.0), "y_val": np.array(1)}, "are single numbers, not one example and label a row"),
    ({"x_val": np.zeros((2, 1, 1)), "y_val": np.full(2, 2**63, np.uint64)}, "labels from 9223372036854775808"),
])
def test_validation_arrays_that_do_not_fit_the_training_arrays_are_refused(tmp_path, npz, arrays, message):
    path = tmp_path / "val.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.FieldError, match=message) as info:
        prepare(npz, validation=str(path))
    assert info.value.field == "data.validation"


def test_a_validation_npz_that_is_missing_or_pickled_is_refused(tmp_path, npz):
    with pytest.raises(data.FieldError, match="nowhere.npz does not exist; give the path of an .npz file") as info:
        prepare(npz, validation=str(tmp_path / "nowhere.npz"))
    assert info.value.field == "data.validation"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_val=np.array([object()], dtype=object), y_val=np.zeros(1))
    with pytest.raises(data.FieldError, match="pickled objects, which orchestra never loads"):
        prepare(npz, validation=str(pickled))


def test_a_validation_path_that_is_no_regular_file_is_never_opened(tmp_path, npz):
    os.mkfifo(tmp_path / "fifo.npz")  # opening it would wait for a writer forever
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "device.npz").symlink_to("/dev/zero")
    for name in ("fifo.npz", "folder.npz", "device.npz"):
        with pytest.raises(data.FieldError, match="is not a regular file") as info:
            prepare(npz, validation=str(tmp_path / name))
        assert info.value.field == "data.validation"


def test_a_symlinked_validation_npz_is_read_through_and_handed_on_resolved(tmp_path, npz):
    np.savez(tmp_path / "real.npz", x_val=np.full((2, 1, 1), 9.0), y_val=np.zeros(2, np.int64))
    (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
    assert numbers(prepare(npz, validation=str(tmp_path / "link.npz")).x_val) == [9, 9]
    spec = DataSpec(source=str(npz), validation=str(tmp_path / "link.npz"))
    assert data.resolve_validation(spec) == tmp_path / "real.npz"


def test_an_npz_declaring_more_than_memory_is_refused_before_loading(tmp_path, npz, monkeypatch):
    """A compressed archive of zeros declares gigabytes in kilobytes: its
    headers are read, its arrays never are."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x_val=np.zeros((1000, 1, 1)), y_val=np.zeros(1000, np.int64))
    monkeypatch.setattr(data, "_memory_bytes", lambda: 10_000)
    loads, load = [], np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: loads.append(key) or load(self, key))
    with pytest.raises(data.FieldError, match=r"bomb.npz declares 0.0 GiB of arrays, more than this machine's") as info:
        prepare(npz, validation=str(path))
    assert info.value.field == "data.validation" and "x_val" not in loads and "x_train" in loads


def test_only_the_validation_pair_is_loaded(tmp_path, npz, monkeypatch):
    path = tmp_path / "val.npz"
    np.savez(path, x_val=np.zeros((2, 1, 1)), y_val=np.zeros(2, np.int64), x_train=np.zeros((50, 1, 1)))
    monkeypatch.setattr(data, "_declared_bytes", lambda archive, name: 10**15 if name == "x_train" else 0)
    assert numbers(data.read_validation(path)[0]) == [0, 0]  # x_train, which would not fit, is never looked at


def test_the_driver_hands_workers_the_absolute_path(tmp_path, npz, monkeypatch):
    np.savez(tmp_path / "val.npz", x_val=np.zeros((2, 1, 1)), y_val=np.zeros(2, np.int64))
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.model_validate(small_spec(**{"data.source": str(npz), "data.validation_size": None,
                                                "data.validation": "val.npz"}))
    resolved = data.with_validation_resolved(spec)
    assert resolved.data.validation == str(tmp_path / "val.npz") and spec.data.validation == "val.npz"
    assert data.with_validation_resolved(resolved) is resolved


def test_the_node_cache_key_covers_the_validation_choice_and_file(tmp_path, npz):
    val = tmp_path / "val.npz"
    np.savez(val, x_val=np.zeros((2, 1, 1)), y_val=np.zeros(2, np.int64))
    keys = {fields: node_cache.cache_key(DataSpec(source=str(npz), **dict(fields)), npz)
            for fields in [(), (("validation", "test"),), (("validation_split", 0.2),), (("validation", str(val)),)]}
    assert len(set(keys.values())) == 4
    before = keys[(("validation", str(val)),)]
    np.savez(val, x_val=np.ones((3, 1, 1)), y_val=np.zeros(3, np.int64))  # the file changed: its arrays did
    os.utime(val, ns=(1, 1))
    assert node_cache.cache_key(DataSpec(source=str(npz), validation=str(val)), npz) != before


def test_node_cache_arrays_validate_on_the_test_set(tmp_path, npz):
    spec = DataSpec(source=str(npz), validation="test")
    mapped = node_cache.node_arrays(spec, npz, npz.parent, root=tmp_path / "cache")  # read back from the files
    assert mapped.x_val is mapped.x_test and mapped.y_val is mapped.y_test  # one copy, one map
    assert numbers(mapped.x_val) == list(range(-1, -12, -1)) and mapped.y_val.tolist() == [0, 1, 2] * 3 + [0, 1]
    files = sorted(path.name for path in (tmp_path / "cache").glob("*/*"))
    assert files == ["validation-is-test", "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]


# The spec's rules.

def problems(data_fields: dict) -> dict[str, str]:
    spec = small_spec()
    spec["data"] = {"source": "mnist", **data_fields}
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(spec))
    return dict(info.value.problems)


@pytest.mark.parametrize("data_fields, field, message", [
    ({"validation": "tset"}, "data.validation", "'tset' is not 'split', 'test' or the path of an .npz file; "
                                                "did you mean 'test'?"),
    ({"validation": "val.csv"}, "data.validation", "not 'split', 'test' or the path of an .npz"),
    ({"validation": "test", "validation_split": 0.2}, "data.validation_split", "but validation is 'test'"),
    ({"validation": "v.npz", "validation_size": 10}, "data.validation_size", "but validation is 'v.npz'"),
    ({"validation": "split"}, "data.validation", "'split' needs validation_split"),
    ({"validation": "a\x00.npz"}, "data.validation", "NUL"),
])
def test_bad_validation_choices_are_named(data_fields, field, message):
    found = problems(data_fields)
    assert message in found[field], found


def test_image_folders_validate_on_a_split_or_a_folder(tmp_path):
    found = problems({"source": None, "images": {"train_dir": str(tmp_path)}, "validation": "test"})
    assert "an image folder validates on a split or on images.validation_dir" in found["data.validation"]


@pytest.mark.parametrize("data_fields, has_validation", [
    ({}, False), ({"validation": "test"}, True), ({"validation": "val.npz"}, True),
    ({"validation": "split", "validation_split": 0.2}, True), ({"validation_size": 5}, True),
])
def test_has_validation_and_the_default_monitor(data_fields, has_validation):
    spec = small_spec(callbacks=[])
    spec["data"] = {"source": "mnist", "labels": "one_hot", **data_fields}
    parsed = JobSpec.model_validate(spec)
    assert parsed.data.has_validation is has_validation
    assert parsed.default_monitor == ("val_loss" if has_validation else "loss")


def test_validate_refuses_a_validation_npz_that_does_not_fit(tmp_path, mnist_dir):
    """Through the CLI: exit 2, one line naming data.validation, no job made."""
    val = tmp_path / "val.npz"
    np.savez(val, x_val=np.zeros((5, 14, 14), np.uint8), y_val=np.zeros(5, np.int64))
    spec = small_spec(**{"data.validation_size": None, "data.validation": str(val)})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = run_cli("validate", tmp_path / "spec.json", "--storage", tmp_path / "storage", "--datasets", mnist_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    line = next(line for line in result.stderr.splitlines() if "data.validation" in line)
    assert "shape (14, 14) but the training examples are (28, 28)" in line
    assert "Traceback" not in result.stderr
    assert not [path for path in (tmp_path / "storage").glob("*") if path.is_dir()]  # no job folder


def test_validate_refuses_a_validation_path_set_on_the_command_line(tmp_path, mnist_dir, capsys):
    from orchestra.cli import main

    (tmp_path / "spec.json").write_text(json.dumps(small_spec(**{"data.validation_size": None})))
    code = main(["validate", str(tmp_path / "spec.json"), "--storage", str(tmp_path / "storage"), "--datasets",
                 str(mnist_dir), "--set", "data.validation=../../etc/passwd.npz"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2, lines
    assert lines[1].strip() == "data.validation: ../../etc/passwd.npz does not exist; give the path of an .npz file"
    assert not [path for path in (tmp_path / "storage").glob("*") if path.is_dir()]


# One job, validating on the test set.

@pytest.mark.integration
def test_a_two_worker_job_validates_on_the_test_arrays(tmp_path, mnist_dir):
    """seed 001's `validation_data=(x_test, y_test)`: every epoch's val_
    metrics are the model's on the test arrays, so the last epoch's equal
    Keras's own evaluate of the final model on them, and the end's test
    metrics. Written in YAML, its epochs set on the command line."""
    from orchestra import load_model

    spec = small_spec(**{"data.validation_size": None, "data.validation": "test", "callbacks": []})
    import yaml

    (tmp_path / "on_test.yaml").write_text(yaml.safe_dump(spec))
    result = run_cli("submit", tmp_path / "on_test.yaml", "--set", "fit.epochs=3", "--storage", tmp_path / "storage",
                     "--datasets", mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    record = read_job(tmp_path / "storage" / job_id)
    history = record["history"]
    assert len(history) == 3 and all("val_loss" in h and "val_accuracy" in h for h in history)

    parsed = JobSpec.model_validate(record["spec"])
    arrays = data.prepare(parsed.data, mnist_dir / "mnist.npz", mnist_dir)
    assert len(arrays.x_val) == 500 and len(arrays.x_train) == 400
    final = load_model(job_id, storage=str(tmp_path / "storage"))
    keras_says = final.evaluate(arrays.x_test, arrays.y_test, verbose=0, return_dict=True)
    assert history[-1]["val_loss"] == pytest.approx(keras_says["loss"], rel=1e-5)
    assert history[-1]["val_accuracy"] == pytest.approx(keras_says["accuracy"], abs=1e-6)
    assert record["test_metrics"]["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
