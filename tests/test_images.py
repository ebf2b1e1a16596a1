"""Image folders without Ray: listing, skipping, augmentation, sharding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from orchestra.build import data as data_lib
from orchestra.build.images import FolderExamples, index_folder, split_folders
from orchestra.spec import DataSpec
from orchestra.tools.samples import write_image_tree

AUGMENT_ALL = {"rotation_range": 40, "width_shift_range": 0.2, "height_shift_range": 0.2, "shear_range": 0.2,
               "zoom_range": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_image_tree(tmp_path_factory.mktemp("images") / "train", per_class=8, size=24)
    (root / "circle" / "truncated.png").write_bytes((root / "circle" / "0000.png").read_bytes()[:40])
    (root / "square" / "notes.txt").write_text("not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(jpeg, "JPEG")
    (root / "square" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3])
    (root / "square" / "bomb.png").write_bytes(png_header(20000, 20000))
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is huge: Pillow refuses it as a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def data_spec(tree, **extra) -> DataSpec:
    return DataSpec.model_validate({
        "images": {"train_dir": str(tree), "target_size": [24, 24], "label_mode": "categorical"},
        "rescale": "1/255", "augmentation": AUGMENT_ALL, **extra,
    })


def test_unreadable_files_are_skipped_and_counted(tree):
    index = index_folder(str(tree), "data.images.train_dir")
    assert index.class_names == ["circle", "square"]
    assert len(index.files) == 16 and np.bincount(index.labels).tolist() == [8, 8]
    assert sorted(p.rsplit("/", 1)[1] for p in index.skipped) == ["bomb.png", "cut.jpg", "notes.txt", "truncated.png"]


def test_validation_split_is_disjoint_and_seeded(tree):
    splits = split_folders(data_spec(tree, validation_split=0.25))
    assert len(splits.train.files) == 12 and len(splits.validation.files) == 4
    assert not set(splits.train.files) & set(splits.validation.files)
    assert split_folders(data_spec(tree, validation_split=0.25)).validation.files == splits.validation.files


def batches(pipeline, count):
    return [tuple(t.numpy() for t in batch) for batch in pipeline.take(count)]


def test_augmentation_changes_training_batches_never_validation(tree):
    spec = data_spec(tree)
    index = index_folder(str(tree), "data.images.train_dir")
    examples = FolderExamples(index, spec, threads=2, seed=0)
    raw = np.stack([examples.load(i, -1) for i in range(len(examples))])
    assert raw.max() <= 1.0 and raw.shape == (16, 24, 24, 3)

    options = dict(global_batch=16, rank=0, world_size=1, shuffle=False, seed=0, class_weight=None,
                   parallel_calls=2, prefetch=1)
    epoch_0, epoch_1 = batches(data_lib.training_pipeline(examples, initial_epoch=0, **options), 2)
    assert epoch_0[0].shape == raw.shape
    assert np.abs(epoch_0[0] - raw).mean() > 0.01, "training images must be augmented"
    assert np.abs(epoch_0[0] - epoch_1[0]).mean() > 0.01, "each epoch draws new transforms"
    again = batches(data_lib.training_pipeline(examples, initial_epoch=0, **options), 1)[0]
    np.testing.assert_array_equal(again[0], epoch_0[0])  # seeded by (seed, epoch, file)
    np.testing.assert_array_equal(epoch_0[1], np.eye(2)[index.labels])

    validation = data_lib.evaluation_pipeline(examples, per_worker_batch=5, rank=0, world_size=1)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches(validation, 100)]), raw)


def test_workers_share_each_epoch_without_overlap(tree):
    spec = data_spec(tree).model_copy(update={"augmentation": None})
    examples = FolderExamples(index_folder(str(tree), "data.images.train_dir"), spec, threads=2, seed=0)
    flat = {i: examples.load(i, -1).tobytes() for i in range(len(examples))}
    seen = []
    for rank in (0, 1):
        pipeline = data_lib.training_pipeline(
            examples, global_batch=8, rank=rank, world_size=2, shuffle=True, seed=3, initial_epoch=0,
            class_weight={1: 3.0}, parallel_calls=2, prefetch=1)
        for x, y, weight in batches(pipeline, 2):  # one epoch: 16 images, global batch 8
            assert x.shape[0] == 4
            np.testing.assert_array_equal(weight, np.where(y.argmax(-1) == 1, 3.0, 1.0))
            seen += [next(i for i, b in flat.items() if b == image.tobytes()) for image in x]
    assert sorted(seen) == list(range(16))
