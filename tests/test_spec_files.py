"""Specs in YAML and `--set path=value` overrides, through the real CLI:
the same rules and limits as JSON, one line naming the field, exit 2."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_cli, small_spec

from orchestra.cli import main
from orchestra.spec import MAX_SPEC_BYTES, load_spec, parse_spec
from orchestra.spec.reading import MAX_SPEC_DEPTH, apply_overrides

SPEC = small_spec(**{"compile.optimizer": {"class_name": "Adam", "config": {"learning_rate": 0.01}}})


def validate(capsys, path, *extra) -> tuple[int, str]:
    """`orchestra validate PATH --schema-only ...`: (exit code, stderr)."""
    code = main(["validate", str(path), "--schema-only", *map(str, extra)])
    return code, capsys.readouterr().err


def problem_line(stderr: str) -> str:
    """The one problem line under `<source>: invalid job spec`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("invalid job spec") and "Traceback" not in stderr, stderr
    return lines[1].strip()


# YAML specs.

@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_a_yaml_spec_reads_as_its_json_twin(tmp_path, suffix):
    spec = {key: value for key, value in SPEC.items() if key != "name"}
    (tmp_path / "twin.json").write_text(json.dumps(spec))
    (tmp_path / f"twin{suffix}").write_text(yaml.safe_dump(spec))
    from_json, from_yaml = load_spec(tmp_path / "twin.json"), load_spec(tmp_path / f"twin{suffix}")
    assert from_yaml.model_dump() == from_json.model_dump() and from_yaml.name == "twin"


def test_a_yaml_spec_validates_through_the_cli(tmp_path):
    path = tmp_path / "small.yml"
    path.write_text("# comments are welcome in YAML\n" + yaml.safe_dump(SPEC))
    result = run_cli("validate", path, "--schema-only", "--set", "fit.epochs=4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: valid as a spec")


YAML_SCALARS = """
name: no
data: {source: mnist, rescale: 1/255, flatten: yes, labels: one_hot, train_size: 400, validation_size: 200}
model: {layers: [{type: Dense, units: 10, activation: softmax}]}
compile:
  optimizer: {class_name: Adam, config: {learning_rate: 1e-4}}
  loss: categorical_crossentropy
  metrics: [accuracy]
fit: {epochs: 010, batch_size: 10}
"""


def test_yaml_scalars_read_as_json_would_read_them():
    """YAML 1.1 (PyYAML's default) would make `no` False, `1e-4` a string,
    `010` eight, `1_0` ten and `2024-01-01` a date; a spec reads them as
    YAML 1.2 and JSON do."""
    spec = parse_spec(YAML_SCALARS, "s.yaml", yaml=True)
    assert spec.name == "no" and spec.data.flatten is True  # "yes" is a string, which a bool field accepts
    assert spec.compile.optimizer.config["learning_rate"] == 1e-4 and spec.fit.epochs == 10
    for name in ("1_0", "2024-01-01", "on", "0x1F"):
        assert parse_spec(YAML_SCALARS.replace("name: no", f"name: {name}"), "s.yaml", yaml=True).name == name


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, where, message", [
    ("name: !!python/object/apply:os.system ['touch {marker}']\n", "line 1 column 7",
     "the YAML tag '!!python/object/apply:os.system' is not allowed"),
    ("name: !!binary aGVsbG8=\n", "line 1 column 7", "the YAML tag '!!binary' is not allowed"),
    ("name: !mine x\n", "line 1 column 7", "the YAML tag '!mine' is not allowed"),
    ("name: !!str x\n", "line 1 column 7", "the YAML tag '!!str' is not allowed"),
    (BOMB, "line 1 column 4", "YAML anchors and aliases (&name, *name) are not allowed"),
    ("fit: {epochs: 1}\nfit: {epochs: 2}\n", "line 2 column 1", "the key 'fit' appears twice in one mapping"),
    ("data: {1: mnist}\n", "line 1 column 8", "the key 1 is not a string; quote it"),
    ("? [a, b]\n: c\n", "line 1 column 3", "the key ['a', 'b'] is not a string"),
    ("name: a\n---\nname: b\n", "line 2 column 1", "holds a second YAML document"),
    ("fit: [" * (MAX_SPEC_DEPTH + 2) + "]" * (MAX_SPEC_DEPTH + 2) + "\n", "line 1 column",
     f"nested deeper than {MAX_SPEC_DEPTH} levels"),
    ("name: [unclosed\n", "line 2 column 1", "malformed YAML: did not find expected ',' or ']'"),
    ("- a\n- b\n", "(spec)", "must be a YAML mapping of sections"),
    ("", "(spec)", "must be a YAML mapping of sections"),
    ("fit: {epochs: .inf}\n", "fit.epochs", "inf is not allowed: numbers must be finite"),
], ids=["python-tag", "binary-tag", "local-tag", "explicit-str", "billion-laughs", "duplicate-key", "int-key",
        "complex-key", "two-documents", "too-deep", "malformed", "a-list", "empty", "infinity"])
def test_unsafe_yaml_is_refused_with_one_line(tmp_path, capsys, text, where, message):
    marker = tmp_path / "ran"
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    code, stderr = validate(capsys, path)
    line = problem_line(stderr)
    assert code == 2 and line.startswith(where) and message in line, line
    assert not marker.exists()


SPEC_YAML = yaml.safe_dump(SPEC)


@pytest.mark.parametrize("text, where, message", [
    (SPEC_YAML.replace("fit:\n", "fit:\n  <<: {epochs: 1}\n"), "fit.<<", "unknown field; allowed: epochs"),
    (SPEC_YAML.replace("epochs: 30", "epochs: " + "9" * 5000), "fit.epochs",
     "an integer of 5000 digits is out of range"),
    (SPEC_YAML.replace("epochs: 30", "epochs: .NaN"), "fit.epochs", "nan is not allowed: numbers must be finite"),
    (SPEC_YAML.replace("epochs: 30", "epochs: 1e999"), "fit.epochs", "inf is not allowed"),
    (SPEC_YAML.replace("  epochs: 30\n", "  epochs: 30\n  epochs: 31\n"), "line ",
     "the key 'epochs' appears twice in one mapping"),
    (SPEC_YAML.replace("fit:\n  ", "fit:\n\t"), "line ", "malformed YAML: found character that cannot start"),
    (SPEC_YAML.replace("name: small", "name: a\x07b"), "(spec)", "control characters are not allowed"),
    ("%TAG ! tag:yaml.org,2002:python/\n---\nname: !object x\n", "line 3 column 7",
     "the YAML tag '!!python/object' is not allowed"),
    (SPEC_YAML.replace("epochs: 30", "epochs: 0x1F"), "fit.epochs", "must be a valid integer"),
    ("".join(f"k{i}: 1\n" for i in range(60000)), "", ""),
], ids=["merge-key", "huge-int", "nan", "overflow", "nested-duplicate", "tab", "control-character", "tag-directive",
        "hex", "many-keys"])
def test_more_hostile_yaml_is_refused(tmp_path, capsys, text, where, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, stderr = validate(capsys, path)
    assert code == 2 and "Traceback" not in stderr
    if where:
        line = problem_line(stderr)
        assert line.startswith(where) and message in line, line


def test_json_has_the_same_integer_limit(tmp_path, capsys):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(SPEC).replace('"epochs": 30', '"epochs": -' + "9" * 5000))
    code, stderr = validate(capsys, path)
    assert code == 2 and problem_line(stderr) == "fit.epochs: an integer of 5000 digits is out of range " \
                                                 "(at most 2**53 in magnitude)"


@pytest.mark.parametrize("suffix, dump", [(".json", json.dumps), (".yaml", yaml.safe_dump)])
def test_a_byte_order_mark_is_read_past(tmp_path, suffix, dump):
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + dump(SPEC).encode())
    assert load_spec(path).fit.epochs == 30


def test_a_spec_that_is_not_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SPEC_YAML.replace("small", "sm\xe9ll").encode("latin-1"))
    code, stderr = validate(capsys, path)
    assert code == 2 and "is not UTF-8 text" in problem_line(stderr)


def test_yaml_has_the_json_size_cap(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * (MAX_SPEC_BYTES // 10))
    code, stderr = validate(capsys, path)
    assert code == 2 and f"larger than {MAX_SPEC_BYTES} bytes" in problem_line(stderr)


def test_json_refuses_a_key_given_twice_too(tmp_path, capsys):
    path = tmp_path / "twice.json"
    path.write_text('{"fit": {"epochs": 1, "epochs": 2}}')
    code, stderr = validate(capsys, path)
    assert code == 2 and "the key 'epochs' appears twice in one object" in problem_line(stderr)


# --set overrides.

@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SPEC))
    return path


def test_overrides_set_any_field_and_are_checked_like_the_file(spec_file):
    spec = load_spec(spec_file, ["fit.epochs=5", "compile.optimizer.config.learning_rate=1e-4",
                                 "callbacks.0.config.patience=3", "data.source=fashion_mnist",
                                 'name="007"',
                                 'compile.metrics=["accuracy"]'])
    assert spec.fit.epochs == 5 and spec.compile.optimizer.config["learning_rate"] == 1e-4
    assert spec.callbacks[0].config.patience == 3 and spec.data.source == "fashion_mnist" and spec.name == "007"
    swapped = load_spec(spec_file, ['compile.optimizer={"class_name": "SGD", "config": {"momentum": 0.9}}'])
    assert swapped.compile.optimizer.class_name == "SGD" and swapped.compile.optimizer.config == {"momentum": 0.9}
    assert json.loads(spec_file.read_text()) == SPEC  # the file is not touched


def test_overrides_make_missing_objects_on_the_way():
    assert apply_overrides({"fit": {}}, ["data.images.train_dir=/x"]) == {"fit": {}, "data": {"images":
                                                                                            {"train_dir": "/x"}}}


@pytest.mark.parametrize("setting, where, message", [
    ("fit.epocs=3", "--set fit.epocs", "unknown field; allowed: epochs, "),
    ("fit.epocs=3", "--set fit.epocs", "did you mean 'epochs'?"),
    ("fitt.epochs=3", "--set fitt", "did you mean 'fit'?"),
    ("callbacks.7.config.patience=3", "--set callbacks.7", "callbacks is a list of 3: give an index from 0 to 2"),
    ("callbacks.first.config.patience=3", "--set callbacks.first", "give an index from 0 to 2"),
    ("compile.loss.config.from_logits=true", "--set compile.loss",
     "is 'categorical_crossentropy', not an object or a list: set compile.loss as a whole"),
    ("fit.epochs", "--set", "'fit.epochs' is not path=value, e.g. fit.epochs=5"),
    ("fit..epochs=3", "--set", "is not path=value"),
    ("fit.epochs=0", "fit.epochs", "must be greater than or equal to 1"),
    ("fit.epochs=NaN", "fit.epochs", "nan is not allowed: numbers must be finite"),
    ("fit.epochs=five", "fit.epochs", "must be a valid integer"),
    ("__class__=1", "--set __class__", "unknown field; allowed: name, "),
    ("data.__class__.x=1", "--set data.__class__", "unknown field; allowed: source, "),
    ("callbacks.-1.config.patience=3", "--set callbacks.-1", "give an index from 0 to 2"),
    ("model.layers.99999999.units=3", "--set model.layers.99999999", "model.layers is a list of 2"),
    ("model.layers.\u00b9.units=3", "--set model.layers.\u00b9", "give an index from 0 to 1"),
    ("model.layers.0\u0660.units=3", "--set model.layers.0\u0660", "give an index from 0 to 1"),
    ("=value", "--set", "'=value' is not path=value"),
    ("a..b=1", "--set", "'a..b=1' is not path=value"),
    ("fit.epochs=" + "9" * 5000, "fit.epochs", "an integer of 5000 digits is out of range"),
    ("fit.epochs=1e400", "fit.epochs", "inf is not allowed"),
    ("fit.epochs=" + "[" * 40 + "]" * 40, "fit.epochs.0.0", "nested deeper than 12 levels"),
    ("name=a\nb", "name", "String should match pattern"),
    ("storage=relative/path", "storage", "'relative/path' is relative"),
    ("data.validation=/etc/passwd", "data.validation", "is not 'split', 'test' or the path of an .npz file"),
    ("comment=" + "x" * 1_000_001, "--set", "the overrides hold more than 1000000 characters"),
    ('fit={"epochs": 1, "epochs": 2}', "--set fit", "the key 'epochs' appears twice in one object"),
], ids=["unknown", "close-match", "section", "index", "not-an-index", "into-a-string", "no-equals", "empty-part",
        "out-of-range", "nan", "not-a-number", "dunder", "dunder-deeper", "negative-index", "huge-index",
        "superscript-digit", "arabic-digit", "empty-path", "empty-name", "huge-int", "overflow", "too-deep",
        "newline", "relative-storage", "not-an-npz", "too-long", "duplicate-key"])
def test_a_bad_override_names_its_path(spec_file, capsys, setting, where, message):
    code, stderr = validate(capsys, spec_file, "--set", "fit.epochs=2", "--set", setting)
    line = problem_line(stderr)
    assert code == 2 and line.startswith(where) and message in line, line


def test_submit_refuses_a_bad_override_before_anything_starts(spec_file, capsys, tmp_path):
    code = main(["submit", str(spec_file), "--set", "fit.epocs=3", "--storage", str(tmp_path / "storage")])
    assert code == 2 and "did you mean 'epochs'?" in problem_line(capsys.readouterr().err)
    assert not (tmp_path / "storage").exists()


def test_overrides_apply_to_yaml_specs_through_the_cli(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    result = run_cli("validate", path, "--schema-only", "--set", "fit.batch_size=0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[1].strip().startswith("fit.batch_size: must be greater than")
