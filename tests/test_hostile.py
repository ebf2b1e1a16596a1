"""Hostile input: job ids that try to leave the storage root, specs that try
to make orchestra import or run code, read files or ask for more than a
machine holds (issue 18, items 5-8: every such spec of the issue is in
HOSTILE_SPECS), spec files that are not files, and a property-based fuzz
of malformed specs through `orchestra validate`: every one is refused with
exit 2, one line naming the field, no traceback, no file read that the
spec names, and nothing left in storage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orchestra import cli
from orchestra.spec import JobSpec
from orchestra.tools.board import DEFAULT_HOST

HOSTILE_IDS = ["../outside", "/etc/passwd", "a/../../b", "..", ".hidden", "job\nid", "job\n", "jöb", "a b",
               "x" * 200, "~root", "job;rm -rf /"]


def valid_spec() -> dict:
    return {
        "name": "tiny",
        "data": {"source": "tiny", "rescale": "1/255", "flatten": True, "validation_size": 10},
        "model": {"layers": [{"type": "Dense", "units": 4, "activation": "relu"},
                             {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01},
                    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 2, "batch_size": 10},
        "scaling": {"workers": 2},
    }


def validate(tmp_path, text: str, datasets) -> tuple[Path, Path, list[str]]:
    """The spec file, its storage root and the `orchestra validate` arguments for `text`."""
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    storage = tmp_path / "storage"
    return spec, storage, ["validate", str(spec), "--storage", str(storage), "--datasets", str(datasets)]


@pytest.mark.parametrize("job_id", HOSTILE_IDS)
@pytest.mark.parametrize("verb", ["status", "resume", "cancel", "logs"])
def test_job_ids_cannot_leave_the_storage_root(tmp_path, capsys, verb, job_id):
    storage = tmp_path / "storage"
    assert cli.main([verb, job_id, "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestra: invalid job id") and "letters, digits" in err and "Traceback" not in err
    assert not storage.exists() or not any(storage.iterdir())


def test_a_job_id_given_to_the_driver_is_checked_before_any_folder(tmp_path, capsys, tiny_datasets):
    from orchestra.driver.main import main as driver_main

    spec, storage, args = validate(tmp_path, json.dumps(valid_spec()), tiny_datasets)
    assert driver_main(["run", str(spec), "--job-id", "../escape", "--storage", str(storage),
                        "--datasets", str(tiny_datasets), "--in-process"]) == 2
    assert "invalid job id" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and (not storage.exists() or not any(storage.iterdir()))


def test_servers_bind_loopback_unless_asked():
    assert DEFAULT_HOST == "127.0.0.1"
    assert cli.build_parser().parse_args(["tensorboard"]).host == "127.0.0.1"


# Values no field accepts, by the kind of field.
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE = st.one_of(st.integers(min_value=2**53 + 1), st.integers(max_value=-(2**53) - 1))
WORDS = st.text(min_size=1, max_size=30).map(lambda s: "x" + s)  # never a number, never empty
NUMERIC_FIELDS = [("fit", "epochs"), ("fit", "batch_size"), ("scaling", "workers"), ("seed",),
                  ("compile", "optimizer", "learning_rate"), ("data", "validation_size"),
                  ("model", "layers", 0, "units"), ("model", "layers", 1, "units")]
SECTIONS = [(), ("data",), ("model",), ("compile",), ("fit",), ("scaling",), ("callbacks",)]


def nested(depth: int, leaf) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _set(spec: dict, path: tuple, value) -> dict:
    node = spec
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return spec


@st.composite
def hostile_specs(draw) -> str:
    spec = valid_spec()
    kind = draw(st.sampled_from(["number", "layer_type", "layer_object", "layer_deep", "extra_field",
                                 "deep", "name", "not_json", "not_object", "layer_size", "layer_rate",
                                 "layer_file", "layer_registry", "storage", "surrogate", "scaling", "metrics",
                                 "output_width"]))
    if kind == "number":
        value = draw(st.one_of(NOT_FINITE, HUGE, WORDS, st.lists(st.integers(), max_size=3),
                               st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
        _set(spec, draw(st.sampled_from(NUMERIC_FIELDS)), value)
    elif kind == "layer_type":
        hostile = draw(st.one_of(WORDS, st.sampled_from(["os.system", "__import__", "eval", "../Dense",
                                                         "builtins.exec", "Dense\n", "Lambda.x"])))
        spec["model"]["layers"][0]["type"] = hostile
    elif kind == "layer_object":
        spec["model"]["layers"][0][draw(st.sampled_from(["kernel_initializer", "activation", "dtype"]))] = {
            "class_name": draw(WORDS), "module": draw(st.sampled_from(["os", "subprocess", "builtins"])),
            "registered_name": draw(WORDS), "config": {}}
    elif kind == "layer_deep":
        spec["model"]["layers"][0]["units"] = nested(draw(st.integers(4, 40)), 1)
    elif kind == "extra_field":
        section = draw(st.sampled_from(SECTIONS))
        node = spec
        for part in section:
            node = node.setdefault(part, {})
        key = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in node))
        node["zz_" + key] = draw(st.one_of(st.integers(), WORDS, st.none()))
    elif kind == "deep":
        spec["data"]["reshape"] = nested(draw(st.integers(12, 200)), 16)
    elif kind == "name":
        spec["name"] = draw(st.one_of(st.sampled_from(HOSTILE_IDS), WORDS.map(lambda s: "../" + s),
                                      st.text(min_size=1).filter(lambda s: not s.isascii())))
    elif kind == "layer_size":  # issue 18 items 6-7: 0 aborts oneDNN, millions ask for gigabytes
        size = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=65_537, max_value=2**31 - 1),
                              st.floats(0.1, 1e6).filter(lambda f: not f.is_integer())))
        key = draw(st.sampled_from(["units", "filters", "output_dim", "kernel_size", "pool_size", "strides"]))
        spec["model"]["layers"][draw(st.integers(0, 1))][key] = draw(st.sampled_from([size, [size], [2, size]]))
    elif kind == "layer_rate":
        rate = draw(st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=-1e-9, min_value=-1e9)))
        layer = {"type": draw(st.sampled_from(["Dropout", "SpatialDropout1D", "GaussianDropout"])), "rate": rate}
        spec["model"]["layers"].insert(1, layer)
    elif kind == "layer_file":  # issue 18 item 5: no layer argument names a file
        path = draw(st.one_of(st.sampled_from(["/etc/passwd", "~/.ssh/id_rsa", "../../etc/shadow", "vocab.txt"]),
                              WORDS.map(lambda w: "/" + w)))
        layer = {"type": draw(st.sampled_from(["StringLookup", "IntegerLookup", "TextVectorization"]))}
        if path.startswith(("/", "~", ".")):
            layer[draw(st.sampled_from(["vocabulary", "name", "idf_weights"]))] = path
        else:
            layer["vocabulary"] = path
        spec["model"]["layers"].insert(0, layer)
    elif kind == "layer_registry":  # helpers and base classes of Keras's registries are not values
        key, value = draw(st.sampled_from([
            ("activation", "serialize"), ("activation", "deserialize"), ("activation", "get"),
            ("kernel_initializer", "Initializer"), ("bias_initializer", "serialize"),
            ("kernel_regularizer", "Regularizer"), ("kernel_constraint", "Constraint")]))
        spec["model"]["layers"][draw(st.integers(0, 1))][key] = value
    elif kind == "storage":  # issue 18 items 7-8
        spec["storage"] = draw(st.one_of(
            WORDS.filter(lambda w: "://" not in w), st.sampled_from(["~nosuchuser/x", "~root", "./here", "a\x00b"]),
            WORDS.map(lambda w: "/tmp/" + w + "\x00")))
    elif kind == "surrogate":  # JSON's \ud800 escape: a string no file can be written with
        lone = draw(st.integers(0xD800, 0xDFFF).map(chr))
        path = draw(st.sampled_from([("comment",), ("model", "layers", 0, "name"), ("compile", "metrics", 0),
                                     ("data", "source")]))
        _set(spec, path, draw(st.text(max_size=5)) + lone)
    elif kind == "scaling":  # issue 18 item 6
        spec["scaling"].update(draw(st.one_of(
            st.fixed_dictionaries({"workers": st.integers(257, 10**6)}),
            st.fixed_dictionaries({"cpus_per_worker": st.floats(min_value=0, max_value=0.2499)}))))
    elif kind == "metrics":  # issue 18 item 8: duplicates, labels read the other way
        spec["compile"]["metrics"] = draw(st.sampled_from([
            ["accuracy", "accuracy"], ["acc", "accuracy", "acc"], ["categorical_accuracy"],
            ["top_k_categorical_accuracy"], ["CategoricalCrossentropy"]]))
    elif kind == "output_width":  # issue 18 item 8: the last layer cannot fit the labels
        units, loss = draw(st.sampled_from([(1, "sparse_categorical_crossentropy"), (3, "binary_crossentropy"),
                                            (2, "binary_crossentropy")]))
        spec["model"]["layers"][1]["units"] = units
        spec["compile"]["loss"] = loss
    elif kind == "not_json":
        return json.dumps(spec)[: draw(st.integers(0, 40))] + draw(st.sampled_from(["", "}", "{{", "\x00"]))
    else:
        return json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text())))
    return json.dumps(spec)  # NaN and Infinity as JSON's extensions, as a careless writer would


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile_specs())
def test_fuzzed_specs_are_refused_with_a_field_path(tmp_path_factory, tiny_datasets, capsys, text):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    spec, storage, args = validate(tmp_path, text, tiny_datasets)
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2, f"accepted: {text[:300]}\n{out}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{spec}: invalid job spec", err
    assert lines[1].startswith("  ") and ": " in lines[1], err  # a field path and what is wrong with it
    assert not storage.exists() or not any(storage.iterdir())


def test_the_valid_spec_of_the_fuzz_is_valid(tmp_path, tiny_datasets, capsys):
    spec, storage, args = validate(tmp_path, json.dumps(valid_spec()), tiny_datasets)
    assert cli.main(args) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", [("data", "source"), ("storage",), ("data", "images", "train_dir"),
                                  ("model", "backbone", "weights")])
def test_a_path_longer_than_the_os_allows_is_refused_by_its_field(tmp_path, tiny_datasets, capsys, path):
    spec = valid_spec()
    if path[1:2] == ("images",):
        spec["data"] = {"images": {"train_dir": "x"}, "validation_split": 0.2}
    if path[1:2] == ("backbone",):
        spec["model"]["backbone"] = {"name": "MobileNetV2", "input_shape": [32, 32, 3]}
    _set(spec, path, "/tmp/" + "x" * 5000 + ".npz")
    spec_file, storage, args = validate(tmp_path, json.dumps(spec), tiny_datasets)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"  {'.'.join(path)}: String should have at most 4096 characters" in err, err
    assert "Traceback" not in err


def test_a_spec_built_in_python_refuses_infinity_too():
    spec = valid_spec()
    spec["compile"]["optimizer"]["learning_rate"] = math.inf
    with pytest.raises(ValidationError, match="finite number"):
        JobSpec.model_validate(spec)


def test_in_process_is_a_foreground_run(tmp_path, capsys, tiny_datasets):
    spec, storage, _ = validate(tmp_path, json.dumps(valid_spec()), tiny_datasets)
    assert cli.main(["submit", str(spec), "--detach", "--in-process", "--storage", str(storage)]) == 2
    assert "--in-process: trains in this process, in the foreground" in capsys.readouterr().err
    assert not storage.exists()


# Items 5-8 of issue 18: each hostile or unlucky spec ends in one line naming its field.

SECRET = "orchestra-secret-line-7f3a"  # a file's content no message may show


class WatchedFile:
    """A FIFO standing in for a file a spec names: any process that opens it
    to read is seen (`was_read`), and nothing blocks: a writer thread waits
    for the reader and hands it the file's `content`."""

    def __init__(self, path: Path, content: str):
        import os
        import threading

        self.path, self.content, self.opened = path, content, threading.Event()
        os.mkfifo(path)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            with open(self.path, "w") as fifo:  # blocks until someone opens the file to read
                self.opened.set()
                fifo.write(self.content)
        except BrokenPipeError:  # `close` opened it and let go at once
            pass

    def close(self) -> bool:
        """Release the writer; whether anyone but us opened the file."""
        import os

        was_read = self.opened.is_set()
        for _ in range(100):  # until the writer has ended: it may not have reached its open yet
            if not was_read:
                os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
            self.thread.join(0.05)
            if not self.thread.is_alive():
                break
        return was_read


def test_a_watched_file_sees_a_read(tmp_path):
    """The instrument of the test below: a read of the file is seen."""
    watched = WatchedFile(tmp_path / "file.txt", SECRET)
    with open(watched.path) as file:
        assert file.read() == SECRET
    assert watched.close()
    assert not WatchedFile(tmp_path / "unread.txt", SECRET).close()


def _layer(index: int, **arguments):
    return lambda spec: spec["model"]["layers"][index].update(arguments)


def _insert(index: int, layer: dict):
    return lambda spec: spec["model"]["layers"].insert(index, layer)


def _one_hot(spec: dict) -> None:
    spec["data"]["labels"] = "one_hot"
    spec["compile"]["loss"] = "categorical_crossentropy"


def _both(*changes):
    def change(spec):
        for one in changes:
            one(spec)
    return change


def _set_path(path: tuple, value):
    return lambda spec: _set(spec, path, value)


# (id, change to valid_spec(), the field the one line names). "{vocabulary}",
# "{pickled}" and "{corrupt}" are files the test makes.
HOSTILE_SPECS = [
    ("vocabulary-etc-passwd", _insert(0, {"type": "StringLookup", "vocabulary": "/etc/passwd"}),
     "model.layers.0.vocabulary"),
    ("vocabulary-watched-file", _insert(0, {"type": "StringLookup", "vocabulary": "{vocabulary}"}),
     "model.layers.0.vocabulary"),
    ("integer-lookup-file", _insert(0, {"type": "IntegerLookup", "vocabulary": "{vocabulary}"}),
     "model.layers.0.vocabulary"),
    ("vocabulary-relative-file", _insert(0, {"type": "StringLookup", "vocabulary": "vocab.txt"}),
     "model.layers.0.vocabulary"),
    ("path-in-any-argument", _layer(0, name="{vocabulary}"), "model.layers.0.name"),
    ("home-path-argument", _layer(0, name="~root/x"), "model.layers.0.name"),
    ("units-0", _layer(0, units=0), "model.layers.0.units"),
    ("units-negative", _layer(0, units=-3), "model.layers.0.units"),
    ("units-3-million", _layer(0, units=3_000_000), "model.layers.0.units"),
    ("filters-float", _insert(0, {"type": "Conv1D", "filters": 2.5, "kernel_size": 2}), "model.layers.0.filters"),
    ("kernel-size-0", _insert(0, {"type": "Conv1D", "filters": 2, "kernel_size": [0]}), "model.layers.0.kernel_size"),
    ("layers-2000", lambda spec: spec["model"].update(layers=[{"type": "Dense", "units": 4}] * 2000),
     "model.layers"),
    ("dropout-rate-1", _insert(1, {"type": "Dropout", "rate": 1.0}), "model.layers.1.rate"),
    ("lstm-dropout-negative", _insert(1, {"type": "LSTM", "units": 2, "dropout": -0.1}), "model.layers.1.dropout"),
    ("optimizer-empty", _set_path(("compile", "optimizer"), ""), "compile.optimizer"),
    ("optimizer-type-empty", _set_path(("compile", "optimizer", "type"), ""), "compile.optimizer.type"),
    ("activation-serialize", _layer(0, activation="serialize"), "model.layers.0.activation"),
    ("activation-get", _layer(0, activation="get"), "model.layers.0.activation"),
    ("initializer-base-class", _layer(0, kernel_initializer="Initializer"), "model.layers.0.kernel_initializer"),
    ("regularizer-base-class", _layer(0, kernel_regularizer="Regularizer"), "model.layers.0.kernel_regularizer"),
    ("constraint-deserialize", _layer(0, bias_constraint="deserialize"), "model.layers.0.bias_constraint"),
    ("workers-1024", _set_path(("scaling", "workers"), 1024), "scaling.workers"),
    ("cpus-per-worker-tiny", _set_path(("scaling", "cpus_per_worker"), 0.001), "scaling.cpus_per_worker"),
    ("num-classes-30000", _both(_one_hot, _set_path(("data", "num_classes"), 30000)), "data.num_classes"),
    ("storage-nul", _set_path(("storage",), "/tmp/orchestra\x00x"), "storage"),
    ("storage-nouser", _set_path(("storage",), "~nosuchuser_orchestra/storage"), "storage"),
    ("storage-relative", _set_path(("storage",), "storage/here"), "storage"),
    ("comment-lone-surrogate", _set_path(("comment",), "seed 3 \ud800"), "comment"),
    ("layer-name-lone-surrogate", _layer(0, name="\udc80"), "model.layers.0.name"),
    ("name-job-id-refuses", _set_path(("name",), "a..b"), "name"),
    ("metrics-duplicate", _set_path(("compile", "metrics"), ["accuracy", "acc", "accuracy"]), "compile.metrics.2"),
    ("metric-sparse-on-one-hot", _both(_one_hot, _set_path(("compile", "metrics"), ["sparse_categorical_accuracy"])),
     "compile.metrics.0"),
    ("metric-needs-arguments", _set_path(("compile", "metrics"), ["MeanIoU"]), "compile.metrics.0"),
    ("metric-reduces-a-tensor", _set_path(("compile", "metrics"), ["accuracy", "Mean"]), "compile.metrics.1"),
    ("metric-one-hot-on-sparse", _set_path(("compile", "metrics"), ["categorical_accuracy"]), "compile.metrics.0"),
    ("last-layer-5-of-10-classes", _both(_one_hot, _set_path(("data", "num_classes"), 10), _layer(1, units=5)),
     "model.layers.1.units"),
    ("last-layer-1-with-categorical", _both(_one_hot, _layer(1, units=1)), "model.layers.1.units"),
    ("binary-crossentropy-on-3-units", _set_path(("compile", "loss"), "binary_crossentropy"), "model.layers.1.units"),
    ("source-nouser", _set_path(("data", "source"), "~nosuchuser_orchestra/x.npz"), "data.source"),
    ("source-nul", _set_path(("data", "source"), "/tmp/x\x00.npz"), "data.source"),
    ("npz-pickled", _set_path(("data", "source"), "{pickled}"), "data.source"),
    ("npz-corrupt", _set_path(("data", "source"), "{corrupt}"), "data.source"),
    ("npz-label-30000-one-hot", _both(_one_hot, _set_path(("data", "source"), "{huge_label}")), "data.labels"),
    ("reshape-to-a-wrong-size", _insert(0, {"type": "Reshape", "target_shape": [5, 5]}), "model.layers.0"),
]


def _fill(value, files: dict):
    if isinstance(value, str):
        return value.format(**files) if value.startswith("{") else value
    if isinstance(value, list):
        return [_fill(item, files) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, files) for key, item in value.items()}
    return value


@pytest.mark.parametrize("change,field", [case[1:] for case in HOSTILE_SPECS], ids=[case[0] for case in HOSTILE_SPECS])
def test_each_hostile_spec_ends_in_one_line_naming_its_field(tmp_path, tiny_datasets, capsys, change, field):
    watched = WatchedFile(tmp_path / "vocabulary.txt", SECRET + "\n")
    pickled, corrupt = tmp_path / "pickled.npz", tmp_path / "corrupt.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}] * 60, dtype=object), y_train=np.zeros(60, np.int64))
    corrupt.write_bytes(b"PK\x03\x04" + SECRET.encode())
    huge_label = tmp_path / "huge_label.npz"  # one-hot over 30,001 classes: np.eye alone would take 3.6 GB
    np.savez(huge_label, x_train=np.zeros((60, 4, 4), np.uint8), y_train=np.arange(60) % 3 * 15000)
    spec = valid_spec()
    change(spec)
    spec = _fill(spec, {"vocabulary": str(watched.path), "pickled": str(pickled), "corrupt": str(corrupt),
                        "huge_label": str(huge_label)})
    spec_file, storage, args = validate(tmp_path, json.dumps(spec), tiny_datasets)
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert not watched.close(), "a file the spec names was opened"
    assert code == 2, out
    assert "Traceback" not in err and SECRET not in err and "root:x:0" not in err
    header, *lines = err.splitlines()
    assert header == f"{spec_file}: invalid job spec"
    assert len(lines) == 1 and lines[0].startswith(f"  {field}: "), err
    assert not storage.exists() or not any(storage.iterdir())


def _image_spec(train_dir: Path) -> dict:
    spec = valid_spec()
    spec["data"] = {"images": {"train_dir": str(train_dir), "target_size": [8, 8], "label_mode": "int"},
                    "validation_split": 0.25}
    spec["model"]["layers"].insert(0, {"type": "Flatten"})
    spec["model"]["layers"][-1]["units"] = 2
    return spec


@pytest.mark.parametrize("trap", ["class-folder-link", "too-many-entries"])
def test_hostile_image_folders_end_in_one_line_naming_the_folder(tmp_path, tiny_datasets, capsys, monkeypatch, trap):
    from orchestra.build import images
    from orchestra.tools.samples import write_image_tree

    root = write_image_tree(tmp_path / "train", per_class=10, size=8)
    if trap == "class-folder-link":
        (root / "private_link").symlink_to("/etc", target_is_directory=True)
    else:
        monkeypatch.setattr(images, "MAX_ENTRIES", 5)
    spec_file, storage, args = validate(tmp_path, json.dumps(_image_spec(root)), tiny_datasets)
    assert cli.main(args) == 2
    header, *lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("  data.images.train_dir: "), lines
    assert "private" not in lines[0] and "circle" not in lines[0] and "passwd" not in lines[0]
    assert not storage.exists() or not any(storage.iterdir())


def test_the_valid_image_spec_of_these_tests_is_valid(tmp_path, tiny_datasets, capsys):
    from orchestra.tools.samples import write_image_tree

    root = write_image_tree(tmp_path / "train", per_class=10, size=8)
    spec_file, storage, args = validate(tmp_path, json.dumps(_image_spec(root)), tiny_datasets)
    assert cli.main(args) == 0, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "latin-1", "huge"])
def test_hostile_spec_files_end_in_one_line(tmp_path, capsys, kind):
    import os

    path = tmp_path / "spec.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "latin-1":
        path.write_bytes(json.dumps(valid_spec() | {"comment": "é"}, ensure_ascii=False).encode("latin-1"))
    else:
        with open(path, "wb") as file:
            file.truncate(2**40)  # a terabyte, sparse
    storage = tmp_path / "storage"
    assert cli.main(["validate", str(path), "--storage", str(storage)]) == 2
    header, *lines = capsys.readouterr().err.splitlines()
    assert header == f"{path}: invalid job spec" and len(lines) == 1 and lines[0].startswith("  (file): ")
    assert not storage.exists()


@pytest.mark.parametrize("data", ["[" * 30000 + "]" * 30000, "1" * 5000, "[1]"])
def test_evaluate_data_override_that_is_not_a_json_object_is_one_line(tmp_path, capsys, data):
    assert cli.main(["evaluate", "some-job", "--data", data, "--storage", str(tmp_path / "storage")]) == 2
    header, *lines = capsys.readouterr().err.splitlines()
    assert header == "--data: invalid job spec" and len(lines) == 1 and lines[0].startswith("  --data: ")
    assert not (tmp_path / "storage").exists()


def test_null_sizes_keep_keras_defaults():
    from orchestra.spec import LayerSpec

    assert LayerSpec.model_validate({"type": "MaxPooling1D", "pool_size": 2, "strides": None}).arguments["strides"] is None


@pytest.mark.parametrize("verb", [["status", "some-job"], ["list"], ["validate", "SPEC", "--schema-only"]])
def test_an_unknown_users_home_as_storage_is_one_line(tmp_path, capsys, monkeypatch, verb):
    spec_file, _, _ = validate(tmp_path, json.dumps(valid_spec()), tmp_path)
    monkeypatch.setenv("ORCHESTRA_STORAGE", "~nosuchuser_orchestra/storage")
    assert cli.main([str(spec_file) if arg == "SPEC" else arg for arg in verb]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 2 and "no such user's home" in err and "Traceback" not in err
