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
from orchestra.errors import FieldError
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


# Hostile folders: no link followed, a cap on what is listed, errors that list nothing.

def small_tree(root):
    return write_image_tree(root, per_class=3, size=8)


def refusal(folder) -> str:
    with pytest.raises(FieldError) as info:
        index_folder(str(folder), "data.images.train_dir")
    assert info.value.field == "data.images.train_dir"
    return str(info.value)


def test_a_class_folder_that_is_a_link_is_refused_without_naming_it(tmp_path):
    root = small_tree(tmp_path / "train")
    outside = small_tree(tmp_path / "elsewhere")
    (root / "secret_name").symlink_to(outside / "circle", target_is_directory=True)
    message = refusal(root)
    assert "symbolic link" in message and "secret_name" not in message and "circle" not in message


def test_links_inside_a_class_are_skipped_not_followed(tmp_path):
    root = small_tree(tmp_path / "train")
    outside = small_tree(tmp_path / "elsewhere")
    (root / "circle" / "linked.png").symlink_to(outside / "circle" / "0000.png")
    (root / "circle" / "linked_folder").symlink_to(outside / "square", target_is_directory=True)
    index = index_folder(str(root), "data.images.train_dir")
    assert len(index.files) == 6 and not any("elsewhere" in path or "linked" in path for path in index.files)
    assert sorted(path.rsplit("/", 1)[1] for path in index.skipped) == ["linked.png", "linked_folder"]


def test_a_huge_tree_is_refused_before_it_is_walked(tmp_path, monkeypatch):
    """`train_dir: "../../.."` would walk the filesystem: past MAX_ENTRIES
    entries the walk stops, and the error names no entry."""
    from orchestra.build import images

    root = small_tree(tmp_path / "train")
    for i in range(30):
        (root / "square" / f"private_{i}.txt").write_text("x")
    monkeypatch.setattr(images, "MAX_ENTRIES", 20)
    message = refusal(root)
    assert "more than 20 files and folders" in message and "private" not in message and "square" not in message


def test_errors_count_the_folders_entries_never_list_them(tmp_path):
    lonely = tmp_path / "lonely"
    (lonely / "only_class").mkdir(parents=True)
    (lonely / "other_name").mkdir()
    (lonely / "other_name" / "notes.txt").write_text("x")
    message = refusal(lonely)
    assert "no readable images" in message and "only_class" not in message and "other_name" not in message
    (lonely / "other_name").rename(tmp_path / "moved")
    message = refusal(lonely)
    assert "it has 1 subfolders" in message and "only_class" not in message
    assert "no such folder" in refusal("~nosuchuser_orchestra/x") and "no such folder" in refusal("/tmp/a\x00b")


def test_more_class_folders_than_one_hot_labels_allow_are_refused(tmp_path, monkeypatch):
    from orchestra.build import images

    root = write_image_tree(tmp_path / "train", per_class=1, size=8)
    (root / "third").mkdir()
    monkeypatch.setattr(images, "MAX_CLASSES", 2)
    message = refusal(root)
    assert "from 2 to 2" in message and "it has 3 subfolders" in message and "third" not in message
