"""`orchestra data convert`: a dataset written as shards and a manifest.

A Keras dataset name, an `.npz` of Keras's arrays or a class-per-subfolder
image folder becomes a folder of shard files (`npy` pairs or `tfrecord`
files, as `orchestra.build.shards` reads them) and a `manifest.json`
saying what they hold, so that jobs read it on the fly
(`data.shards`) and pre-flight checks it without loading it.

The folder is written beside its destination and renamed into place at the
end: a failed conversion leaves nothing behind. A destination in a bucket
(`s3://bucket/prefix`) is written to a temporary folder first, then each
file is uploaded, the manifest last (a reader finds no manifest until every
shard is there).

    orchestra data convert mnist mnist-npy --format npy --shards 4
    orchestra data convert mnist s3://team-bucket/datasets/mnist-npy --format npy --shards 8
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import ValidationError

from orchestra.build import data as data_lib
from orchestra.build.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    X_DTYPES,
    Manifest,
)
from orchestra.errors import FieldError, StorageError
from orchestra.spec import MAX_CLASSES, DataSpec, ImageFolderSpec, problems_of
from orchestra.storage.bucket import bucket, is_uri, parse_uri

# Shards a split `convert` writes at most: their manifest (about 300 bytes a
# shard) then stays well under MAX_MANIFEST_BYTES with three splits.
MAX_SHARDS_WRITTEN = 10_000

CHUNK = 8192  # examples read from the source at a time
DEFAULT_SEED = DataSpec.model_fields["seed"].default  # a job's split draws with the same seed by default


@dataclass
class SourceSplit:
    """One split of a source: `count` examples, read a few at a time.

    Args:
        count: how many examples.
        take: indices -> (x, y): those examples as stored, integer labels.
    """

    count: int
    take: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.take(np.arange(start, stop))

    def subset(self, indices: np.ndarray) -> SourceSplit:
        """The examples at `indices`, in that order."""
        return SourceSplit(len(indices), lambda chosen: self.take(indices[chosen]))


@dataclass
class Source:
    """A dataset to convert: its splits, the layout of one example, its classes.

    Example:

        >>> import numpy as np
        >>> x, y = np.zeros((10, 3), np.uint8), np.arange(10) % 2
        >>> source = Source.of_arrays({"train": (x, y)}, "toy")
        >>> source.classes, source.shape
        (['0', '1'], (3,))
    """

    splits: dict[str, SourceSplit]
    shape: tuple[int, ...]
    dtype: np.dtype
    classes: list[str]
    name: str

    @classmethod
    def of_arrays(cls, arrays: dict[str, tuple[np.ndarray, np.ndarray]], name: str) -> Source:
        labels = {split: _labels(y) for split, (_, y) in arrays.items()}
        largest = max(int(y.max()) for y in labels.values() if len(y))
        first = next(iter(arrays.values()))[0]
        splits = {split: SourceSplit(len(x), lambda chosen, x=x, y=labels[split]: (x[chosen], y[chosen]))
                  for split, (x, _) in arrays.items()}
        return cls(splits, tuple(first.shape[1:]), first.dtype, [str(c) for c in range(largest + 1)], name)


def _labels(y: np.ndarray) -> np.ndarray:
    y = data_lib._column(np.asarray(y))
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise FieldError("SRC", f"has labels of shape {y.shape[1:]} and type {y.dtype}; shards hold one integer "
                                "class per example")
    if len(y) and int(y.min()) < 0:
        raise FieldError("SRC", f"has a negative label ({int(y.min())}); classes are 0, 1, ...")
    if len(y) and int(y.max()) >= MAX_CLASSES:
        raise FieldError("SRC", f"has label {int(y.max())}; at most {MAX_CLASSES} classes")
    return y.astype(np.int64) if y.dtype.name not in ("uint8", "int8", "uint16", "int16", "int32", "int64") else y


def open_source(src: str, datasets: str | None = None, target_size: tuple[int, int] = (256, 256),
                color_mode: str = "rgb") -> Source:
    """The dataset SRC names: an image folder, an `.npz` path or a Keras dataset name."""
    if Path(src).expanduser().is_dir():
        return _image_folder(Path(src).expanduser(), target_size, color_mode)
    directory = data_lib.datasets_dir(datasets)
    try:
        npz = data_lib.resolve_source(src, directory)
        raw = data_lib.read_raw(src, npz, directory)
    except FieldError as exc:
        raise FieldError("SRC", str(exc)) from None
    arrays = {"train": (raw["x_train"], raw["y_train"])}
    if raw.get("x_test") is not None and raw.get("y_test") is not None and len(raw["x_test"]):
        arrays["test"] = (raw["x_test"], raw["y_test"])
    for split, (x, y) in arrays.items():
        if x.dtype.name not in X_DTYPES or len(x) != len(y) or not len(x):
            raise FieldError("SRC", f"x_{split} ({x.dtype}, {len(x)} examples) and y_{split} ({len(y)} labels) "
                                    f"cannot be shards: numbers of a type in {', '.join(X_DTYPES)}, one label each")
    return Source.of_arrays(arrays, src)


def _image_folder(folder: Path, target_size: tuple[int, int], color_mode: str) -> Source:
    """An image folder's readable images, decoded and resized as a job's `data.images` would."""
    from orchestra.build.images import decode, index_folder

    try:
        images = ImageFolderSpec(train_dir=str(folder), target_size=list(target_size), color_mode=color_mode)
    except ValidationError as exc:
        field, message = problems_of(exc, ImageFolderSpec)[0]
        raise FieldError(f"--{field.split('.')[0].replace('_', '-')}", message) from None
    index = index_folder(str(folder), "SRC")
    labels = np.asarray(index.labels, np.int64)

    def take(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            decoded = list(pool.map(lambda i: decode(index.files[i], images).astype(np.uint8), chosen))
        return np.stack(decoded), labels[chosen]

    return Source({"train": SourceSplit(len(index.files), take)}, images.image_shape, np.dtype(np.uint8),
                  list(index.class_names), str(folder))


def with_validation(source: Source, fraction: float, seed: int) -> Source:
    """`source` with a `validation` split held out of its training split as
    scikit-learn's `train_test_split(test_size=fraction, random_state=seed)`
    draws it (and as `data.split_indices` does for a job): one
    `RandomState(seed)` permutation, validation its first
    `ceil(fraction * n)` examples, training the rest, in that order."""
    train = source.splits["train"]
    if not 0 < fraction < 1:
        raise FieldError("--validation-split", f"{fraction}: give a fraction between 0 and 1")
    held = math.ceil(fraction * train.count)
    if held >= train.count:
        raise FieldError("--validation-split", f"takes {held} of the {train.count} training examples and leaves "
                                               "none to train on")
    kept, validation = data_lib.sklearn_draw(train.count, held, train.count - held, seed)
    splits = {"train": train.subset(kept), "validation": train.subset(validation),
              **{name: split for name, split in source.splits.items() if name != "train"}}
    return Source(splits, source.shape, source.dtype, source.classes, source.name)


def write_shards(source: Source, dest: str | os.PathLike, shard_format: str, shards: int) -> Manifest:
    """Write `source` as `shards` shard files a split (fewer for a split
    with fewer examples) and its manifest into the new folder `dest`."""
    dest = Path(dest).expanduser()
    if shard_format not in ("npy", "tfrecord"):
        raise FieldError("--format", f"'{shard_format}' is not a shard format: use npy or tfrecord")
    if shards < 1:
        raise FieldError("--shards", f"{shards}: give 1 or more")
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise FieldError("DEST", f"{dest} exists and is not an empty folder: give a new folder")
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        splits = {name: _write_split(staging, name, split, source, shard_format, shards)
                  for name, split in source.splits.items()}
        manifest = Manifest.model_validate({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "shard_format": shard_format,
            "source": source.name[:4096], "classes": source.classes,
            "x": {"shape": list(source.shape), "dtype": source.dtype.name},
            "y_dtype": _label_dtype(source).name, "splits": splits,
        })
        (staging / MANIFEST).write_text(json.dumps(manifest.model_dump(exclude_none=True), indent=1))
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    except OSError as exc:  # a full disk, a folder not writable: the message names the file
        shutil.rmtree(staging, ignore_errors=True)
        raise FieldError("DEST", f"cannot write {exc.filename or dest}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _label_dtype(source: Source) -> np.dtype:
    first = next(iter(source.splits.values()))
    return first.read(0, min(1, first.count))[1].dtype


def _write_split(folder: Path, name: str, split: SourceSplit, source: Source, shard_format: str,
                 shards: int) -> dict:
    bounds = np.linspace(0, split.count, min(shards, split.count) + 1).astype(np.int64)
    written = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        stem = f"{name}-{i:05d}-of-{len(bounds) - 1:05d}"
        if shard_format == "npy":
            files = _write_npy(folder, stem, split, source, int(start), int(stop))
        else:
            files = {"records": _write_tfrecord(folder / f"{stem}.tfrecord", split, int(start), int(stop))}
        written.append({"count": int(stop - start), **files})
    return {"count": split.count, "shards": written}


def _write_npy(folder: Path, stem: str, split: SourceSplit, source: Source, start: int, stop: int) -> dict:
    x_path, y_path = folder / f"{stem}-x.npy", folder / f"{stem}-y.npy"
    x_out = np.lib.format.open_memmap(x_path, mode="w+", dtype=source.dtype, shape=(stop - start, *source.shape))
    y_out = None
    for a in range(start, stop, CHUNK):
        x, y = split.read(a, min(a + CHUNK, stop))
        x_out[a - start: a - start + len(x)] = x
        if y_out is None:
            y_out = np.lib.format.open_memmap(y_path, mode="w+", dtype=y.dtype, shape=(stop - start,))
        y_out[a - start: a - start + len(y)] = y
    x_out.flush()
    y_out.flush()
    del x_out, y_out
    return {"x": _file_entry(folder, x_path), "y": _file_entry(folder, y_path)}


def _write_tfrecord(path: Path, split: SourceSplit, start: int, stop: int) -> dict:
    from orchestra.keras_compat import tensorflow

    tf = tensorflow()
    train = tf.train
    with tf.io.TFRecordWriter(str(path)) as writer:
        for a in range(start, stop, CHUNK):
            x, y = split.read(a, min(a + CHUNK, stop))
            x = np.ascontiguousarray(x, x.dtype.newbyteorder("<"))
            for example, label in zip(x, y):
                features = {"x": train.Feature(bytes_list=train.BytesList(value=[example.tobytes()])),
                            "y": train.Feature(int64_list=train.Int64List(value=[int(label)]))}
                writer.write(train.Example(features=train.Features(feature=features)).SerializeToString())
    return _file_entry(path.parent, path)


def _file_entry(folder: Path, path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def convert(src: str, dest: str | os.PathLike, shard_format: str, shards: int, datasets: str | None = None,
            target_size: tuple[int, int] = (256, 256), color_mode: str = "rgb",
            validation_split: float | None = None, seed: int | None = None) -> Manifest:
    """`orchestra data convert SRC DEST --format F --shards N [--validation-split F --seed S]`.

    Example:

        >>> convert("mnist", "/tmp/mnist-npy", "npy", 4).splits["train"].count   # doctest: +SKIP
        60000
    """
    if shards > MAX_SHARDS_WRITTEN:
        raise FieldError("--shards", f"{shards}: at most {MAX_SHARDS_WRITTEN:,} a split, so that the manifest "
                                     f"stays under the {MAX_MANIFEST_BYTES // 2**20} MB a reader takes")
    if "://" in str(dest) and not is_uri(str(dest)):
        raise FieldError("DEST", f"'{str(dest)[:200]}' is not a place orchestra writes shards to: give a new "
                                 "folder or s3://<bucket>/<prefix>")
    source = open_source(src, datasets, target_size, color_mode)
    if validation_split is not None:
        source = with_validation(source, validation_split, DEFAULT_SEED if seed is None else seed)
    if is_uri(str(dest)):
        return upload_shards(source, str(dest), shard_format, shards)
    return write_shards(source, dest, shard_format, shards)


def upload_shards(source: Source, dest: str, shard_format: str, shards: int) -> Manifest:
    """`write_shards` into a new prefix of a bucket: written to a temporary
    folder, then each file uploaded, the manifest last. A failed upload
    deletes what it uploaded (and only that: not what another writer put
    under the prefix meanwhile)."""
    try:
        place = parse_uri(dest, "the destination")
    except StorageError as exc:
        raise FieldError("DEST", str(exc)) from None
    if not place.key:
        raise FieldError("DEST", f"{dest} is a bucket's root: give a new prefix, s3://{place.bucket}/<prefix>")
    if bucket().listing(place):
        raise FieldError("DEST", f"{dest} already holds objects: give a new prefix")
    with tempfile.TemporaryDirectory(prefix="orchestra-convert-") as tmp:
        folder = Path(tmp) / "shards"
        manifest = write_shards(source, folder, shard_format, shards)
        uploaded = []
        try:
            for name in [file.path for file in manifest.all_files()] + [MANIFEST]:
                uploaded.append(place.child(name))
                bucket().upload(folder / name, uploaded[-1])
        except BaseException:
            for target in uploaded:
                bucket().delete(target)
            raise
    return manifest


def summary(manifest: Manifest, dest: str | os.PathLike) -> str:
    """One line a split, for the CLI."""
    lines = [f"{dest}: {manifest.shard_format} shards of {manifest.x.dtype} examples of shape "
             f"{tuple(manifest.x.shape)}, {manifest.num_classes} classes"]
    for name, split in manifest.splits.items():
        size = sum(f.bytes for shard in split.shards for f in shard.files())
        lines.append(f"  {name}: {split.count} examples in {len(split.shards)} shards, "
                     f"{math.ceil(size / 2**20)} MB")
    return "\n".join(lines)
