"""Spec → arrays → per-worker tf.data pipelines.

Arrays are prepared identically on the driver (to check the spec) and on each
worker: the same seed gives the same split on every process. Each worker then
takes its share of every global batch: the order of an epoch is one seeded
permutation of the whole training set, cut into global batches, and worker
`rank` of `N` takes slice `rank` of each. So global batch k holds the same
examples whatever the worker count.

The arrays enter TensorFlow without a copy: prepared into memory aligned
as TensorFlow's kernels need it (`aligned_empty`) or memory-mapped from
one copy per node (`node_cache`), they are wrapped as tensors in place
(`host_tensor`), and their pipelines skip tf.data's graph rewrites, which
would copy every tensor a pipeline captures.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestra.errors import FieldError
from orchestra.spec import MAX_CLASSES, DataSpec, JobSpec

DATASETS_ENV = "ORCHESTRA_DATASETS"
DEFAULT_DATASETS_DIR = Path("~/orchestra_datasets").expanduser()
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "boston_housing")


def datasets_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    return Path(os.environ.get(DATASETS_ENV) or DEFAULT_DATASETS_DIR).expanduser()


def resolve_source(source: str, directory: Path) -> Path | None:
    """The `.npz` file a source names, or None for a Keras download.

    A path ending in `.npz` is used as it is. A dataset name is looked up as
    `<directory>/<name>.npz`; if it is not there and Keras knows the name, it
    is left to Keras's downloader (None).
    """
    if source.endswith(".npz"):
        return npz_path(source, "data.source")
    candidate = directory / f"{source}.npz"
    if candidate.is_file():
        return candidate.resolve()
    if source not in KERAS_DATASETS:
        raise FieldError(
            "data.source",
            f"'{source}' is neither an .npz path nor a dataset in {directory} "
            f"(expected {candidate}); Keras datasets: {', '.join(KERAS_DATASETS)}",
        )
    return None


@dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def read_raw(source: str, npz_path: Path | None, directory: Path) -> dict[str, np.ndarray]:
    """Keras's four arrays, from the .npz file or else from Keras's downloader."""
    if npz_path is not None:
        arrays = read_npz(npz_path, "data.source")
        missing = {"x_train", "y_train"} - set(arrays)
        if missing:
            raise FieldError(
                "data.source",
                f"{npz_path} lacks {', '.join(sorted(missing))}; expected Keras's layout "
                "x_train, y_train[, x_test, y_test]",
            )
        return arrays
    from orchestra.keras_compat import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras().datasets, source).load_data()
    except Exception as exc:  # noqa: BLE001 - any download failure means the same to the user
        raise FieldError(
            "data.source",
            f"dataset '{source}' is not in {directory} and Keras could not download it "
            f"({type(exc).__name__}: {str(exc)[:200]}); put {source}.npz in Keras's array "
            f"layout into {directory}, or point {DATASETS_ENV} / --datasets at a folder that has it",
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def read_npz(path: Path, field: str, pick: Callable[[list[str]], list[str]] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` archive (those `pick` chooses from its names,
    when given), never unpickling, and refused before loading when their headers declare more
    bytes than this machine's memory (a compressed archive of zeros
    declares gigabytes in a few kilobytes). Raises FieldError naming `field`."""
    try:
        # Never pickles: a pickled (object) array would run code as it loads.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an archive of named arrays")
        with loaded as npz:
            wanted = npz.files if pick is None else pick(npz.files)
            declared = sum(_declared_bytes(npz.zip, name) for name in wanted)
            if declared > _memory_bytes():
                raise FieldError(field, f"{path} declares {declared / 2**30:.1f} GiB of arrays, more than this "
                                        f"machine's {_memory_bytes() / 2**30:.1f} GiB of memory")
            return {name: npz[name] for name in wanted}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # corrupt, truncated, pickled
        if isinstance(exc, FieldError):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "pickle" in reason.lower() or "object arrays" in reason.lower():
            reason = "it holds pickled objects, which orchestra never loads"
        raise FieldError(field, f"{path} is not a readable .npz of arrays ({reason}); "
                                "save it with numpy.savez, without object arrays") from None


def _declared_bytes(archive: zipfile.ZipFile, name: str) -> int:
    """The bytes the `.npy` header of member `name` declares, read without its data."""
    member_name = f"{name}.npy" if f"{name}.npy" in archive.namelist() else name
    with archive.open(member_name) as member:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(member),
                                                                        np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
    return int(np.prod(shape, dtype=np.float64) * dtype.itemsize)


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The arrays a validation .npz may hold, in the order they are looked for.
VALIDATION_PAIRS = (("x_val", "y_val"), ("x_test", "y_test"), ("x", "y"))


def resolve_validation(spec: DataSpec) -> Path | None:
    """The `.npz` file `data.validation` names (used as it is, as a
    `data.source` path is), or None when it names no file."""
    value = spec.validation_arrays
    if value is None or value == "test":
        return None
    return npz_path(value, "data.validation")


def npz_path(value: str, field: str) -> Path:
    """The absolute path of the `.npz` file `value` names (a symlink
    followed): a regular file, never a FIFO, device or folder, which reading
    would block on or fail in. Raises FieldError naming `field`."""
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is not a regular file (a folder, FIFO or device is never read)" if path.exists() else "does not exist"
        raise FieldError(field, f"{path} {what}; give the path of an .npz file")
    return path.resolve()


def with_validation_resolved(spec: JobSpec) -> JobSpec:
    """`spec` with its validation `.npz` as an absolute path, so that every
    worker, whatever its working folder, reads the file the driver checked."""
    path = resolve_validation(spec.data)
    if path is None or str(path) == spec.data.validation:
        return spec
    return spec.model_copy(update={"data": spec.data.model_copy(update={"validation": str(path)})})


def read_validation(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pair of a validation `.npz`: x_val, y_val, else x_test,
    y_test, else x, y."""
    pairs = ", ".join(f"{x}/{y}" for x, y in VALIDATION_PAIRS)

    def first_pair(names: list[str]) -> list[str]:
        for x_name, y_name in VALIDATION_PAIRS:
            if x_name in names and y_name in names:
                return [x_name, y_name]
        raise FieldError("data.validation", f"{path} holds {', '.join(sorted(names)) or 'no arrays'}; "
                                            f"a validation .npz holds one of the pairs {pairs}")

    x_val, y_val = read_npz(path, "data.validation", first_pair).values()  # only the pair is loaded
    return x_val, y_val


def split_indices(n: int, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices into the `n` training examples, as
    scikit-learn's `train_test_split(x, y, test_size=validation_split or
    validation_size, train_size=train_size, random_state=seed)` draws them:
    one `RandomState(seed)` permutation, validation its first `n_test`
    (`ceil(validation_split * n)`, or `validation_size`, or what
    `train_size` leaves), training the next `train_size` (or the rest).
    Nothing to draw: every example, in order, for training."""
    test_size = spec.validation_split if spec.validation_split is not None else spec.validation_size
    if test_size is None and spec.train_size is None:
        return np.arange(n), np.arange(0)
    if isinstance(test_size, float):
        n_test = int(np.ceil(test_size * n))
    else:
        n_test = n - spec.train_size if test_size is None else test_size
    n_train = n - n_test if spec.train_size is None else spec.train_size
    split_field = "data.validation_split" if spec.validation_split is not None else "data.validation_size"
    if spec.train_size is None and n_test >= n:
        raise FieldError(split_field, f"takes {n_test} of the {n} training examples and leaves none to train on")
    if n_test < 0 or n_train + n_test > n:
        raise FieldError(
            "data.train_size" if spec.train_size and test_size is None else split_field,
            f"asks for {max(n_test, 0)} validation + {n_train} training examples but the source has {n}",
        )
    return sklearn_draw(n, n_test, n_train, spec.seed)


def sklearn_draw(n: int, n_test: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of `n_train` and `n_test` of `n`
    examples, as `train_test_split(random_state=seed)` draws them: one
    `RandomState(seed)` permutation, validation its first `n_test`."""
    order = np.random.RandomState(seed).permutation(n)
    return order[n_test:n_test + n_train], order[:n_test]


def prepare(spec: DataSpec, npz_path: Path | None, directory: Path) -> Arrays:
    """Split, subset, rescale, reshape and encode the arrays as the spec says."""
    raw = read_raw(spec.source, npz_path, directory)
    x, y = raw["x_train"], _column(raw["y_train"])
    train_idx, val_idx = split_indices(len(x), spec)
    x_test, y_test = raw.get("x_test"), raw.get("y_test")
    if x_test is not None and spec.test_size is not None:
        x_test, y_test = x_test[: spec.test_size], y_test[: spec.test_size]
    x_val, y_val = (x[val_idx], y[val_idx]) if len(val_idx) else (None, None)
    if spec.validation_arrays == "test":
        if x_test is None or y_test is None:
            raise FieldError("data.validation", f"is 'test' but {npz_path or spec.source} has no x_test, y_test")
        x_val, y_val = x_test, _column(y_test)
        _check_validation(x_val, y_val, x, y, spec)
    elif spec.validation_arrays is not None:
        x_val, y_val = read_validation(resolve_validation(spec))
        y_val = _column(y_val)
        _check_validation(x_val, y_val, x, y, spec)
    if not spec.test:
        x_test = y_test = None

    num_classes = (spec.num_classes or int(np.max(y)) + 1) if spec.labels == "one_hot" else None
    if num_classes is not None and num_classes > MAX_CLASSES:  # before np.eye: its memory grows with the square
        raise FieldError("data.labels", f"one-hot labels over {num_classes} classes (the largest label + 1); "
                                        f"at most {MAX_CLASSES}: use 'sparse' labels")

    def labels(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if num_classes is None:
            return a
        if a.ndim > 1:
            return a.astype(np.float32)
        if int(a.max()) >= num_classes:
            raise FieldError("data.num_classes", f"label {int(a.max())} is not below num_classes {num_classes}")
        return np.eye(num_classes, dtype=np.float32)[a.astype(np.int64)]

    arrays = Arrays(
        x_train=prepare_features(x[train_idx], spec),
        y_train=labels(y[train_idx]),
        x_val=None, y_val=None,
        x_test=prepare_features(x_test, spec) if x_test is not None else None,
        y_test=labels(_column(y_test)) if x_test is not None else None,
    )
    if spec.validation_arrays == "test" and arrays.x_test is not None:
        arrays.x_val, arrays.y_val = arrays.x_test, arrays.y_test  # the same examples: one copy
    elif x_val is not None:
        arrays.x_val, arrays.y_val = prepare_features(x_val, spec), labels(y_val)
    return arrays


def _check_validation(x_val: np.ndarray, y_val: np.ndarray, x: np.ndarray, y: np.ndarray, spec: DataSpec) -> None:
    """Validation arrays that are not a split of the training arrays, against
    them: the model is built for, and checked against, the training
    examples and labels; validation examples must fit the same model."""
    where = "the test arrays" if spec.validation_arrays == "test" else f"the arrays of {spec.validation_arrays}"
    if x_val.ndim == 0 or y_val.ndim == 0:
        raise FieldError("data.validation", f"{where} are single numbers, not one example and label a row")
    if x_val.dtype.kind not in "biuf":
        raise FieldError("data.validation", f"{where} hold {x_val.dtype} examples; examples are numbers "
                                            "(bool, integer or float), as the training examples are")
    if len(x_val) != len(y_val):
        raise FieldError("data.validation", f"{where} hold {len(x_val)} examples but {len(y_val)} labels")
    if len(x_val) == 0:
        raise FieldError("data.validation", f"{where} hold no examples")
    if x_val.shape[1:] != x.shape[1:]:
        raise FieldError("data.validation", f"{where} hold examples of shape {x_val.shape[1:]} but the training "
                                            f"examples are {x.shape[1:]}")
    if y_val.shape[1:] != y.shape[1:]:
        raise FieldError("data.validation", f"{where} hold labels of shape {y_val.shape[1:]} but the training "
                                            f"labels are {y.shape[1:]}")
    if y.ndim != 1 or y.dtype.kind not in "iu" or spec.images is not None:
        return  # one-hot, multi-output or regression targets: the shape check is the check
    if y_val.dtype.kind not in "iu":
        raise FieldError("data.validation", f"{where} hold {y_val.dtype} labels but the training labels are "
                                            f"integer classes")
    top = spec.num_classes - 1 if spec.num_classes else int(y.max())
    low, high = int(y_val.min()), int(y_val.max())
    if low < min(0, int(y.min())) or high > top:
        raise FieldError("data.validation", f"{where} hold labels from {low} to {high} but the training "
                                            f"labels (which the model is checked against) go from "
                                            f"{int(y.min())} to {top}")


def prepare_features(a: np.ndarray, spec: DataSpec) -> np.ndarray:
    """Examples as the model takes them: float32, rescaled, reshaped as the
    spec says, in memory `host_tensor` can hand to TensorFlow as it is."""
    source = np.asarray(a)
    a = aligned_empty(source.shape, np.float32)
    np.copyto(a, source, casting="unsafe")
    if spec.rescale is not None:
        a *= np.float32(spec.rescale)
    if spec.flatten:
        return a.reshape(len(a), -1)
    if spec.reshape is not None:
        try:
            return a.reshape(len(a), *spec.reshape)
        except ValueError:
            raise FieldError(
                "data.reshape",
                f"cannot reshape examples of shape {a.shape[1:]} to {tuple(spec.reshape)}",
            ) from None
    return a


# Bytes: TensorFlow's kernels abort on a tensor whose data is not aligned to
# EIGEN_MAX_ALIGN_BYTES (at most 64), and `.npy` files align their data to 64.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an `ALIGNMENT` boundary,
    so that `host_tensor` can hand its memory to TensorFlow as it is."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def host_tensor(a: np.ndarray):
    """`a` as a tensor in host memory: `a`'s own memory when TensorFlow can
    use it as it is (C-contiguous, writable and aligned, as are the arrays
    of `prepare` and of `node_cache`), else a copy.

    A read-only array (one from Ray's object store, say) is copied: DLPack,
    the way in without a copy, cannot mark a tensor read-only. A memory map
    opened copy-on-write (`mmap_mode="c"`) is writable and still shares its
    pages with every other process mapping the file."""
    import tensorflow as tf

    a = np.asarray(a)
    with tf.init_scope(), tf.device("/cpu:0"):
        if a.size and a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % ALIGNMENT == 0:
            return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
        return tf.convert_to_tensor(a)


def _column(labels: np.ndarray) -> np.ndarray:
    """Labels of shape (n, 1), as some datasets ship them, as shape (n,)."""
    labels = np.asarray(labels)
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the partial last batch is dropped so that
    every worker takes an equal, non-empty share of every step."""
    return max(1, n_examples // global_batch)


class ArrayExamples:
    """Examples held in memory as arrays; `fetch` gathers a batch by index.

    The arrays become tensors once, here, eagerly and on the host, in place
    where they can (`host_tensor`): every pipeline built over these examples
    then captures the same two tensors as inputs of its traced functions.
    (Made inside the function `tf.data` traces for `map`, as `fetch` once
    did, `tf.constant` of the whole array is a constant node of the graph:
    the array is copied into the function's definition, its optimised
    copies and its kernel, several times the data in memory and seconds of
    every epoch.) Pipelines over these examples skip tf.data's graph
    rewrites (`without_graph_rewrites`)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.y, self._n = y, len(x)  # not x: when TensorFlow had to copy it, the copy is the one kept
        self._x, self._y = host_tensor(x), host_tensor(y)

    def __len__(self) -> int:
        return self._n

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def fetch(self, indices, epoch):
        import tensorflow as tf

        return tf.gather(self._x, indices), tf.gather(self._y, indices)


def without_graph_rewrites(dataset, examples):
    """`dataset` without tf.data's default graph rewrites when it reads
    `ArrayExamples`; other examples' datasets are returned as they are.

    A rewrite serialises the pipeline and builds it again, copying every
    tensor its functions capture: for arrays, a third copy of the whole of
    them in every worker, and one that a memory-mapped array would no
    longer share with the other workers of its node. The array pipelines
    lose nothing by it: their `map` is parallel and their prefetch sized as
    the spec says."""
    if not isinstance(examples, ArrayExamples):
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.with_options(options)


def class_indices(labels: np.ndarray) -> np.ndarray:
    """The class of each example from sparse, one-hot or binary labels."""
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.shape[-1] > 1:
        return labels.argmax(axis=-1)
    return labels.reshape(len(labels)).astype(np.int64)


def training_dataset(
    x: np.ndarray,
    y: np.ndarray,
    **options,
):
    """`training_pipeline` over arrays in memory."""
    return training_pipeline(ArrayExamples(x, y), **options)


def training_pipeline(
    examples,
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int,
    initial_epoch: int,
    class_weight: dict[int, float] | None,
    parallel_calls: int,
    prefetch: int,
    declare_endless: bool = True,
):
    """An endless per-worker dataset: epoch after epoch, this worker's share of
    each global batch, in an order fixed by (seed, epoch).

    Endless, so that MultiWorkerMirroredStrategy never has to vote on the end
    of the data; `fit` is given `steps_per_epoch` instead.

    Args:
        examples: `ArrayExamples` or `images.FolderExamples`: `len()`,
            `labels` and `fetch(indices, epoch)` → (x, y) tensors.
        class_weight: Keras's `class_weight`, given to `fit` as per-example
            sample weights (the third element of each batch).
    """
    import tensorflow as tf

    n = len(examples)
    steps = steps_per_epoch(n, global_batch)
    per_worker = global_batch // world_size
    weights = None
    if class_weight:
        classes = class_indices(examples.labels)
        weights = tf.constant(np.array([class_weight.get(int(c), 1.0) for c in classes], np.float32))

    def epoch_indices(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(
                order, seed=tf.stack([tf.constant(seed, tf.int64), epoch])
            )
        batches = tf.reshape(order[: steps * global_batch], [steps, world_size, per_worker])
        epochs = tf.fill([steps], epoch)
        return tf.data.Dataset.from_tensor_slices((batches[:, rank, :], epochs))

    def gather(indices, epoch):
        x, y = examples.fetch(indices, epoch)
        if weights is None:
            return x, y
        return x, y, tf.gather(weights, indices)

    dataset = (
        tf.data.Dataset.range(initial_epoch, 2**62)
        .flat_map(epoch_indices)
        .map(gather, num_parallel_calls=parallel_calls, deterministic=True)
    )
    if declare_endless:
        # tf.distribute then skips its per-step vote on whether every worker still has data.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return without_graph_rewrites(_unsharded(dataset).prefetch(prefetch), examples)


def evaluation_steps(n_examples: int, per_worker_batch: int, world_size: int) -> int:
    """Batches each worker runs over a whole evaluation set: the same number
    on every worker (as MultiWorkerMirroredStrategy needs), none empty."""
    smallest_share = n_examples // world_size
    if smallest_share == 0:
        raise FieldError("data", f"an evaluation set of {n_examples} examples cannot be split across {world_size} workers")
    largest_share = -(-n_examples // world_size)
    return min(-(-largest_share // per_worker_batch), smallest_share)


def evaluation_dataset(x: np.ndarray, y: np.ndarray, **options):
    """`evaluation_pipeline` over arrays in memory."""
    return evaluation_pipeline(ArrayExamples(x, y), **options)


def evaluation_pipeline(examples, *, per_worker_batch: int, rank: int, world_size: int, prefetch: int = 1):
    """This worker's contiguous share of a whole evaluation set, each example
    in exactly one worker's share, so the job's metrics cover the set once.

    Every worker yields `evaluation_steps(...)` non-empty batches; batches may
    differ in size by a few examples, which leaves Keras's metrics exact
    (they are sums weighted by batch size). Examples are fetched with epoch
    -1: never augmented."""
    import tensorflow as tf

    n = len(examples)
    bounds = np.linspace(0, n, world_size + 1).astype(np.int64)
    start, stop = bounds[rank], bounds[rank + 1]
    steps = evaluation_steps(n, per_worker_batch, world_size)
    edges = np.linspace(start, stop, steps + 1).astype(np.int64)
    starts, stops = tf.constant(edges[:-1]), tf.constant(edges[1:])

    def batch(i):
        return examples.fetch(tf.range(starts[i], stops[i]), tf.constant(-1, tf.int64))

    return without_graph_rewrites(_unsharded(tf.data.Dataset.range(steps).map(batch)).prefetch(prefetch), examples)


def _unsharded(dataset):
    """orchestra shards by hand; keep tf.distribute from sharding again."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)
