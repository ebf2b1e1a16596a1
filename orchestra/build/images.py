"""Image folders: a class-per-subfolder tree → per-worker batches.

The files are listed (and each checked to be a readable image) once, on
the driver; the workers get the list and share every global batch as they
do with arrays (`data.training_pipeline`), so each file is read once per
epoch across the job. On a training worker a batch is decoded and
augmented by its `data_loader.processes` loader processes
(`loader_processes.LoaderPool`); the driver's and the client's few reads
decode in their own process. The transforms are Keras's
`ImageDataGenerator` ones, drawn from a generator seeded by (seed, epoch,
file), and training batches only are augmented.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestra.build.loader_processes import LoaderPool, Recipe, decode_image
from orchestra.errors import FieldError, printable
from orchestra.spec import MAX_CLASSES, DataSpec, ImageFolderSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class FolderIndex:
    """The readable images of a tree, their class indices, and what was skipped."""

    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "labels": self.labels.tolist(), "class_names": self.class_names,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FolderIndex:
        return cls(list(raw["files"]), np.array(raw["labels"], np.int64), list(raw["class_names"]),
                   list(raw["skipped"]))


@dataclass
class ImageSplits:
    train: FolderIndex
    validation: FolderIndex | None

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "validation": self.validation and self.validation.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageSplits:
        validation = raw["validation"]
        return cls(FolderIndex.from_dict(raw["train"]), validation and FolderIndex.from_dict(validation))

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + (self.validation.skipped if self.validation else [])


def is_readable_image(path: Path) -> bool:
    """Whether Pillow decodes the whole file: `verify` alone passes a
    truncated JPEG, whose pixels fail only when they are read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - Pillow raises many kinds (DecompressionBombError is none of OSError's)
        return False


# Entries (files and folders) listed under one image folder at most: a
# folder such as "../../.." is refused before its tree is walked, let alone
# its images decoded.
MAX_ENTRIES = 1_000_000


def index_folder(folder: str, field_name: str, class_names: list[str] | None = None) -> FolderIndex:
    """Every file under `folder/<class>/`, sorted; classes are the sorted
    subfolder names (or `class_names`, those of the training folder).

    No symbolic link inside the folder is followed: a class folder that is
    one is refused, a file or folder inside a class that is one is skipped
    (and counted). Errors name the field and counts, never the folder's
    entries (they reach job logs that others read).

    Args:
        folder: the tree's root.
        field_name: the spec field that names it, for errors.
        class_names: the classes to expect; default: the subfolders found.
    """
    try:
        root = Path(folder).expanduser()
        is_folder = root.is_dir()
    except (RuntimeError, ValueError, OSError):  # '~nouser', a NUL byte
        is_folder = False
    if not is_folder:
        raise FieldError(field_name, f"no such folder: {printable(folder)}")
    subfolders = _entries(root, field_name, MAX_ENTRIES)
    links = [entry for entry in subfolders if entry.is_symlink() and not entry.name.startswith(".")]
    if links:
        raise FieldError(field_name, f"{len(links)} of its subfolders or files are symbolic links; an image folder's "
                                     "classes must be real folders inside it (no link is followed)")
    found = sorted(entry.name for entry in subfolders
                   if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."))
    names = class_names or found
    if not 2 <= len(names) <= MAX_CLASSES:
        raise FieldError(field_name, f"needs a subfolder per class, from 2 to {MAX_CLASSES}; "
                                     f"it has {len(found)} subfolders")
    budget = MAX_ENTRIES - len(subfolders)
    candidates: list[tuple[int, str]] = []
    skipped: list[str] = []
    for label, name in enumerate(names):
        paths, links, budget = _walk(root / name, field_name, budget)
        skipped += links
        candidates += [(label, path) for path in paths]
    files, labels = [], []
    for label, path in candidates:
        if Path(path).suffix.lower() in IMAGE_SUFFIXES and is_readable_image(Path(path)):
            files.append(str(Path(path).absolute()))
            labels.append(label)
        else:
            skipped.append(path)
    if not files:
        raise FieldError(field_name, f"has no readable images in its {len(names)} class folders "
                                     f"({len(skipped)} files skipped)")
    return FolderIndex(files, np.array(labels, np.int64), list(names), skipped)


def _entries(folder: Path, field_name: str, budget: int) -> list[os.DirEntry]:
    """The entries of one folder, at most `budget` of them (FieldError beyond)."""
    entries = []
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                entries.append(entry)
                if len(entries) > budget:
                    raise FieldError(field_name, f"holds more than {MAX_ENTRIES} files and folders, the most an "
                                                 "image folder may (is it the right folder?)")
    except OSError as exc:
        raise FieldError(field_name, f"cannot list a folder inside it: {exc.strerror}") from None
    return entries


def _walk(folder: Path, field_name: str, budget: int) -> tuple[list[str], list[str], int]:
    """(regular files, symbolic links skipped, budget left) under one class
    folder, sorted, hidden entries left out, no link followed."""
    if not folder.is_dir() or folder.is_symlink():
        return [], [], budget
    files, links, stack = [], [], [folder]
    while stack:
        entries = _entries(stack.pop(), field_name, budget)
        budget -= len(entries)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                links.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.path)
    return sorted(files), sorted(links), budget


def split_folders(spec: DataSpec) -> ImageSplits:
    """The training and validation images a spec's `data.images` names."""
    images = spec.images
    train = index_folder(images.train_dir, "data.images.train_dir")
    validation = None
    if images.validation_dir is not None:
        validation = index_folder(images.validation_dir, "data.images.validation_dir", train.class_names)
    elif spec.validation_split is not None:
        order = np.random.default_rng(spec.seed).permutation(len(train.files))
        n_val = int(np.ceil(spec.validation_split * len(order)))
        keep, held = np.sort(order[n_val:]), np.sort(order[:n_val])
        validation = FolderIndex([train.files[i] for i in held], train.labels[held], train.class_names)
        train = FolderIndex([train.files[i] for i in keep], train.labels[keep], train.class_names, train.skipped)
    return ImageSplits(train, validation)


def encode_labels(classes: np.ndarray, label_mode: str, num_classes: int) -> np.ndarray:
    """Class indices as Keras's `label_mode` gives them."""
    if label_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[classes]
    if label_mode == "binary":
        return classes.astype(np.float32).reshape(-1, 1)
    return classes.astype(np.int32)


def decode(path: str, images: ImageFolderSpec) -> np.ndarray:
    """One file as float32 (height, width, channels), resized as Keras's
    `load_img` does by default (nearest neighbour)."""
    height, width = images.target_size
    return decode_image(path, height, width, images.color_mode != "rgb")


def recipe(spec: DataSpec, seed: int) -> Recipe:
    """What a loader does to each file of a spec's image folders."""
    height, width = spec.images.target_size
    augmentation = spec.augmentation.model_dump() if spec.augmentation is not None else None
    return Recipe(height, width, spec.images.color_mode != "rgb", spec.rescale, augmentation, seed)


class FolderExamples:
    """Images read from files on demand, for `data.training_pipeline`.

    Args:
        index: the files and their classes.
        spec: the job's `data` section (target size, colour, labels,
            rescale, augmentation).
        threads: with no `pool`, the size of the thread pool that decodes
            in this process (the driver's and the client's reads).
        seed: seeds the augmentation with (seed, epoch, file index).
        pool: loader processes that decode instead (a training worker's,
            `data_loader.processes` of them, shared by its sets); made
            with `recipe(spec, seed)`.

    Example:

    >>> import tempfile
    >>> from orchestra.tools.samples import write_image_tree
    >>> root = str(write_image_tree(tempfile.mkdtemp(), per_class=2, size=8))
    >>> spec = DataSpec.model_validate({"images": {"train_dir": root, "target_size": [8, 8],
    ...                                                "label_mode": "int"}})
    >>> index = index_folder(root, "data.images.train_dir")
    >>> with LoaderPool(2, recipe(spec, seed=0)) as pool:
    ...     x, y = FolderExamples(index, spec, seed=0, pool=pool).load_batch(np.arange(4), np.int64(0))
    >>> x.shape, y.tolist()
    ((4, 8, 8, 3), [0, 0, 1, 1])
    """

    def __init__(self, index: FolderIndex, spec: DataSpec, threads: int = 1, seed: int = 0,
                 pool: LoaderPool | None = None):
        self.index, self.spec, self.seed, self.pool = index, spec, seed, pool
        self.recipe = recipe(spec, seed)
        self.y = encode_labels(index.labels, spec.images.label_mode, len(index.class_names))
        self.threads = None if pool else ThreadPoolExecutor(max_workers=threads, thread_name_prefix="orchestra-images")

    def __len__(self) -> int:
        return len(self.index.files)

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def load(self, i: int, epoch: int) -> np.ndarray:
        """Example `i` as the model sees it, in this process; augmented when `epoch` >= 0."""
        return self.recipe.load(self.index.files[i], i, epoch)

    def load_batch(self, indices: np.ndarray, epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        if self.pool is not None:
            x = self.pool.load([(int(i), self.index.files[i]) for i in indices], int(epoch))
        else:
            x = np.stack(list(self.threads.map(lambda i: self.load(int(i), int(epoch)), indices)))
        return x, self.y[indices]

    def fetch(self, indices, epoch):
        import tensorflow as tf

        label_type = tf.int32 if self.y.dtype == np.int32 else tf.float32
        x, y = tf.numpy_function(self.load_batch, [indices, epoch], [tf.float32, label_type], stateful=False)
        x.set_shape([None, *self.spec.images.image_shape])
        y.set_shape([None, *self.y.shape[1:]])
        return x, y

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every example, unaugmented, in memory (for evaluate and predict)."""
        return self.load_batch(np.arange(len(self)), np.int64(-1))
