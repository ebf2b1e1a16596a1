"""Hostile input: job ids that try to leave the storage root, specs that try
to make orchestra import or run code, and a property-based fuzz of
malformed specs through `orchestra validate`: every one is refused with
exit 2, a field path and no traceback, and leaves nothing in storage."""

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


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory):
    """A 60-example dataset, so the checks before dispatch take no time."""
    directory = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    np.savez(directory / "tiny.npz", x_train=rng.integers(0, 255, (60, 4, 4), dtype=np.uint8),
             y_train=rng.integers(0, 3, 60), x_test=rng.integers(0, 255, (10, 4, 4), dtype=np.uint8),
             y_test=rng.integers(0, 3, 10))
    return directory


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
    assert not (tmp_path / "escape").exists() and not any(storage.iterdir())


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
                                 "deep", "name", "not_json", "not_object"]))
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
    elif kind == "not_json":
        return json.dumps(spec)[: draw(st.integers(0, 40))] + draw(st.sampled_from(["", "}", "{{", "\x00"]))
    else:
        return json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text())))
    return json.dumps(spec)  # NaN and Infinity as JSON's extensions, as a careless writer would


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
