"""Storage is data, never code: what a job folder holds is input like a spec.

A `.keras` file whose config would import a module and run bytecode is
loaded by `evaluate`, `predict`, `orchestra.load_model` and
`Client.load_model` without running anything (the model is rebuilt from the
spec, only the weights are read); paths in records and checkpoint state
files are names inside the job folder, and one that leaves it or passes a
symlink is refused; corrupt records, histories and state files are one-line
errors; publishing a checkpoint over an old one keeps a complete one there
at every moment, and what crashed writers left behind is swept on resume.
Hand-written job folders, no Ray."""

from __future__ import annotations

import base64
import json
import marshal
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import orchestra
from orchestra import Client
from orchestra.cli import main
from orchestra.coordinator import Checkpoint, Coordinator
from orchestra.coordinator.protocol import CheckpointRef
from orchestra.driver.resume import reopen
from orchestra.errors import StorageError, StorageWriteError
from orchestra.storage import folders
from orchestra.storage.folders import Storage, publish_directory
from orchestra.storage.paths import read_stored_text, resolve_stored, stored_name
from orchestra.storage.record import CheckpointEntry, JobRecord, JobState

JOB = "job-1"
SPEC = {
    "name": "trust",
    "data": {"source": "trust", "flatten": True, "validation_size": 10},
    "model": {"layers": [{"type": "Dense", "units": 3, "activation": "softmax"}]},
    "compile": {"optimizer": {"type": "adam"}, "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
    "fit": {"epochs": 2, "batch_size": 10},
    "scaling": {"workers": 1},
}
INPUT_SHAPE = [4]


# What a job folder may hold that should never run: a .keras archive whose
# config names the legacy Keras inside TensorFlow (which knows no safe mode)
# and a Lambda layer whose bytecode writes the file $MARKER when it is called.

def _evil(x):
    open(__import__("os").environ["MARKER"], "w").write("ran")
    return x


def hostile_config() -> dict:
    function = base64.b64encode(marshal.dumps(_evil.__code__)).decode()
    lambda_layer = {"class_name": "Lambda", "config": {
        "name": "evil", "trainable": True, "dtype": "float32", "function": function, "function_type": "lambda",
        "module": "builtins", "output_shape": None, "output_shape_type": "raw", "output_shape_module": None,
        "arguments": {}}}
    return {"module": "tensorflow.python.keras.engine.sequential", "class_name": "Sequential",
            "registered_name": None, "config": {"name": "s", "layers": [
                {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "dtype": "float32",
                                                        "name": "in"}},
                lambda_layer]}}


def real_weights(tmp_path: Path, spec: dict, seed: int) -> tuple[bytes, list[np.ndarray]]:
    """The bytes of a `.weights.h5` of the model `spec` builds, with seeded weights, and those weights."""
    from orchestra.build.model import build_model
    from orchestra.spec import JobSpec

    model = build_model(JobSpec.model_validate(spec), tuple(INPUT_SHAPE))
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()]
    model.set_weights(weights)
    path = tmp_path / f"w{seed}.weights.h5"
    model.save_weights(str(path))
    return path.read_bytes(), weights


def write_hostile_keras(path: Path, weights_h5: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(hostile_config()))
        archive.writestr("metadata.json", json.dumps({"keras_version": "2.21.0", "date_saved": "2026-01-01"}))
        archive.writestr("model.weights.h5", weights_h5)


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(path))
    return path


@pytest.fixture
def datasets(tmp_path) -> Path:
    directory = tmp_path / "datasets"
    directory.mkdir()
    rng = np.random.default_rng(0)
    np.savez(directory / "trust.npz", x_train=rng.integers(0, 255, (40, 2, 2), dtype=np.uint8),
             y_train=rng.integers(0, 3, 40), x_test=rng.integers(0, 255, (12, 2, 2), dtype=np.uint8),
             y_test=rng.integers(0, 3, 12))
    return directory


def job_folder(storage: Storage, **fields) -> JobRecord:
    """A SUCCEEDED (or `state`) job folder written by hand: record only; the test adds files."""
    storage.create_job_dir(JOB)
    record = JobRecord(**{"job_id": JOB, "name": "trust", "workers": 1, "spec": SPEC, "input_shape": INPUT_SHAPE,
                          "state": JobState.SUCCEEDED, "epochs_completed": 2, **fields})
    storage.write_record(record)
    return record


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


# 1. A model file's config is never deserialized.


def test_the_crafted_file_runs_its_code_under_a_plain_keras_load(tmp_path, marker):
    """The file the tests below load is truly hostile: tf-keras's own
    `load_model` runs its bytecode, safe mode or not."""
    from orchestra.keras_compat import keras

    path = tmp_path / "model.keras"
    write_hostile_keras(path, b"")
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises after, the code has run
        keras().models.load_model(str(path), safe_mode=True)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("loader", ["orchestra.load_model", "Client.load_model"])
@pytest.mark.parametrize("where", ["model", "checkpoints/epoch-0002"])
def test_a_hostile_keras_file_is_loaded_for_its_weights_only(tmp_path, marker, loader, where):
    storage = Storage(tmp_path / "storage")
    job_dir = storage.job_dir(JOB)
    job_folder(storage, model_path=str(job_dir / where), best_checkpoint=str(job_dir / where))
    h5, weights = real_weights(tmp_path, SPEC, seed=3)
    write_hostile_keras(job_dir / where / "model.keras", h5)
    checkpoint = "final" if where == "model" else "best"
    if loader == "orchestra.load_model":
        model = orchestra.load_model(JOB, storage=str(storage.root), checkpoint=checkpoint)
    else:
        model = Client(storage=str(storage.root)).load_model(JOB, checkpoint=checkpoint)
    assert not marker.exists()
    assert "evil" not in [layer.name for layer in model.layers]
    for loaded, saved in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(loaded, saved)


def test_evaluate_and_predict_of_a_hostile_keras_file_run_nothing(tmp_path, marker, datasets, capsys):
    storage = Storage(tmp_path / "storage")
    job_folder(storage, model_path=str(storage.model_dir(JOB)))
    h5, weights = real_weights(tmp_path, SPEC, seed=4)
    write_hostile_keras(storage.model_dir(JOB) / "model.keras", h5)
    assert main(["evaluate", JOB, "--storage", str(storage.root), "--datasets", str(datasets), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["set"] == "test" and result["examples"] == 12
    x = np.random.default_rng(1).integers(0, 255, (5, 2, 2), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["predict", JOB, str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"),
                 "--storage", str(storage.root)]) == 0
    assert not marker.exists()
    with np.load(tmp_path / "out.npz") as out:  # the saved weights, applied: softmax(x W + b)
        logits = x.reshape(5, 4).astype(np.float32) @ weights[0] + weights[1]
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(out["probabilities"], expected / expected.sum(axis=1, keepdims=True),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("contents", ["other model", "not a zip", "no weights"])
def test_a_model_file_that_does_not_fit_is_one_line_naming_it(tmp_path, marker, datasets, capsys, contents):
    storage = Storage(tmp_path / "storage")
    job_folder(storage, model_path=str(storage.model_dir(JOB)))
    path = storage.model_dir(JOB) / "model.keras"
    if contents == "other model":  # a Dense of 5 units where the spec has 3
        other = {**SPEC, "model": {"layers": [{"type": "Dense", "units": 5}]}}
        write_hostile_keras(path, real_weights(tmp_path, other, seed=5)[0])
    elif contents == "not a zip":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\x89HDF\r\n" + b"\0" * 100)
    else:
        write_hostile_keras(path, b"")
    code = main(["evaluate", JOB, "--storage", str(storage.root), "--datasets", str(datasets)])
    assert str(path) in one_line_error(capsys, code)
    assert not marker.exists()


def test_a_weights_file_linking_to_another_file_is_refused(tmp_path, datasets, capsys):
    """HDF5 follows an external link to another file when the link is read: refused before."""
    import h5py

    storage = Storage(tmp_path / "storage")
    job_folder(storage, model_path=str(storage.model_dir(JOB)))
    with h5py.File(tmp_path / "secret.h5", "w") as secret:
        secret["vars/0"] = np.ones((4, 3), np.float32)
    path = storage.model_dir(JOB) / "model.weights.h5"
    path.parent.mkdir(parents=True)
    path.write_bytes(real_weights(tmp_path, SPEC, seed=6)[0])
    with h5py.File(path, "a") as weights:
        weights["layers/extra"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/")
    err = one_line_error(capsys, main(["evaluate", JOB, "--storage", str(storage.root), "--datasets", str(datasets)]))
    assert str(path) in err and "layers/extra" in err


# 2. Paths in storage are names inside the job folder.


def test_a_record_holds_names_relative_to_its_job_folder_and_shows_them_absolute(tmp_path, capsys):
    storage = Storage(tmp_path)
    job_dir = storage.job_dir(JOB)
    job_folder(storage, model_path=str(job_dir / "model"), best_checkpoint=str(job_dir / "checkpoints/epoch-0002"),
                 tensorboard_logdir=str(job_dir / "tensorboard"),
                 checkpoints=[CheckpointEntry(epoch=2, path=str(job_dir / "checkpoints/epoch-0002"), value=0.5)])
    stored = json.loads((job_dir / "job.json").read_text())
    assert (stored["model_path"], stored["best_checkpoint"], stored["tensorboard_logdir"]) == (
        "model", "checkpoints/epoch-0002", "tensorboard")
    assert stored["checkpoints"][0]["path"] == "checkpoints/epoch-0002"
    assert str(tmp_path) not in (job_dir / "job.json").read_text()
    assert main(["status", JOB, "--storage", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_path"] == str(job_dir / "model")
    assert shown["best_checkpoint"] == str(job_dir / "checkpoints" / "epoch-0002")


def test_an_old_record_with_absolute_paths_inside_its_job_folder_is_read(tmp_path):
    storage = Storage(tmp_path)
    job_folder(storage)
    job_dir = storage.job_dir(JOB)
    raw = json.loads((job_dir / "job.json").read_text())
    raw.update(model_path=str(job_dir / "model"), checkpoints=[{"epoch": 1, "path": str(job_dir / "checkpoints/x")}])
    (job_dir / "job.json").write_text(json.dumps(raw))
    record = storage.read_record(JOB)
    assert record.model_path == str(job_dir / "model")
    assert record.checkpoints[0].path == str(job_dir / "checkpoints" / "x")


OUTSIDE = [("model_path", "/etc"), ("model_path", "../job-2/model"), ("best_checkpoint", "checkpoints/../../.."),
           ("tensorboard_logdir", "/tmp"), ("checkpoints", "/etc"), ("model_path", ""), ("model_path", "."),
           ("model_path", "model\0x")]


def crafted(storage: Storage, field: str, value: str) -> None:
    """Edit the job's record as someone with write access to the storage could."""
    path = storage.job_dir(JOB) / "job.json"
    raw = json.loads(path.read_text())
    raw[field] = [{"epoch": 1, "path": value}] if field == "checkpoints" else value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("field,value", OUTSIDE)
@pytest.mark.parametrize("verb", ["status", "evaluate", "resume"])
def test_a_record_naming_a_path_outside_its_job_folder_is_refused(tmp_path, capsys, field, value, verb):
    storage = Storage(tmp_path / "storage")
    job_folder(storage)
    storage.create_job_dir("job-2")
    crafted(storage, field, value)
    code = main([verb, JOB, "--storage", str(storage.root)])
    err = one_line_error(capsys, code)
    assert field in err and "job-1" in err
    assert main(["list", "--storage", str(storage.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # `list` leaves it out


@pytest.mark.parametrize("verb", ["status", "evaluate", "resume"])
def test_a_record_path_through_a_symlink_is_refused(tmp_path, capsys, verb, marker):
    storage = Storage(tmp_path / "storage")
    job_folder(storage)
    elsewhere = tmp_path / "elsewhere"
    write_hostile_keras(elsewhere / "model.keras", b"")
    (storage.job_dir(JOB) / "model").symlink_to(elsewhere)
    crafted(storage, "model_path", "model")
    err = one_line_error(capsys, main([verb, JOB, "--storage", str(storage.root)]))
    assert "symlink" in err and "model_path" in err
    assert not marker.exists()


def test_a_job_folder_that_is_a_symlink_is_refused(tmp_path, capsys):
    storage = Storage(tmp_path / "storage")
    job_folder(storage)
    os.rename(storage.job_dir(JOB), tmp_path / "moved")
    storage.job_dir(JOB).symlink_to(tmp_path / "moved")
    err = one_line_error(capsys, main(["status", JOB, "--storage", str(storage.root)]))
    assert "symlink" in err


def test_a_record_of_another_job_is_refused(tmp_path, capsys):
    storage = Storage(tmp_path)
    job_folder(storage)
    crafted(storage, "job_id", "job-2")  # its writes would land in another job's folder
    err = one_line_error(capsys, main(["status", JOB, "--storage", str(tmp_path)]))
    assert "'job-2'" in err


def test_stored_names_and_their_resolution(tmp_path):
    job_dir = tmp_path / "job-1"
    (job_dir / "checkpoints").mkdir(parents=True)
    assert stored_name(job_dir, job_dir / "checkpoints" / "epoch-0001") == "checkpoints/epoch-0001"
    assert stored_name(job_dir, "model") == "model"
    assert resolve_stored(job_dir, "checkpoints/./epoch-0001", "f") == job_dir / "checkpoints" / "epoch-0001"
    with pytest.raises(StorageError, match="outside the job folder"):
        stored_name(job_dir, "/etc")
    (job_dir / "checkpoints" / "link").symlink_to(job_dir / "checkpoints")
    with pytest.raises(StorageError, match="symlink"):
        resolve_stored(job_dir, "checkpoints/link/epoch-0001", "f")


# Checkpoint state files: names, never paths; retention deletes only the job's own folders.


def checkpoint_folder(storage: Storage, epoch: int, state: dict) -> Path:
    folder = storage.checkpoint_dir(JOB, epoch)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_a_checkpoints_state_names_its_folders_inside_the_job(tmp_path):
    storage = Storage(tmp_path)
    callback = Checkpoint(lambda epoch: storage.checkpoint_dir(JOB, epoch))
    storage.checkpoint_dir(JOB, 1).mkdir(parents=True)
    callback.on_checkpoint_saved(CheckpointRef(1, str(storage.checkpoint_dir(JOB, 1))))
    assert [entry["path"] for entry in callback.state_dict()["saved"]] == ["checkpoints/epoch-0001"]
    assert str(tmp_path) not in json.dumps(callback.state_dict())


def test_a_crafted_state_file_deletes_nothing_outside_the_job_on_resume(tmp_path):
    storage = Storage(tmp_path / "storage")
    job_folder(storage, state=JobState.FAILED)
    victims = [tmp_path / "victim", tmp_path / "epoch-0001", tmp_path / "storage" / "job-2"]
    for victim in victims:
        victim.mkdir()
        (victim / "precious").write_text("keep")
    saved = [{"epoch": 1, "path": str(victims[1]), "value": 0.1}, {"epoch": 2, "path": "checkpoints/epoch-0002"},
             {"epoch": 3, "path": "../../victim", "value": 0.3}, {"epoch": 4, "path": str(victims[2])}]
    checkpoint_folder(storage, 5, {"epoch": 5, "callbacks": {"Checkpoint": {
        "best": 0.1, "saved": saved, "pending": []}}})
    record, resume_from = reopen(storage, JOB)
    assert resume_from.epoch == 5
    callback = Checkpoint(lambda epoch: storage.checkpoint_dir(JOB, epoch), monitor="loss", keep=1)
    coordinator = Coordinator(record, storage, [callback])
    (storage.job_dir(JOB) / "checkpoints" / "epoch-0002").symlink_to(victims[0])  # listed, and planted now
    coordinator.roll_back(resume_from)
    checkpoint_folder(storage, 6, {"epoch": 6, "callbacks": {}})
    coordinator.on_checkpoint_saved(CheckpointRef(6, str(storage.checkpoint_dir(JOB, 6))))  # retention runs
    for victim in victims:
        assert (victim / "precious").read_text() == "keep"
    assert [entry["epoch"] for entry in callback.saved] == [6]


@pytest.mark.parametrize("state", [
    {"best": "low", "saved": [], "pending": []},
    {"best": 0.1, "saved": {}, "pending": []},
    {"best": 0.1, "saved": [], "pending": [["1", 0.2]]},
    {"best": 0.1, "saved": []},
])
def test_a_checkpoint_state_of_the_wrong_kinds_is_a_storage_error(tmp_path, state):
    callback = Checkpoint(lambda epoch: tmp_path / f"epoch-{epoch}")
    with pytest.raises(StorageError, match="Checkpoint"):
        callback.load_state_dict(state)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"epoch": "5", "callbacks": {}}',
                                  '{"epoch": 5, "callbacks": {"Checkpoint": 3}}', '{"epoch": 5}'])
def test_a_corrupt_state_file_is_a_storage_error_naming_it(tmp_path, text):
    folder = tmp_path / "epoch-0005"
    folder.mkdir()
    (folder / "state.json").write_text(text)
    with pytest.raises(StorageError, match=str(folder / "state.json")):
        Storage.read_checkpoint_state(folder)


# 3. Corrupt records and histories: one line, exit 2.


def corrupt_record(job_dir: Path, kind: str, tmp_path: Path) -> None:
    path = job_dir / "job.json"
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01garbage}{\n" * 8)
    elif kind == "not utf-8":
        path.write_bytes(b'{"job_id": "\xff\xfe"}')
    elif kind == "wrong types":
        path.write_text(json.dumps({"job_id": JOB, "name": ["x"], "workers": "two", "spec": 3}))
    elif kind == "a list":
        path.write_text("[]")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a device":
        path.symlink_to("/dev/zero")
    elif kind == "too large":
        with open(path, "wb") as handle:
            handle.truncate(folders.RECORD_LIMIT + 1)


@pytest.mark.parametrize("kind", ["folder", "garbage", "not utf-8", "wrong types", "a list", "fifo",
                                  "symlink to a device", "too large"])
@pytest.mark.parametrize("verb", ["status", "evaluate", "resume"])
def test_a_corrupt_record_is_one_line_and_exit_2(tmp_path, capsys, kind, verb):
    storage = Storage(tmp_path / "storage")
    job_folder(storage)
    corrupt_record(storage.job_dir(JOB), kind, tmp_path)
    err = one_line_error(capsys, main([verb, JOB, "--storage", str(storage.root)]))
    assert "job-1" in err
    assert main(["list", "--storage", str(storage.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("lines", [['{"epoch": 1}', "garbage", '{"epoch": 3}'], ['{"epoch": 1}', "[1, 2]", ""],
                                   ['{"loss": 0.5}', ""], ['{"epoch": 1, "loss": "low"}', ""]])
def test_a_corrupt_history_is_a_storage_error_and_resume_refuses_it(tmp_path, capsys, lines):
    storage = Storage(tmp_path / "storage")
    job_folder(storage, state=JobState.FAILED)
    (storage.job_dir(JOB) / "history.jsonl").write_text("\n".join(lines))
    with pytest.raises(StorageError, match="history of job 'job-1'"):
        storage.read_record(JOB, history=True)
    err = one_line_error(capsys, main(["resume", JOB, "--storage", str(storage.root)]))
    assert "history" in err


def test_a_history_line_cut_short_by_a_crash_is_left_out(tmp_path):
    storage = Storage(tmp_path)
    job_folder(storage)
    (storage.job_dir(JOB) / "history.jsonl").write_text('{"epoch": 1, "loss": NaN}\n{"epoch": 2, "lo')
    assert [entry["epoch"] for entry in storage.read_history(JOB)] == [1]


def test_reading_storage_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # read without the check, this would wait forever
    with pytest.raises(StorageError, match="not a regular file"):
        read_stored_text(tmp_path / "fifo", 100, "a record")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(StorageError, match="symlink"):
        read_stored_text(tmp_path / "link", 100, "a record")


@pytest.mark.parametrize("planted", ["heartbeat.json", "lease.json", "lease.lock", "stop.json"])
def test_status_and_cancel_wait_on_no_fifo_in_the_job_folder(tmp_path, planted):
    storage = Storage(tmp_path)
    job_folder(storage, state=JobState.RUNNING, driver_pid=1, driver_host="elsewhere")
    os.mkfifo(storage.job_dir(JOB) / planted)  # opened without the checks, each of these would wait forever
    code = ("import sys; from orchestra import Client; c = Client(storage=sys.argv[1]); "
            "print(c.status(sys.argv[2]).state.value); c._jobs._stop_heard = lambda job_id: True; "
            "c._jobs.cancel(sys.argv[2])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path), JOB], capture_output=True, text=True,
                            timeout=120)  # a bound on a hang, not a measurement
    assert result.returncode == 0 and result.stdout.split() == ["RUNNING"], result.stderr


# 4. Publishing switches; crashed writers' leftovers are swept.


def complete(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(tag)
    return folder


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic switch", "step aside"])
def test_publishing_over_a_checkpoint_keeps_a_complete_one_at_every_moment(tmp_path, monkeypatch, exchange):
    final = complete(tmp_path / "checkpoints" / "epoch-0002", "old")
    staging = complete(tmp_path / "checkpoints" / ".staging-epoch-0002-7", "new")
    seen = []

    def complete_one() -> bool:
        """A complete checkpoint of epoch 2 is in place, or set aside where a sweep puts it back."""
        aside = list(final.parent.glob(".old-epoch-0002-*"))
        return (final / "state.json").is_file() or any((a / "state.json").is_file() for a in aside)

    real_replace, real_rmtree, real_exchange = os.replace, folders.shutil.rmtree, folders._exchange

    def watched(call):
        def run(*args, **kwargs):
            seen.append(complete_one())
            result = call(*args, **kwargs)
            seen.append(complete_one())
            return result
        return run

    monkeypatch.setattr(folders.os, "replace", watched(real_replace))
    monkeypatch.setattr(folders.shutil, "rmtree", watched(real_rmtree))
    monkeypatch.setattr(folders, "_exchange", watched(real_exchange if exchange else lambda a, b: False))
    publish_directory(staging, final)
    assert seen and all(seen)
    assert (final / "state.json").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["epoch-0002"]


def test_a_publish_cut_between_its_two_renames_is_put_back_by_the_sweep(tmp_path):
    storage = Storage(tmp_path)
    checkpoints = storage.job_dir(JOB) / "checkpoints"
    complete(checkpoints / ".old-epoch-0002-4242", "old")  # set aside; the driver died before the new one came
    complete(checkpoints / ".staging-epoch-0002-4242", "half")
    complete(checkpoints / ".old-epoch-0001-4242", "stale")  # epoch-0001 is there: this one is just removed
    complete(checkpoints / "epoch-0001", "kept")
    complete(storage.job_dir(JOB) / ".staging-model-99", "half")
    assert sorted(storage.sweep_staging(JOB)) == [".old-epoch-0001-4242", ".old-epoch-0002-4242",
                                                  ".staging-epoch-0002-4242", ".staging-model-99"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001", "epoch-0002"]
    assert (checkpoints / "epoch-0002" / "state.json").read_text() == "old"
    assert (checkpoints / "epoch-0001" / "state.json").read_text() == "kept"
    assert sorted(p.name for p in storage.job_dir(JOB).iterdir()) == ["checkpoints"]


def test_the_sweep_removes_a_symlink_and_never_what_it_points_to(tmp_path):
    storage = Storage(tmp_path / "storage")
    outside = complete(tmp_path / "outside", "precious")
    (storage.job_dir(JOB) / "checkpoints").mkdir(parents=True)
    (storage.job_dir(JOB) / "checkpoints" / ".staging-epoch-0003-1").symlink_to(outside)
    (storage.job_dir(JOB) / ".old-model-1").symlink_to(outside)
    storage.sweep_staging(JOB)
    assert (outside / "state.json").read_text() == "precious"
    assert sorted(p.name for p in storage.job_dir(JOB).rglob("*")) == ["checkpoints"]


def test_resume_sweeps_staging_folders_before_finding_its_checkpoint(tmp_path):
    storage = Storage(tmp_path)
    job_folder(storage, state=JobState.STOPPED)
    checkpoint_folder(storage, 1, {"epoch": 1, "callbacks": {}})
    checkpoints = storage.job_dir(JOB) / "checkpoints"
    checkpoint_folder(storage, 2, {"epoch": 2, "callbacks": {}}).rename(checkpoints / ".old-epoch-0002-77")
    complete(checkpoints / ".staging-epoch-0003-77", "half")
    _, resume_from = reopen(storage, JOB)
    assert resume_from.epoch == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001", "epoch-0002"]


def test_a_planted_staging_symlink_takes_no_write_outside_the_job(tmp_path):
    from orchestra.worker.saving import _write_published

    outside = tmp_path / "outside"
    outside.mkdir()
    final = tmp_path / "job-1" / "checkpoints" / "epoch-0001"
    final.parent.mkdir(parents=True)
    (final.parent / f".staging-epoch-0001-{os.getpid()}").symlink_to(outside)
    _write_published(final, lambda staging: (staging / "model.weights.h5").write_text("w"), {"epoch": 1}, None)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in final.iterdir()) == ["model.weights.h5", "state.json"]
    link = tmp_path / "job-2" / "checkpoints"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(StorageWriteError, match="symlink"):
        _write_published(link / "epoch-0001", lambda staging: None, {"epoch": 1}, None)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("linked", ["checkpoints", "checkpoints/epoch-0009", "checkpoints/epoch-0009/state.json"])
def test_resume_refuses_a_symlinked_checkpoint(tmp_path, linked):
    storage = Storage(tmp_path / "storage")
    job_folder(storage, state=JobState.STOPPED)
    elsewhere = complete(tmp_path / "elsewhere" / "checkpoints" / "epoch-0009", "{}").parent.parent
    (storage.job_dir(JOB) / linked).parent.mkdir(parents=True, exist_ok=True)
    (storage.job_dir(JOB) / linked).symlink_to(elsewhere / linked)
    with pytest.raises(StorageError, match="symlink"):
        reopen(storage, JOB)
    assert storage.read_record(JOB).state is JobState.STOPPED


@pytest.mark.integration
def test_a_real_jobs_record_and_checkpoint_states_name_no_path(finished_job):
    """What a real run writes: names inside the job folder, shown absolute."""
    storage, job_id = finished_job["storage"], finished_job["job_id"]
    job_dir = storage / job_id
    record = json.loads((job_dir / "job.json").read_text())
    assert record["model_path"] == "model" and record["tensorboard_logdir"] == "tensorboard"
    assert record["best_checkpoint"].startswith("checkpoints/epoch-")
    assert [entry["path"] for entry in record["checkpoints"]] == [
        f"checkpoints/{p.name}" for p in sorted((job_dir / "checkpoints").iterdir())]
    states = [path.read_text() for path in job_dir.glob("checkpoints/epoch-*/state.json")]
    record.pop("spec")  # the spec as submitted: its `storage` is the user's, never read back
    assert states and all(str(storage) not in text for text in [json.dumps(record), *states])
    status = finished_job["status"]
    assert (status["model_path"], status["best_checkpoint"]) == (
        str(job_dir / "model"), str(job_dir / record["best_checkpoint"]))
