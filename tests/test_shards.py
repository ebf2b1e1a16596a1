"""Sharded sources (`data.shards`, `orchestra data convert`): the converter's
round trip, manifests as hostile input, the npy shards' global batches
against the in-memory path's, the TFRecord stream's stated guarantee,
pre-flight from the manifest, and a 2-worker job on each format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import read_job, run_cli, write_spec

from orchestra.build import data as data_lib
from orchestra.build import shards
from orchestra.cli import main as cli_main
from orchestra.errors import FieldError, SpecError
from orchestra.spec import DataSpec, JobSpec, parse_spec
from orchestra.tools.convert import convert

N_TRAIN, N_TEST, SHAPE = 203, 37, (4, 3)


def toy_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Examples whose first value is their own index: a batch says which examples it holds."""
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (N_TRAIN, *SHAPE), dtype=np.uint8)
    x_train[:, 0, 0] = np.arange(N_TRAIN) % 256
    x_train[:, 0, 1] = np.arange(N_TRAIN) // 256
    return {"x_train": x_train, "y_train": (np.arange(N_TRAIN) % 5).astype(np.uint8),
            "x_test": rng.integers(0, 256, (N_TEST, *SHAPE), dtype=np.uint8),
            "y_test": (np.arange(N_TEST) % 5).astype(np.uint8)}


@pytest.fixture
def toy_npz(tmp_path) -> Path:
    path = tmp_path / "toy.npz"
    np.savez(path, **toy_arrays())
    return path


def converted(tmp_path: Path, npz: Path, fmt: str, n: int = 4, name: str | None = None) -> Path:
    dest = tmp_path / (name or f"toy-{fmt}")
    convert(str(npz), dest, fmt, n)
    return dest


def ids(x: np.ndarray) -> list[int]:
    """The example indices a batch of toy examples holds (rescaled by 1/255 or not)."""
    raw = np.rint(np.asarray(x).reshape(len(x), -1)[:, :2] * (255 if np.asarray(x).max() <= 1 else 1))
    return (raw[:, 0] + 256 * raw[:, 1]).astype(int).tolist()


def data_spec(**fields) -> DataSpec:
    return DataSpec.model_validate(fields)


# The converter.

@pytest.mark.parametrize("fmt", ["npy", "tfrecord"])
def test_convert_round_trip_keeps_every_example_and_describes_it(tmp_path, toy_npz, fmt):
    dest = converted(tmp_path, toy_npz, fmt, n=4)
    manifest = shards.read_manifest(dest)
    raw = toy_arrays()
    assert manifest.shard_format == fmt and manifest.classes == ["0", "1", "2", "3", "4"]
    assert tuple(manifest.x.shape) == SHAPE and manifest.x.dtype == "uint8" and manifest.y_dtype == "uint8"
    assert {name: split.count for name, split in manifest.splits.items()} == {"train": N_TRAIN, "test": N_TEST}
    assert [s.count for s in manifest.splits["train"].shards] == [50, 51, 51, 51]
    shards.check_files(dest, manifest, checksums=True)
    spec = data_spec(shards={"path": str(dest), "format": fmt}, test=True)
    train, _, test, _ = shards.open_examples(spec, tmp_path)
    if fmt == "npy":
        x, y = train.split.read(np.arange(N_TRAIN)), train.split.labels
    else:
        import tensorflow as tf

        batches = list(tf.data.TFRecordDataset(train.files).batch(1000).map(train.parse))
        x, y = np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(np.asarray(x).reshape(N_TRAIN, *SHAPE), raw["x_train"])
    np.testing.assert_array_equal(y, raw["y_train"])
    assert len(test) == N_TEST
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_checksums_find_a_changed_byte(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "npy")
    manifest = shards.read_manifest(dest)
    victim = dest / manifest.splits["train"].shards[2].x.path
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    shards.check_files(dest, manifest)  # sizes still match
    with pytest.raises(FieldError, match="SHA-256"):
        shards.check_files(dest, manifest, checksums=True)


def test_convert_refuses_a_used_destination_and_leaves_nothing_on_failure(tmp_path, toy_npz):
    dest = tmp_path / "used"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FieldError, match="not an empty folder"):
        convert(str(toy_npz), dest, "npy", 2)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    bad = tmp_path / "floats.npz"
    np.savez(bad, x_train=np.zeros((5, 2), np.float32), y_train=np.linspace(0, 1, 5))  # regression targets
    with pytest.raises(FieldError, match="one integer class"):
        convert(str(bad), tmp_path / "out", "npy", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["floats.npz", "toy.npz", "used"]


def test_cli_converts_and_reports_bad_input_in_one_line(tmp_path, toy_npz, capsys):
    assert cli_main(["data", "convert", str(toy_npz), str(tmp_path / "out"), "--format", "tfrecord",
                     "--shards", "3"]) == 0
    assert "train: 203 examples in 3 shards" in capsys.readouterr().out
    assert cli_main(["data", "convert", "nosuch", str(tmp_path / "x"), "--format", "npy", "--shards", "2",
                     "--datasets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orchestra: SRC: 'nosuch' is neither") and "\n" not in err


def test_cli_reports_a_bad_image_size_and_an_unwritable_destination_in_one_line(tmp_path, toy_npz, capsys):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    assert cli_main(["data", "convert", str(tmp_path / "tree"), str(tmp_path / "x"), "--format", "npy",
                     "--shards", "1", "--target-size", "0", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orchestra: --target-size: ") and "\n" not in err
    (tmp_path / "locked").write_text("a file, so nothing can be made below it")
    assert cli_main(["data", "convert", str(toy_npz), str(tmp_path / "locked" / "out"), "--format", "npy",
                     "--shards", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orchestra: DEST: cannot write ") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "toy.npz", "tree"]


def test_an_image_folder_becomes_shards_with_its_class_names(tmp_path):
    from PIL import Image

    for name, shade in (("cat", 10), ("dog", 200)):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (9, 7), (shade, i, 0)).save(tmp_path / "tree" / name / f"{i}.png")
    manifest = convert(str(tmp_path / "tree"), tmp_path / "out", "npy", 2, target_size=(5, 6))
    assert manifest.classes == ["cat", "dog"] and manifest.x.shape == [5, 6, 3]
    split = shards.NpySplit(tmp_path / "out", manifest, manifest.splits["train"])
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.read(np.array([4]))[0, 0, 0].tolist() == [200, 1, 0]


# Manifests are input.

def rewrite(dest: Path, change) -> None:
    manifest = json.loads((dest / shards.MANIFEST).read_text())
    change(manifest)
    (dest / shards.MANIFEST).write_text(json.dumps(manifest))


def first_x(manifest: dict) -> dict:
    return manifest["splits"]["train"]["shards"][0]["x"]


HOSTILE = {
    "parent path": (lambda m: first_x(m).update(path="../toy.npz"), "relative paths inside"),
    "absolute path": (lambda m: first_x(m).update(path="/etc/passwd"), "relative paths inside"),
    "huge count": (lambda m: m["splits"]["train"].update(count=10**12), "less than or equal to 2147483647"),
    "counts that do not add up": (lambda m: m["splits"]["train"].update(count=N_TRAIN + 1), "add up to 203"),
    "object dtype": (lambda m: m["x"].update(dtype="object"), "x.dtype"),
    "huge example": (lambda m: m["x"].update(shape=[2**20, 2**20]), "more than"),
    "unknown field": (lambda m: m.update(code="import os"), "code"),
    "wrong size": (lambda m: first_x(m).update(bytes=first_x(m)["bytes"] + 1), "the manifest says"),
    "dtype unlike the file's": (lambda m: m["x"].update(dtype="int8"), "holds uint8"),
    "too few classes": (lambda m: m.update(classes=["a", "b"]), "labels go from 0 to 4"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_manifest_is_refused_naming_the_field(tmp_path, toy_npz, case):
    dest = converted(tmp_path, toy_npz, "npy")
    change, message = HOSTILE[case]
    rewrite(dest, change)
    with pytest.raises(FieldError, match=message) as info:
        shards.open_examples(data_spec(shards={"path": str(dest), "format": "npy"}), tmp_path)
    assert info.value.field == "data.shards.path"


def test_symlinks_out_of_the_folder_are_refused(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "npy")
    manifest = shards.read_manifest(dest)
    name = manifest.splits["train"].shards[0].x.path
    outside = tmp_path / "elsewhere.npy"
    os.rename(dest / name, outside)
    (dest / name).symlink_to(outside)
    spec = data_spec(shards={"path": str(dest), "format": "npy"})
    with pytest.raises(FieldError, match="symlink"):
        shards.open_examples(spec, tmp_path)
    (dest / name).unlink()
    os.rename(outside, dest / name)
    (tmp_path / "sub").symlink_to(dest)  # a folder link inside the path the manifest names
    rewrite(dest, lambda m: first_x(m).update(path=f"../sub/{name}"))
    with pytest.raises(FieldError, match="relative paths inside"):
        shards.open_examples(spec, tmp_path)
    (dest / "linked").symlink_to(tmp_path)
    rewrite(dest, lambda m: first_x(m).update(path=f"linked/{dest.name}/{name}"))
    with pytest.raises(FieldError, match="passes through the symlink"):
        shards.open_examples(spec, tmp_path)


def test_a_manifest_that_is_a_fifo_or_too_big_is_refused_without_waiting(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "npy")
    manifest = dest / shards.MANIFEST
    manifest.write_text(" " * (shards.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(FieldError, match="more than"):
        shards.read_manifest(dest)
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(FieldError, match="not a regular file"):
        shards.read_manifest(dest)


def test_the_spec_takes_exactly_one_source_and_no_index_options_on_a_stream():
    with pytest.raises(ValueError, match="exactly one of source"):
        data_spec(source="mnist", shards={"path": "x", "format": "npy"})
    with pytest.raises(ValueError, match="validation_split needs reading by index.*--validation-split F"):
        data_spec(shards={"path": "x", "format": "tfrecord"}, validation_split=0.2)
    with pytest.raises(ValueError, match="test_size needs reading by index"):  # it would be ignored
        data_spec(shards={"path": "x", "format": "tfrecord"}, test_size=100)
    assert data_spec(shards={"path": "x", "format": "npy"}, validation_split=0.2).has_validation


# A validation split written by the converter, or the test split, as the validation set.

def test_the_converters_validation_split_is_the_one_a_job_would_draw(tmp_path, toy_npz, capsys):
    fields = dict(rescale="1/255", flatten=True, seed=9)
    arrays = data_lib.prepare(data_spec(source=str(toy_npz), validation_split=0.2, **fields), toy_npz, tmp_path)
    for fmt in ("npy", "tfrecord"):
        dest = tmp_path / f"split-{fmt}"
        manifest = convert(str(toy_npz), dest, fmt, 3, validation_split=0.2, seed=9)
        assert [manifest.splits[name].count for name in ("train", "validation", "test")] == [162, 41, N_TEST]
        spec = data_spec(shards={"path": str(dest), "format": fmt}, validation="split", **fields)
        assert spec.has_validation
        train, validation, _, _ = shards.open_examples(spec, tmp_path)
        if fmt == "npy":
            np.testing.assert_array_equal(npy_batches(train, 2, epochs=1)[3][0],
                                          npy_batches(data_lib.ArrayExamples(arrays.x_train, arrays.y_train), 1,
                                                      epochs=1)[3][0])
            x_val, y_val = validation.load_batch(np.arange(len(validation)))
        else:
            x_val, y_val = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in
                                                                    validation.evaluation_pipeline(
                                                                        per_worker_batch=8, rank=0, world_size=1)]))
        np.testing.assert_array_equal(x_val, arrays.x_val)  # the same examples, in the same order
        np.testing.assert_array_equal(y_val, arrays.y_val)
    assert cli_main(["data", "convert", str(toy_npz), str(tmp_path / "bad"), "--format", "npy", "--shards", "2",
                     "--validation-split", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orchestra: --validation-split: 1.5: give a fraction") and "\n" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("fmt", ["npy", "tfrecord"])
def test_validation_test_is_the_manifests_test_split(tmp_path, toy_npz, fmt):
    dest = converted(tmp_path, toy_npz, fmt, n=3)
    spec = data_spec(shards={"path": str(dest), "format": fmt}, validation="test", flatten=True)
    assert spec.has_validation
    _, validation, test, _ = shards.open_examples(spec, tmp_path)
    assert len(validation) == len(test) == N_TEST
    if fmt == "npy":
        everything = np.arange(N_TEST)
        np.testing.assert_array_equal(validation.load_batch(everything)[0], test.load_batch(everything)[0])
    else:
        assert validation.files == test.files
    with pytest.raises(FieldError, match="has no validation split: convert with --validation-split") as info:
        shards.open_examples(data_spec(shards={"path": str(dest), "format": fmt}, validation="split"), tmp_path)
    assert info.value.field == "data.validation"
    with pytest.raises(ValueError, match="'test' and an .npz go with data.source"):
        data_spec(shards={"path": str(dest), "format": fmt}, validation="other.npz")


# npy: the same global batches as the in-memory path.

def npy_batches(examples, world_size: int, epochs: int = 2, global_batch: int = 12) -> list[list[int]]:
    steps = data_lib.steps_per_epoch(len(examples), global_batch)
    per_rank = []
    for rank in range(world_size):
        dataset = shards.training_pipeline(
            examples, global_batch=global_batch, rank=rank, world_size=world_size, shuffle=True, seed=3,
            initial_epoch=0, class_weight=None, parallel_calls=2, prefetch=1)
        per_rank.append([(x.numpy(), y.numpy()) for x, y in dataset.take(steps * epochs)])
    return [(np.concatenate([r[k][0] for r in per_rank]), np.concatenate([r[k][1] for r in per_rank]))
            for k in range(steps * epochs)]


def test_npy_global_batches_are_the_in_memory_paths_on_1_or_n_workers(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "npy", n=5)
    fields = dict(rescale="1/255", flatten=True, labels="one_hot", validation_size=40, train_size=150, seed=9)
    spec = data_spec(shards={"path": str(dest), "format": "npy"}, **fields)
    train, validation, test, shape = shards.open_examples(spec, tmp_path)
    arrays = data_lib.prepare(data_spec(source=str(toy_npz), **fields), toy_npz, tmp_path)
    assert shape == arrays.input_shape == (12,)
    in_memory = npy_batches(data_lib.ArrayExamples(arrays.x_train, arrays.y_train), 1)
    for world_size in (1, 2, 3):
        got = npy_batches(train, world_size)
        assert len(got) == len(in_memory) == 24
        for (x, y), (x_ref, y_ref) in zip(got, in_memory):
            np.testing.assert_array_equal(x, x_ref)
            np.testing.assert_array_equal(y, y_ref)
    assert ids(in_memory[0][0]) != ids(in_memory[12][0])  # reshuffled each epoch
    x_val, y_val = validation.load_batch(np.arange(len(validation)))
    np.testing.assert_array_equal(x_val, arrays.x_val)
    np.testing.assert_array_equal(y_val, arrays.y_val)
    np.testing.assert_array_equal(test.load_batch(np.arange(len(test)))[0], arrays.x_test)


def test_npy_shards_are_read_by_index_never_mapped(tmp_path, toy_npz):
    """Rows are copied out with positional reads: no shard file is mapped
    into the process (mapped pages would count in its resident memory)."""
    dest = converted(tmp_path, toy_npz, "npy", n=3)
    train, *_ = shards.open_examples(data_spec(shards={"path": str(dest), "format": "npy"}), tmp_path)
    wanted = np.array([202, 0, 5, 6, 7, 101, 5])  # runs, repeats, every shard, out of order
    np.testing.assert_array_equal(train.split.read(wanted), toy_arrays()["x_train"][wanted])
    assert str(dest) not in Path("/proc/self/maps").read_text()


# tfrecord: what the stream guarantees.

def stream_epochs(examples, rank: int, world_size: int, epochs: int = 2, shuffle: bool = True, seed: int = 3,
                  global_batch: int = 10) -> list[list[int]]:
    steps = examples.steps_per_epoch(global_batch, world_size)
    dataset = examples.training_pipeline(global_batch=global_batch, rank=rank, world_size=world_size,
                                         shuffle=shuffle, seed=seed, initial_epoch=0, class_weight=None,
                                         parallel_calls=2, prefetch=1)
    batches = [ids(x.numpy()) for x, _ in dataset.take(steps * epochs)]
    return [sum(batches[e * steps:(e + 1) * steps], []) for e in range(epochs)]


def file_ids(examples, files: list[str]) -> list[list[int]]:
    import tensorflow as tf

    return [sum((ids(x.numpy()) for x, _ in tf.data.TFRecordDataset(f).batch(100).map(examples.parse)), [])
            for f in files]


def test_tfrecord_stream_keeps_its_stated_guarantee(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "tfrecord", n=5)
    spec = data_spec(shards={"path": str(dest), "format": "tfrecord", "shuffle_buffer": 16})
    train, validation, _, _ = shards.open_examples(spec, tmp_path)
    assert validation is None
    contents = file_ids(train, train.files)
    per_worker = 5
    steps = min(sum(len(contents[i]) for i in range(r, 5, 2)) for r in range(2)) // per_worker
    assert train.steps_per_epoch(10, 2) == steps == 16
    seen = []
    for rank in range(2):
        own = set(sum(contents[rank::2], []))  # worker r reads files r, r+2, ...
        epochs = stream_epochs(train, rank, 2)
        for epoch in epochs:
            assert len(epoch) == len(set(epoch)) == steps * per_worker  # each example at most once an epoch
            assert set(epoch) <= own
        assert epochs[0] != epochs[1]                                     # reshuffled each epoch
        assert stream_epochs(train, rank, 2) == epochs                    # the same seed, the same batches
        assert stream_epochs(train, rank, 2, seed=4) != epochs
        seen.append(set(epochs[0]))
    assert not seen[0] & seen[1]


def test_tfrecord_file_order_is_seeded_and_the_buffer_is_the_only_other_shuffle(tmp_path, toy_npz):
    """With a buffer of 1 example, each file's records come in the file's
    order, and only the order of the files changes between epochs; with
    a larger buffer, records are shuffled within files too."""
    dest = converted(tmp_path, toy_npz, "tfrecord", n=4)
    train, *_ = shards.open_examples(
        data_spec(shards={"path": str(dest), "format": "tfrecord", "shuffle_buffer": 1}), tmp_path)
    contents = file_ids(train, train.files)
    file_of = {example: i for i, examples in enumerate(contents) for example in examples}

    def file_order(epoch: list[int]) -> list[int]:
        order = []
        for example in epoch:
            if file_of[example] not in order:
                order.append(file_of[example])
        return order

    epochs = stream_epochs(train, 0, 1, epochs=4, global_batch=8)
    for epoch in epochs:
        for examples in contents:  # records of a file keep their order
            assert [e for e in epoch if e in set(examples)] == examples[: len([e for e in epoch if e in set(examples)])]
    assert len({tuple(file_order(epoch)) for epoch in epochs}) > 1  # the file order is drawn each epoch
    assert stream_epochs(train, 0, 1, epochs=4, global_batch=8) == epochs
    unshuffled = stream_epochs(train, 0, 1, epochs=2, shuffle=False, global_batch=8)
    assert unshuffled[0] == unshuffled[1] and file_order(unshuffled[0]) == [0, 1, 2, 3]
    window = 16  # with a larger buffer: each window of the same stream, permuted
    buffered, *_ = shards.open_examples(
        data_spec(shards={"path": str(dest), "format": "tfrecord", "shuffle_buffer": window}), tmp_path)
    shuffled = stream_epochs(buffered, 0, 1, epochs=4, global_batch=8)
    for epoch, stream in zip(shuffled, epochs):
        assert epoch != stream
        full = len(epoch) // window * window
        for start in range(0, full, window):
            assert sorted(epoch[start:start + window]) == sorted(stream[start:start + window])


def test_tfrecord_batches_do_not_depend_on_the_global_seed(tmp_path, toy_npz):
    """Workers set TensorFlow's global seed from the job's; seed 0 once broke a seeded shuffle."""
    import tensorflow as tf

    dest = converted(tmp_path, toy_npz, "tfrecord", n=4)
    train, *_ = shards.open_examples(data_spec(shards={"path": str(dest), "format": "tfrecord"}), tmp_path)
    unseeded = stream_epochs(train, 0, 2, seed=0)
    try:
        tf.random.set_seed(0)
        assert stream_epochs(train, 0, 2, seed=0) == unseeded
    finally:
        tf.random.set_seed(None)


def test_tfrecord_evaluation_covers_every_test_example_once(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "tfrecord", n=5)
    _, _, test, _ = shards.open_examples(data_spec(shards={"path": str(dest), "format": "tfrecord"}), tmp_path)
    for world_size, batch in ((1, 8), (2, 5), (3, 4)):
        steps = test.evaluation_steps(batch, world_size)
        labels = []
        for rank in range(world_size):
            got = list(test.evaluation_pipeline(per_worker_batch=batch, rank=rank, world_size=world_size))
            assert len(got) == steps and all(len(y) for _, y in got)
            labels += [int(v) for _, y in got for v in y.numpy()]
        assert len(labels) == N_TEST and np.bincount(labels).tolist() == np.bincount(toy_arrays()["y_test"]).tolist()


def test_more_workers_than_tfrecord_files_is_a_clear_error(tmp_path, toy_npz):
    dest = converted(tmp_path, toy_npz, "tfrecord", n=2)
    train, *_ = shards.open_examples(data_spec(shards={"path": str(dest), "format": "tfrecord"}), tmp_path)
    with pytest.raises(FieldError, match="2 TFRecord shard files cannot feed 3 workers"):
        train.steps_per_epoch(9, 3)


# Pre-flight reads the manifest and a few examples.

def job(dest: Path, fmt: str, **data) -> dict:
    return {
        "name": f"sharded_{fmt}", "seed": 1,
        "data": {"shards": {"path": str(dest), "format": fmt}, "rescale": "1/255", "flatten": True, **data},
        "model": {"layers": [{"type": "Dense", "units": 16, "activation": "relu"},
                             {"type": "Dense", "units": 5, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 2, "batch_size": 20},
        "scaling": {"workers": 2},
    }


@pytest.mark.parametrize("fmt", ["npy", "tfrecord"])
def test_preflight_checks_shapes_and_labels_from_the_manifest(tmp_path, toy_npz, fmt, monkeypatch):
    from orchestra.driver.preflight import preflight

    dest = converted(tmp_path, toy_npz, fmt, n=4)
    monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: pytest.fail("pre-flight loaded the whole set"))
    prepared = preflight(JobSpec.model_validate(job(dest, fmt)), storage=str(tmp_path / "storage"),
                         check_cluster=False)
    assert prepared.input_shape == (12,)
    assert prepared.examples_dropped_per_epoch == (3 if fmt == "npy" else N_TRAIN - 2 * 10 * (100 // 10))
    narrow = job(dest, fmt)
    narrow["model"]["layers"][-1]["units"] = 3
    with pytest.raises(SpecError) as info:
        preflight(JobSpec.model_validate(narrow), storage=str(tmp_path / "storage"), check_cluster=False)
    assert "labels go up to 4" in str(info.value)
    wrong = job(dest, "tfrecord" if fmt == "npy" else "npy")
    with pytest.raises(SpecError, match=f"holds '{fmt}' shards"):
        preflight(JobSpec.model_validate(wrong), storage=str(tmp_path / "storage"), check_cluster=False)
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").iterdir())


def test_a_relative_shards_path_is_looked_up_in_the_datasets_folder(tmp_path, toy_npz):
    converted(tmp_path, toy_npz, "npy", name="toy-shards")
    spec = parse_spec(json.dumps(job(Path("toy-shards"), "npy")))
    assert shards.dataset_folder(spec.data, tmp_path) == tmp_path / "toy-shards"
    with pytest.raises(FieldError, match="elsewhere/toy-shards does not exist: make the shards"):
        shards.open_examples(spec.data, tmp_path / "elsewhere")


# A real 2-worker job on each format.

@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["npy", "tfrecord"])
def test_a_two_worker_job_trains_on_shards(tmp_path, toy_npz, fmt):
    dest = converted(tmp_path, toy_npz, fmt, n=4)
    spec = job(dest, fmt, **({"validation_split": 0.2} if fmt == "npy" else {"validation": "test"}))
    path = write_spec(tmp_path / "job.json", spec)
    result = run_cli("submit", path, "--storage", tmp_path / "storage", "--datasets", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    record = read_job(tmp_path / "storage" / job_id)
    assert record["state"] == "SUCCEEDED" and record["workers"] == 2
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert all(h["worker_peak_rss_mb"] > 0 for h in record["history"])
    assert all("val_loss" in h and "val_accuracy" in h for h in record["history"])  # tfrecord: on the test split
    assert record["test_metrics"]["accuracy"] >= 0


@pytest.mark.parametrize("fmt", ["npy", "tfrecord"])
def test_evaluate_reads_the_test_shards(tmp_path, toy_npz, fmt):
    from orchestra.client.inference import evaluation_arrays

    dest = converted(tmp_path, toy_npz, fmt, n=3)
    x, y, which = evaluation_arrays(data_spec(shards={"path": str(dest), "format": fmt}, flatten=True), tmp_path)
    assert which == "test" and x.shape == (N_TEST, 12)
    np.testing.assert_array_equal(x, toy_arrays()["x_test"].reshape(N_TEST, 12).astype(np.float32))
    np.testing.assert_array_equal(y, toy_arrays()["y_test"])
    x, y, which = evaluation_arrays(data_spec(shards={"path": str(dest), "format": fmt}, test=False), tmp_path)
    assert which == "training" and len(x) == N_TRAIN


def test_convert_refuses_more_shards_than_a_manifest_can_name_and_other_schemes_before_reading(tmp_path):
    from orchestra.tools.convert import MAX_SHARDS_WRITTEN

    with pytest.raises(FieldError, match=f"^{MAX_SHARDS_WRITTEN + 1}: at most 10,000 a split") as too_many:
        convert("no-such-source", tmp_path / "d", "npy", MAX_SHARDS_WRITTEN + 1)
    with pytest.raises(FieldError, match="^'gs://bucket/x' is not a place orchestra writes shards to") as scheme:
        convert("no-such-source", "gs://bucket/x", "npy", 2)
    assert (too_many.value.field, scheme.value.field) == ("--shards", "DEST")
    assert list(tmp_path.iterdir()) == []
