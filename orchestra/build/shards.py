"""Shard files read on the fly: a dataset larger than a worker's memory.

A sharded dataset is a folder that `orchestra data convert` wrote: shard
files and a `manifest.json` saying what they hold (counts, classes, the
shape and dtype of an example, each file's size and SHA-256). The manifest
is input like any other (anyone who can write the folder can edit it): it
is read as bounded text, validated field by field, every file it names must
be a regular file inside the folder reached through no symlink, and its
sizes must be the files' own, before a byte of a shard is read.

Two formats:

- `npy` (`NpyExamples`): each shard is an `x` and a `y` `.npy` file. The
  `x` files are read by index (`NpyFile`: positional reads of the rows a
  batch needs, out of the page cache the node's processes share), so a job
  takes the same split and the same global batches as the in-memory path
  would over the same arrays (`data.split_indices`, then
  `data.training_pipeline`'s seeded order), and a worker's resident memory
  does not grow with the size of the set. The labels (`y`) are small and
  held in memory.
- `tfrecord` (`StreamedExamples`): each shard is a TFRecord file of
  `tf.train.Example`s (`x`: the example's raw little-endian bytes, `y`: its
  class), streamed by `tf.data`. Worker r of N reads files r, r+N, …, only
  those. What holds instead of the global-batch invariant is in
  `StreamedExamples`' docstring and docs/data-sources.md.

The folder is a path every worker sees (`LocalShards`) or a prefix in an
S3 bucket (`BucketShards`: `data.shards.path: s3://bucket/prefix`). From a
bucket, the manifest is read as bounded text and checked against the
objects' sizes, and each shard file is downloaded when a process first
needs it into a node-local cache (`node_cache.ShardCache`: once a node,
verified against the manifest's size and SHA-256), then read by the same
local code: a worker downloads only the files it reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestra.build import data as data_lib
from orchestra.build.node_cache import KEY_LENGTH, ShardCache
from orchestra.errors import FieldError, StorageError
from orchestra.spec import MAX_CLASSES, DataSpec, JobSpec
from orchestra.storage.bucket import Place, bucket, is_uri, parse_uri
from orchestra.storage.paths import read_stored_text

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "orchestra-shards"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_SHARDS = 100_000            # files of one split
MAX_EXAMPLES = 2**31 - 1        # examples of one split
MAX_EXAMPLE_VALUES = 2**26      # values of one example (a 4096 x 4096 x 4 image)
MAX_NAME = 255
X_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")
Y_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64")
SPLITS = ("train", "validation", "test")
FIELD = "data.shards.path"

Count = Annotated[int, Field(ge=1, le=MAX_EXAMPLES)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ShardFile(_Strict):
    """One file of a shard: its name relative to the dataset folder, size and SHA-256."""

    path: str = Field(min_length=1, max_length=4 * MAX_NAME)
    bytes: int = Field(ge=0, le=2**50)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Shard(_Strict):
    """One shard: `count` examples in `x` and `y` (npy) or in `records` (tfrecord)."""

    count: Count
    x: ShardFile | None = None
    y: ShardFile | None = None
    records: ShardFile | None = None

    def files(self) -> list[ShardFile]:
        return [f for f in (self.x, self.y, self.records) if f is not None]


class Split(_Strict):
    count: Count
    shards: list[Shard] = Field(min_length=1, max_length=MAX_SHARDS)

    @model_validator(mode="after")
    def _counts_add_up(self) -> Split:
        if sum(shard.count for shard in self.shards) != self.count:
            raise ValueError(f"the shards' counts add up to {sum(s.count for s in self.shards)}, not {self.count}")
        return self

    def starts(self) -> np.ndarray:
        """Index of each shard's first example, and the total at the end."""
        return np.cumsum([0] + [shard.count for shard in self.shards], dtype=np.int64)


class ExampleLayout(_Strict):
    shape: list[Annotated[int, Field(ge=1, le=MAX_EXAMPLE_VALUES)]] = Field(max_length=8)
    dtype: Literal[X_DTYPES]

    @model_validator(mode="after")
    def _bounded(self) -> ExampleLayout:
        if math.prod(self.shape) > MAX_EXAMPLE_VALUES:
            raise ValueError(f"an example of shape {self.shape} has more than {MAX_EXAMPLE_VALUES} values")
        return self

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class Manifest(_Strict):
    """What a sharded dataset holds; `manifest.json` of its folder.

    Example:

        >>> manifest = read_manifest(Path("mnist-npy"))   # doctest: +SKIP
        >>> manifest.splits["train"].count, manifest.x.shape
        (60000, [28, 28])
    """

    format: Literal[MANIFEST_FORMAT]
    version: Literal[MANIFEST_VERSION]
    shard_format: Literal["npy", "tfrecord"]
    source: str = Field(default="", max_length=4096)
    classes: list[Annotated[str, Field(max_length=MAX_NAME)]] = Field(min_length=1, max_length=MAX_CLASSES)
    x: ExampleLayout
    y_dtype: Literal[Y_DTYPES]
    splits: dict[Literal[SPLITS], Split]

    @model_validator(mode="after")
    def _files_of_the_format(self) -> Manifest:
        if "train" not in self.splits:
            raise ValueError("has no 'train' split")
        wanted = {"x", "y"} if self.shard_format == "npy" else {"records"}
        for name, split in self.splits.items():
            for i, shard in enumerate(split.shards):
                have = {key for key in ("x", "y", "records") if getattr(shard, key) is not None}
                if have != wanted:
                    raise ValueError(f"{name} shard {i} names files {sorted(have)}; a {self.shard_format} shard "
                                     f"has {sorted(wanted)}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def all_files(self) -> list[ShardFile]:
        """Every file of every shard of every split."""
        return [file for split in self.splits.values() for shard in split.shards for file in shard.files()]


# Where the shards are: a folder, or a prefix in a bucket.

def dataset_folder(spec: DataSpec, directory: Path) -> Path:
    """The folder `data.shards.path` names: relative paths are in the dataset directory."""
    path = Path(spec.shards.path).expanduser()
    return path if path.is_absolute() else directory / path


def shards_folder(spec: DataSpec, directory: Path) -> LocalShards | BucketShards:
    """Where `data.shards.path` points: a folder (relative: in the dataset
    directory) or `s3://bucket/prefix`; FieldError for any other URI."""
    raw = spec.shards.path
    if is_uri(raw):
        try:
            return BucketShards(parse_uri(raw, "the folder"))
        except StorageError as exc:
            raise FieldError(FIELD, str(exc)) from None
    if "://" in raw:
        raise FieldError(FIELD, f"'{raw[:200]}' is not a place orchestra reads shards from: give a folder "
                                "(relative: in the dataset directory) or s3://<bucket>/<prefix>")
    return LocalShards(dataset_folder(spec, directory))


def _relative_name(name: str, where: str, field: str = FIELD) -> PurePosixPath:
    """A file name the manifest gives, refused unless it is a relative path inside its folder."""
    pure = PurePosixPath(name)
    if "\0" in name or "\\" in name or pure.is_absolute() or not pure.parts or ".." in pure.parts:
        raise FieldError(field, f"the manifest names the file {name[:200]!r}: shard files must be relative "
                                f"paths inside {where}")
    return pure


class LocalShards:
    """A dataset folder on a path every worker sees (a shared file system,
    or the same folder on each node).

    Args:
        folder: the folder holding `manifest.json` and the shard files.
    """

    lazy = False  # the files are opened and their headers checked up front: it costs nothing

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where = str(folder)

    def manifest_text(self, field: str = FIELD) -> str:
        path = self.folder / MANIFEST
        try:
            return read_stored_text(path, MAX_MANIFEST_BYTES, "the shards' manifest")
        except FileNotFoundError:
            what = f"{self.folder} has no {MANIFEST}" if self.folder.is_dir() else f"{self.folder} does not exist"
            raise FieldError(field, f"{what}: make the shards with `orchestra data convert SRC "
                                    f"{self.folder} --format npy|tfrecord --shards N`") from None
        except StorageError as exc:
            raise FieldError(field, str(exc)) from None
        except OSError as exc:
            raise FieldError(field, f"cannot read {path}: {exc.strerror or exc}") from None

    def check(self, manifest: Manifest, checksums: bool = False, field: str = FIELD) -> None:
        for file in manifest.all_files():
            fd = open_regular(shard_path(self.folder, file.path, field), file.bytes, field)
            try:
                if checksums and _sha256(fd) != file.sha256:
                    raise FieldError(field, f"the shard file {file.path} does not match its SHA-256 in the "
                                            "manifest: it was changed or damaged")
            finally:
                os.close(fd)

    def local(self, file: ShardFile) -> Path:
        return shard_path(self.folder, file.path)


class BucketShards:
    """A dataset folder in an S3 bucket (`s3://bucket/prefix`), reached with
    the credentials and endpoint `storage: s3://...` uses (storage.bucket).

    The manifest is read from the bucket as bounded text; its files'
    sizes are checked against the objects' (one listing). A shard file is
    downloaded when it is first needed (`local`) into this node's
    `ShardCache` for the manifest, once for all the node's processes, and
    verified against the manifest's size and SHA-256 before anything reads
    it.

    Args:
        place: the prefix holding `manifest.json` and the shard files.

    Example:

        >>> source = BucketShards(parse_uri("s3://team-bucket/mnist-npy"))   # doctest: +SKIP
        >>> manifest = read_manifest(source)
        >>> source.local(manifest.splits["train"].shards[0].y)
        PosixPath('/tmp/orchestra-shards-1000/5f0c…/9a41…')
    """

    lazy = True  # a file is downloaded when a batch first needs it

    def __init__(self, place: Place, cache_root: Path | None = None):
        self.place, self.where, self.cache_root = place, place.uri, cache_root
        self._key: str | None = None
        self._cache: ShardCache | None = None
        self._lock = threading.Lock()

    def manifest_text(self, field: str = FIELD) -> str:
        try:
            raw = bucket().get(self.place.child(MANIFEST), MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise FieldError(field, f"{self.where} has no {MANIFEST}: make the shards with `orchestra data convert "
                                    f"SRC {self.where} --format npy|tfrecord --shards N`") from None
        except StorageError as exc:
            raise FieldError(field, str(exc)) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FieldError(field, f"{self.where}/{MANIFEST} is not UTF-8 text") from None
        self._key = hashlib.sha256(self.where.encode() + b"\n" + raw).hexdigest()[:KEY_LENGTH]
        return text

    def _object(self, name: str, field: str = FIELD) -> Place:
        return self.place.child(*_relative_name(name, self.where, field).parts)

    def check(self, manifest: Manifest, checksums: bool = False, field: str = FIELD) -> None:
        try:
            found = bucket().listing(self.place)
        except StorageError as exc:
            raise FieldError(field, str(exc)) from None
        start = len(self.place.key) + 1 if self.place.key else 0
        for file in manifest.all_files():
            size = found.get(self._object(file.path, field).key[start:])
            if size is None:
                raise FieldError(field, f"the shard file {self.where}/{file.path[:200]} does not exist")
            if size != file.bytes:
                raise FieldError(field, f"the shard file {self.where}/{file.path[:200]} is {size} bytes but the "
                                        f"manifest says {file.bytes}: the shards changed since they were written")
        if checksums:
            for file in manifest.all_files():
                self.local(file)

    def local(self, file: ShardFile) -> Path:
        return self.fetch(file)[0]

    def fetch(self, file: ShardFile) -> tuple[Path, bool]:
        """(the file in this node's cache, whether this call downloaded it)."""
        place = self._object(file.path)
        if self._key is None:
            raise RuntimeError("read the manifest before its files")
        try:
            with self._lock:
                if self._cache is None:
                    self._cache = ShardCache(self._key, self.cache_root)
            return self._cache.fetch(file.sha256, file.bytes, place.uri,
                                     lambda out: bucket().copy_to(place, out))
        except FileNotFoundError:
            raise FieldError(FIELD, f"the shard file {place.uri} does not exist any more") from None
        except StorageError as exc:
            raise FieldError(FIELD, str(exc)) from None
        except OSError as exc:
            raise FieldError(FIELD, f"cannot keep {place.uri} in this node's shard cache "
                                    f"({exc.filename or ''}): {exc.strerror or exc}") from None


def _as_source(folder) -> LocalShards | BucketShards:
    return folder if isinstance(folder, (LocalShards, BucketShards)) else LocalShards(Path(folder))


# Reading the manifest and checking the files it names.

def read_manifest(folder: Path | LocalShards | BucketShards, field: str = FIELD) -> Manifest:
    """The folder's manifest, validated; FieldError naming `field` otherwise."""
    source = _as_source(folder)
    text = source.manifest_text(field)
    path = f"{source.where}/{MANIFEST}"
    try:
        return Manifest.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise FieldError(field, f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top)"
        raise FieldError(field, f"{path}: {where}: {error['msg']}"[:400]) from None


def shard_path(folder: Path, name: str, field: str = FIELD) -> Path:
    """A file the manifest names, as a path inside `folder`: a relative
    name that stays inside the folder and passes through no symlink."""
    pure = _relative_name(name, str(folder), field)
    current = folder
    for part in pure.parts:
        current = current / part
        if current.is_symlink():
            raise FieldError(field, f"the manifest's file {name[:200]!r} passes through the symlink {current}: "
                                    "shard files must be inside the dataset folder")
    return current


def open_regular(path: Path, size: int, field: str = FIELD) -> int:
    """A read-only descriptor of `path`, a regular file (never a symlink or
    a FIFO waited on) of exactly `size` bytes."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FieldError(field, f"cannot open the shard file {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_size != size:
        problem = f"is {info.st_size} bytes but the manifest says {size}: the shards changed since they were written"
    if problem:
        os.close(fd)
        raise FieldError(field, f"the shard file {path} {problem}")
    return fd


def check_files(folder: Path | LocalShards | BucketShards, manifest: Manifest, checksums: bool = False,
                field: str = FIELD) -> None:
    """Every file the manifest names is where and as big as it says; with
    `checksums`, its SHA-256 too (reads every byte; from a bucket: downloads
    every file into the node's cache, which verifies it). The `.npy` headers
    are checked when the files are opened (`NpyFile`)."""
    _as_source(folder).check(manifest, checksums, field)


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


# npy shards: read by index.

class NpyFile:
    """One `.npy` file, its header checked against what the manifest says
    it holds, read by rows with positional reads (`os.preadv`): the rows
    asked for are copied out of the page cache, and nothing else of the
    file ever counts in this process's memory.

    Not memory-mapped: a mapped page counts in the resident memory of each
    process that touched it until it is unmapped, and the kernel maps whole
    page-cache folios at each fault: reading 500 random rows of a 1.9 GB
    mapped set raised a process's peak by 100 MB (9 MB for a 188 MB set),
    growing with the set. Reads are thread-safe (no file position).

    Args:
        path: the file (already checked to be inside the dataset folder).
        file: the manifest's entry for it.
        shape: the array's shape the manifest implies.
        dtype: its dtype.
    """

    def __init__(self, path: Path, file: ShardFile, shape: tuple[int, ...], dtype: str):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.fd = open_regular(path, file.bytes)
        try:
            with os.fdopen(os.dup(self.fd), "rb") as handle:
                try:
                    found_shape, fortran, found_dtype = _npy_header(handle)
                except (ValueError, OSError, SyntaxError) as exc:
                    raise FieldError(FIELD, f"{path} is not a readable .npy file ({str(exc)[:200]})") from None
                self.offset = handle.tell()
            if fortran or found_dtype != self.dtype or tuple(found_shape) != shape:
                raise FieldError(FIELD, f"{path} holds {found_dtype} of shape {tuple(found_shape)}"
                                        f"{' (Fortran order)' if fortran else ''} but the manifest says {dtype} "
                                        f"of shape {shape}")
            self.row_bytes = math.prod(shape[1:]) * self.dtype.itemsize
            if self.offset + shape[0] * self.row_bytes != file.bytes:
                raise FieldError(FIELD, f"{path}'s size does not match its header: the file is damaged")
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (in that order), one read a run of consecutive rows."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        buffer = np.empty((len(rows), *self.shape[1:]), self.dtype)
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for start, stop in zip([0, *breaks], [*breaks, len(rows)]):
            view = memoryview(buffer[start:stop].reshape(-1)).cast("B")
            if os.preadv(self.fd, [view], self.offset + int(ordered[start]) * self.row_bytes) != len(view):
                raise OSError(f"{self.path} ended early: it changed since it was checked")
        out = np.empty_like(buffer)
        out[order] = buffer
        return out

    def all(self) -> np.ndarray:
        return self.rows(np.arange(self.shape[0]))

    def __del__(self):
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)


def _npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of an open `.npy` file, which is left at its data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(handle, max_header_size=10_000)


class NpySplit:
    """The shards of one split: `read(positions)` gathers examples by their
    position in the split; labels are in memory. From a bucket, an `x`
    file is downloaded (and its header checked) when a read first needs
    one of its rows; the labels are fetched up front."""

    def __init__(self, folder: Path | LocalShards | BucketShards, manifest: Manifest, split: Split):
        shape, dtype = tuple(manifest.x.shape), manifest.x.dtype
        self.source, self.shards, self.dtype = _as_source(folder), split.shards, np.dtype(dtype)
        self.example_shape = shape
        self.files: list[NpyFile | None] = [None] * len(split.shards)
        self._opening = threading.Lock()
        if not self.source.lazy:
            for i in range(len(self.files)):
                self._file(i)
        self.labels = np.concatenate([NpyFile(self.source.local(s.y), s.y, (s.count,), manifest.y_dtype).all()
                                      for s in split.shards])
        self.starts = split.starts()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= manifest.num_classes):
            raise FieldError(FIELD, f"labels go from {self.labels.min()} to {self.labels.max()} but the manifest "
                                    f"has {manifest.num_classes} classes")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, i: int) -> NpyFile:
        """Shard i's `x` file, opened on first use (thread-safe: tf.data reads batches in parallel)."""
        file = self.files[i]
        if file is None:
            with self._opening:
                file = self.files[i]
                if file is None:
                    shard = self.shards[i]
                    file = self.files[i] = NpyFile(self.source.local(shard.x), shard.x,
                                                   (shard.count, *self.example_shape), self.dtype.name)
        return file

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The examples at `positions`, in that order, as stored."""
        positions = np.asarray(positions, np.int64)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty((len(positions), *self.example_shape), self.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self._file(int(s)).rows(positions[chosen] - self.starts[s])
        return out


class NpyExamples:
    """Examples of npy shards, for `data.training_pipeline` and
    `data.evaluation_pipeline`: example i is the split's example
    `positions[i]`, prepared as `data.prepare` prepares arrays (the same
    float32 rescale, reshape and label encoding), so a job on these shards
    trains on exactly the batches a job on the same arrays in memory would.

    Args:
        split: the shards.
        positions: the examples of this set, as positions in the split.
        spec: the job's `data` section.
        num_classes: for one-hot labels.

    Example:

        >>> examples = NpyExamples(split, np.arange(len(split)), spec.data, 10)   # doctest: +SKIP
        >>> x, y = examples.load_batch(np.array([0, 5]))
    """

    def __init__(self, split: NpySplit, positions: np.ndarray, spec: DataSpec, num_classes: int | None):
        self.split, self.positions, self.spec, self.num_classes = split, positions, spec, num_classes
        self._label_dtype = np.float32 if num_classes is not None else split.labels.dtype

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> np.ndarray:
        """Every example's class (for class weights)."""
        return self.split.labels[self.positions]

    def load_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = self.positions[np.asarray(indices, np.int64)]
        x = data_lib.prepare_features(self.split.read(positions), self.spec)
        y = self.split.labels[positions]
        if self.num_classes is not None:
            y = np.eye(self.num_classes, dtype=np.float32)[y.astype(np.int64)]
        return x, y

    def fetch(self, indices, epoch):
        import tensorflow as tf

        x, y = tf.numpy_function(self.load_batch, [indices], [tf.float32, tf.as_dtype(self._label_dtype)],
                                 stateful=False)
        x.set_shape([None, *input_shape(self.spec, self.split.example_shape)])
        y.set_shape([None] if self.num_classes is None else [None, self.num_classes])
        return x, y


def input_shape(spec: DataSpec, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an example as the model takes it (flatten, reshape)."""
    if spec.flatten:
        return (math.prod(stored),)
    if spec.reshape is not None:
        if math.prod(spec.reshape) != math.prod(stored):
            raise FieldError("data.reshape", f"cannot reshape examples of shape {stored} to {tuple(spec.reshape)}")
        return tuple(spec.reshape)
    return stored


def _num_classes(spec: DataSpec, manifest: Manifest, labels: np.ndarray | None) -> int | None:
    """Classes of one-hot labels: as `data.prepare` counts them (the
    largest training label + 1) when the labels are at hand, else the
    manifest's classes."""
    if spec.labels != "one_hot":
        return None
    largest = int(labels.max()) + 1 if labels is not None and len(labels) else manifest.num_classes
    classes = spec.num_classes or largest
    if largest > classes:
        raise FieldError("data.num_classes", f"label {largest - 1} is not below num_classes {classes}")
    return classes


# tfrecord shards: streamed.

class StreamedExamples:
    """The examples of one split of TFRecord shards, read as a stream.

    What holds (instead of the same global batches on 1 or N workers):

    - worker r of N reads shard files r, r+N, r+2N, … and no other;
    - each epoch, a worker reads each of its files once: the files in an
      order seeded by (seed, epoch), interleaved one record at a time, then
      shuffled a window of `shuffle_buffer` consecutive records at a time,
      by a permutation seeded by (seed, epoch, rank, window) (with
      `fit.shuffle` false: file order, no shuffle);
    - every worker runs the same number of steps an epoch, the most its
      smallest share fills: `min_r(count_r // per_worker_batch)`; the
      examples past them in a worker's epoch (fewer than its share's
      excess) are skipped that epoch, different ones each epoch;
    - the same (seed, epoch, worker count) gives the same batches, run
      after run.

    Args:
        folder: the dataset folder.
        manifest: its manifest.
        split: the split read.
        spec: the job's `data` section.

    Example:

        >>> train = StreamedExamples(folder, manifest, manifest.splits["train"], spec.data)   # doctest: +SKIP
        >>> files, count = train.share(rank=1, world_size=2)
    """

    def __init__(self, folder: Path | LocalShards | BucketShards, manifest: Manifest, split: Split,
                 spec: DataSpec):
        self.source, self.manifest, self.split, self.spec = _as_source(folder), manifest, split, spec
        if not self.source.lazy:
            for shard in split.shards:  # the names are checked now; from a bucket, when each is fetched
                self.source.local(shard.records)
        self.num_classes = _num_classes(spec, manifest, None)

    def __len__(self) -> int:
        return self.split.count

    def file(self, i: int) -> str:
        """Shard file i, on this node (downloaded first from a bucket)."""
        return str(self.source.local(self.split.shards[i].records))

    @property
    def files(self) -> list[str]:
        """Every shard file of the split, on this node."""
        return [self.file(i) for i in range(len(self.split.shards))]

    def share_count(self, rank: int, world_size: int) -> int:
        """Examples worker `rank` reads."""
        if len(self.split.shards) < world_size:
            raise FieldError("data.shards", f"{len(self.split.shards)} TFRecord shard files cannot feed {world_size} "
                                            f"workers (each reads whole files): convert with --shards {world_size} "
                                            "or more")
        return sum(shard.count for shard in self.split.shards[rank::world_size])

    def share(self, rank: int, world_size: int) -> tuple[list[str], int]:
        """(files, examples) worker `rank` reads: only these are fetched from a bucket."""
        count = self.share_count(rank, world_size)
        return [self.file(i) for i in range(rank, len(self.split.shards), world_size)], count

    def steps_per_epoch(self, global_batch: int, world_size: int) -> int:
        per_worker = global_batch // world_size
        smallest = min(self.share_count(r, world_size) for r in range(world_size))
        if smallest < per_worker:
            raise FieldError("fit.batch_size", f"a worker's share of the shards holds {smallest} examples, fewer "
                                               f"than its {per_worker} of each global batch of {global_batch}")
        return smallest // per_worker

    def evaluation_steps(self, per_worker_batch: int, world_size: int) -> int:
        counts = [self.share_count(r, world_size) for r in range(world_size)]
        return max(1, min(min(counts), -(-max(counts) // per_worker_batch)))

    def parse(self, records, class_weight: dict[int, float] | None = None):
        """A batch of serialized `tf.train.Example`s as the model takes them."""
        import tensorflow as tf

        spec, layout = self.spec, self.manifest.x
        features = tf.io.parse_example(records, {"x": tf.io.FixedLenFeature([], tf.string),
                                                 "y": tf.io.FixedLenFeature([], tf.int64)})
        x = tf.io.decode_raw(features["x"], tf.as_dtype(np.dtype(layout.dtype)), little_endian=True)
        x = tf.cast(tf.reshape(x, [-1, *input_shape(spec, tuple(layout.shape))]), tf.float32)
        if spec.rescale is not None:
            x = x * np.float32(spec.rescale)
        y = features["y"]
        check = tf.debugging.assert_less(y, tf.constant(self.manifest.num_classes, tf.int64),
                                         message="a TFRecord label is not below the manifest's class count")
        with tf.control_dependencies([check]):
            labels = tf.identity(y) if self.num_classes is None else tf.one_hot(y, self.num_classes)
        if not class_weight:
            return x, labels
        table = tf.constant([class_weight.get(c, 1.0) for c in range(self.manifest.num_classes)], tf.float32)
        return x, labels, tf.gather(table, y)

    def training_pipeline(self, *, global_batch: int, rank: int, world_size: int, shuffle: bool, seed: int,
                          initial_epoch: int, class_weight: dict[int, float] | None, parallel_calls: int,
                          prefetch: int, declare_endless: bool = True):
        """An endless dataset of this worker's batches, epoch after epoch
        (the arguments of `data.training_pipeline`)."""
        import tensorflow as tf

        files, _ = self.share(rank, world_size)
        per_worker = global_batch // world_size
        steps = self.steps_per_epoch(global_batch, world_size)
        names = tf.constant(files)
        buffer = self.spec.shards.shuffle_buffer

        def epoch_batches(epoch):
            order = tf.range(len(files), dtype=tf.int64)
            if shuffle:
                order = tf.random.experimental.stateless_shuffle(
                    order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            records = tf.data.Dataset.from_tensor_slices(tf.gather(names, order)).interleave(
                tf.data.TFRecordDataset, cycle_length=min(len(files), max(1, parallel_calls)), block_length=1,
                num_parallel_calls=parallel_calls, deterministic=True)
            if shuffle:  # stateless: the same in every process whatever its global seed
                base = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(seed, tf.int64), epoch]), rank)
                records = records.batch(buffer).enumerate().map(
                    lambda window, block: tf.random.experimental.stateless_shuffle(
                        block, seed=tf.random.experimental.stateless_fold_in(base, window))).unbatch()
            return records.batch(per_worker, drop_remainder=True).take(steps)

        dataset = (tf.data.Dataset.range(initial_epoch, 2**62).flat_map(epoch_batches)
                   .map(lambda records: self.parse(records, class_weight), num_parallel_calls=parallel_calls,
                        deterministic=True))
        if declare_endless:
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return data_lib._unsharded(dataset).prefetch(prefetch)

    def evaluation_pipeline(self, *, per_worker_batch: int, rank: int, world_size: int, prefetch: int = 1):
        """This worker's files, each example once, in `evaluation_steps`
        non-empty batches (as `data.evaluation_pipeline`'s contract)."""
        import tensorflow as tf

        files, count = self.share(rank, world_size)
        steps = self.evaluation_steps(per_worker_batch, world_size)
        small, extra = divmod(count, steps)
        records = tf.data.TFRecordDataset(files)
        batches = records.take(extra * (small + 1)).batch(small + 1).concatenate(
            records.skip(extra * (small + 1)).batch(small))
        return data_lib._unsharded(batches.map(self.parse)).prefetch(prefetch)


# What the worker, the pipelines and pre-flight call.

def open_examples(spec: DataSpec, directory: Path):
    """(train, validation, test, input_shape) of the spec's shards;
    validation and test may be None."""
    folder = shards_folder(spec, directory)
    manifest = read_manifest(folder)
    if manifest.shard_format != spec.shards.format:
        raise FieldError("data.shards.format", f"is '{spec.shards.format}' but {folder.where} holds "
                                               f"'{manifest.shard_format}' shards")
    check_files(folder, manifest)
    shape = input_shape(spec, tuple(manifest.x.shape))
    test_split = manifest.splits.get("test") if spec.test else None
    val_split = _stored_validation(spec, manifest, folder.where)
    if manifest.shard_format == "tfrecord":
        test = None if test_split is None else StreamedExamples(folder, manifest, test_split, spec)
        validation = None if val_split is None else StreamedExamples(folder, manifest, val_split, spec)
        return StreamedExamples(folder, manifest, manifest.splits["train"], spec), validation, test, shape
    train = NpySplit(folder, manifest, manifest.splits["train"])
    num_classes = _num_classes(spec, manifest, train.labels)
    train_positions, val_positions = data_lib.split_indices(len(train), spec)
    test = None if test_split is None else _npy_set(folder, manifest, test_split, spec, num_classes, "test")
    if val_split is not None:
        validation = _npy_set(folder, manifest, val_split, spec, num_classes, "validation")
    else:
        validation = NpyExamples(train, val_positions, spec, num_classes) if len(val_positions) else None
    return NpyExamples(train, train_positions, spec, num_classes), validation, test, shape


def _stored_validation(spec: DataSpec, manifest: Manifest, where: str) -> Split | None:
    """The manifest's split a job validates on instead of drawing one: its
    `validation` split for `data.validation: split` without a fraction or
    size, its `test` split for `data.validation: test`; else None."""
    if spec.validation == "test":
        name = "test"
    elif spec.validation == "split" and spec.validation_split is None and spec.validation_size is None:
        name = "validation"
    else:
        return None
    if name not in manifest.splits:
        how = "convert with --validation-split F, or " if name == "validation" else ""
        raise FieldError("data.validation", f"is '{spec.validation}' but {where} has no {name} split: {how}"
                                            "give data.validation_split (npy shards)")
    return manifest.splits[name]


def _npy_set(folder, manifest: Manifest, split: Split, spec: DataSpec, num_classes: int | None,
             name: str) -> NpyExamples:
    """A whole split of npy shards (the test set: its first `test_size`) as a job evaluates it."""
    shards = NpySplit(folder, manifest, split)
    count = min(len(shards), spec.test_size or len(shards)) if split is manifest.splits.get("test") else len(shards)
    if num_classes is not None and len(shards.labels) and shards.labels.max() >= num_classes:
        raise FieldError("data.num_classes", f"{name} label {shards.labels.max()} is not below "
                                             f"num_classes {num_classes}")
    return NpyExamples(shards, np.arange(count), spec, num_classes)


def training_steps(examples, global_batch: int, world_size: int) -> int:
    if isinstance(examples, StreamedExamples):
        return examples.steps_per_epoch(global_batch, world_size)
    return data_lib.steps_per_epoch(len(examples), global_batch)


def training_pipeline(examples, **options):
    if isinstance(examples, StreamedExamples):
        return examples.training_pipeline(**options)
    return data_lib.training_pipeline(examples, **options)


def evaluation_pipeline(examples, **options):
    if isinstance(examples, StreamedExamples):
        return examples.evaluation_pipeline(**options)
    return data_lib.evaluation_pipeline(examples, **options)


def evaluation_steps(examples, per_worker_batch: int, world_size: int) -> int:
    if isinstance(examples, StreamedExamples):
        return examples.evaluation_steps(per_worker_batch, world_size)
    return data_lib.evaluation_steps(len(examples), per_worker_batch, world_size)


@dataclass
class ShardsFound:
    """What pre-flight learns of a sharded dataset from its manifest and a
    few examples (as `driver.trial.Sample` takes them)."""

    shape: tuple[int, ...]
    dropped: int
    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray


SAMPLE_EXAMPLES = 2


def inspect_shards(spec: JobSpec, directory: Path) -> ShardsFound:
    """Check a sharded dataset against the job from its manifest, its
    files' sizes and headers, and a few examples: never the whole set.
    Raises FieldError naming the field."""
    data, workers, batch = spec.data, spec.scaling.workers, spec.fit.batch_size
    train, validation, test, shape = open_examples(data, directory)
    if len(train) < batch:
        raise FieldError("fit.batch_size", f"{batch} is larger than the {len(train)} training examples")
    for name, examples in (("validation", validation), ("test", test)):
        if examples is not None:
            if len(examples) < workers:
                raise FieldError("data", f"the {name} set has {len(examples)} examples, fewer than the {workers} "
                                         "workers")
            if isinstance(examples, StreamedExamples):
                examples.share_count(0, workers)
    steps = training_steps(train, batch, workers)
    dropped = len(train) - steps * batch if spec.fit.steps_per_epoch is None else 0
    if isinstance(train, StreamedExamples):
        x, y = _first_records(train)
        classes = np.arange(train.manifest.num_classes)
        labels = classes if train.num_classes is None else np.eye(train.num_classes, dtype=np.float32)[classes]
    else:
        x, y = train.load_batch(np.arange(min(SAMPLE_EXAMPLES, len(train))))
        labels = train.labels
        if train.num_classes is not None:
            labels = np.eye(train.num_classes, dtype=np.float32)[labels.astype(np.int64)]
    if tuple(x.shape[1:]) != shape:
        raise FieldError(FIELD, f"examples read back with shape {tuple(x.shape[1:])}, not the manifest's {shape}")
    return ShardsFound(shape, dropped, x, y, labels)


def _first_records(examples: StreamedExamples) -> tuple[np.ndarray, np.ndarray]:
    """The first examples of the first shard file, parsed as training parses them."""
    import tensorflow as tf

    first = examples.file(0)
    try:
        records = next(iter(tf.data.TFRecordDataset(first).batch(SAMPLE_EXAMPLES)))
        x, y = examples.parse(records)
    except (tf.errors.OpError, StopIteration) as exc:
        message = getattr(exc, "message", "") or type(exc).__name__
        name = examples.split.shards[0].records.path
        raise FieldError(FIELD, f"{examples.source.where}/{name} does not read as the manifest says "
                                f"({message.splitlines()[0][:200]})") from None
    return x.numpy(), y.numpy()


def evaluation_arrays(spec: DataSpec, directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, which set) in memory for `orchestra evaluate`: the test shards
    when there are some, else the validation set, else the training set."""
    train, validation, test, _ = open_examples(spec, directory)
    which, examples = next((name, examples) for name, examples in
                           (("test", test), ("validation", validation), ("training", train)) if examples is not None)
    if isinstance(examples, StreamedExamples):
        import tensorflow as tf

        batches = list(tf.data.TFRecordDataset(examples.files).batch(4096).map(examples.parse))
        return (np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches]),
                which)
    return (*examples.load_batch(np.arange(len(examples))), which)
