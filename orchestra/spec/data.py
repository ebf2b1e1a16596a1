"""The `data` and `data_loader` sections: where examples come from, how they
are prepared, and how they are fed to each worker."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from orchestra.errors import close_match
from orchestra.spec._base import (
    _PATH_END,
    PATH_MAX,
    StrictModel,
    _parse_fraction,
    _usable_path,
)
from orchestra.spec.shards import ShardsSpec

# One-hot labels hold num_classes floats per example in memory (and `validate` makes them):
# 30,000 classes took 6.6 GB. Past this, a model wants sparse labels anyway.
MAX_CLASSES = 1000

VALIDATION_CHOICES = ("split", "test")


def _at(field: str) -> str:
    """Marks the data field a cross-field error is about (see _base._PATH_END)."""
    return f"{field}{_PATH_END}"


class ImageFolderSpec(StrictModel):
    """A class-per-subfolder tree of image files, as Keras's
    `flow_from_directory` reads it: class names are the subfolder names,
    sorted. Files that are not readable images are skipped and counted."""

    train_dir: str = Field(min_length=1, max_length=PATH_MAX, description="Folder with one subfolder of images per class.")
    validation_dir: str | None = Field(
        default=None, max_length=PATH_MAX, description="The same layout for validation; or use data.validation_split."
    )
    target_size: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[256, 256], min_length=2, max_length=2, description="Height and width images are resized to."
    )
    color_mode: Literal["rgb", "grayscale"] = "rgb"
    label_mode: Literal["binary", "categorical", "int"] = Field(
        default="categorical",
        description="binary: one 0/1 value (two classes); categorical: one-hot; int: class index.",
    )

    _paths = field_validator("train_dir", "validation_dir")(_usable_path)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.target_size, 3 if self.color_mode == "rgb" else 1)


class AugmentationSpec(StrictModel):
    """Keras's `ImageDataGenerator` transforms, with its meaning and defaults."""

    rotation_range: float = Field(default=0, ge=0, le=360, description="Degrees of random rotation.")
    width_shift_range: float = Field(default=0, ge=0, lt=1, description="Fraction of the width.")
    height_shift_range: float = Field(default=0, ge=0, lt=1, description="Fraction of the height.")
    shear_range: float = Field(default=0, ge=0, le=360, description="Shear angle in degrees.")
    zoom_range: float = Field(default=0, ge=0, lt=1, description="Zoom in [1 - z, 1 + z].")
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: Literal["constant", "nearest", "reflect", "wrap"] = "nearest"


class DataSpec(StrictModel):
    """Where the examples come from and how they are prepared.

    `source` is a Keras dataset name (`mnist`, `fashion_mnist`, `cifar10`, …),
    looked up first as `<name>.npz` in the dataset directory
    (`ORCHESTRA_DATASETS` or `--datasets`), or a path to an `.npz` file with
    Keras's arrays `x_train`, `y_train` and optionally `x_test`, `y_test`.
    """

    source: str | None = Field(
        default=None, min_length=1, max_length=PATH_MAX,
        description="Keras dataset name (mnist, fashion_mnist, cifar10, ...) or path to an .npz file.",
    )
    rescale: float | None = Field(
        default=None,
        description="Multiply pixel values by this factor, e.g. '1/255'.",
    )
    flatten: bool = Field(default=False, description="Flatten each example to one dimension.")
    reshape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="Reshape each example to this shape (without the batch axis)."
    )
    labels: Literal["sparse", "one_hot"] = Field(
        default="sparse", description="Integer class labels, or one-hot vectors."
    )
    num_classes: int | None = Field(
        default=None, ge=2, le=MAX_CLASSES,
        description=f"Classes for one-hot labels (default: largest label + 1); at most {MAX_CLASSES}.",
    )
    train_size: int | None = Field(
        default=None, ge=1, description="Draw this many training examples at random."
    )
    validation_size: int | None = Field(
        default=None, ge=1,
        description="Draw this many validation examples at random from the training arrays.",
    )
    validation_split: float | None = Field(
        default=None, gt=0, lt=1,
        description="Hold out this fraction of the training arrays for validation, as scikit-learn's "
                    "train_test_split(test_size=..., random_state=seed) does.",
    )
    validation: str | None = Field(
        default=None, min_length=1, max_length=PATH_MAX,
        description="The validation set: 'split' (of the training arrays, by validation_split or "
                    "validation_size; the default), 'test' (the source's test arrays, as "
                    "validation_data=(x_test, y_test)), or the path of an .npz holding x_val, y_val "
                    "(else x_test, y_test, else x, y). With data.shards: 'split' alone is the manifest's "
                    "validation split (orchestra data convert --validation-split), 'test' its test split.",
    )
    test: bool = Field(
        default=True, description="Evaluate the final model on the dataset's test arrays."
    )
    test_size: int | None = Field(
        default=None, ge=1, description="Evaluate on only the first N test examples."
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed of the random split and subsets.")
    images: ImageFolderSpec | None = Field(
        default=None, description="Read a class-per-subfolder tree of image files instead of arrays."
    )
    shards: ShardsSpec | None = Field(
        default=None, description="Read shard files (orchestra data convert) on the fly instead of arrays in memory."
    )
    augmentation: AugmentationSpec | None = Field(
        default=None, description="Random transforms of training images (image folders only); never of validation."
    )

    _parse_rescale = field_validator("rescale", mode="before")(_parse_fraction)
    _paths = field_validator("source", "validation")(_usable_path)

    @field_validator("rescale")
    @classmethod
    def _rescale_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive finite number, e.g. '1/255'")
        return value

    @field_validator("validation")
    @classmethod
    def _validation_kind(cls, value: str | None) -> str | None:
        if value is None or value in VALIDATION_CHOICES or value.endswith(".npz"):
            return value
        close = close_match(value, list(VALIDATION_CHOICES))
        hint = f"; did you mean '{close}'?" if close else ""
        raise ValueError(f"'{value}' is not 'split', 'test' or the path of an .npz file{hint}")

    @model_validator(mode="after")
    def _one_way_to_validate(self) -> DataSpec:
        if [self.source, self.images, self.shards].count(None) != 2:
            raise ValueError("give exactly one of source (arrays), images (an image folder) or shards (shard files)")
        if self.shards is not None and self.shards.problems_with(self):
            raise ValueError(self.shards.problems_with(self))
        if self.augmentation is not None and self.images is None:
            raise ValueError("augmentation applies to image folders: give data.images")
        if self.images is not None and self.validation_size is not None:
            raise ValueError("an image folder takes validation_split or images.validation_dir, not validation_size")
        if self.validation_split is not None and self.validation_size is not None:
            raise ValueError(
                "give either validation_split (a fraction) or validation_size "
                "(a number of examples), not both"
            )
        if self.flatten and self.reshape is not None:
            raise ValueError("give either flatten or reshape, not both")
        if (self.validation == "split" and self.validation_split is None and self.validation_size is None
                and self.shards is None):  # shards: the manifest's validation split
            raise ValueError(f"{_at('validation')}'split' needs validation_split (a fraction) or "
                             "validation_size (a number of examples)")
        if self.validation not in (None, "split"):
            if self.images is not None:
                raise ValueError(f"{_at('validation')}an image folder validates on a split or on "
                                 "images.validation_dir, not on 'test' or an .npz")
            if self.source is None and not (self.shards is not None and self.validation == "test"):
                raise ValueError(f"{_at('validation')}'test' and an .npz go with data.source (arrays); "
                                 "shards take 'test' or 'split'")
            if self.validation_split is not None or self.validation_size is not None:
                field = "validation_split" if self.validation_split is not None else "validation_size"
                raise ValueError(f"{_at(field)}splits the training arrays, but validation is "
                                 f"'{self.validation}': give one of them, or validation 'split'")
        return self

    @property
    def validation_arrays(self) -> str | None:
        """Where validation examples come from besides a split: 'test', an
        .npz path, or None."""
        return None if self.validation in (None, "split") else self.validation

    @property
    def has_validation(self) -> bool:
        folder = self.images is not None and self.images.validation_dir is not None
        return (folder or self.validation_arrays is not None or self.validation_split is not None
                or self.validation_size is not None or self.validation == "split")

    @property
    def label_kind(self) -> str:
        """`sparse`, `one_hot` or `binary`: how labels reach the loss."""
        if self.images is None:
            return self.labels
        return {"int": "sparse", "categorical": "one_hot", "binary": "binary"}[self.images.label_mode]

    @property
    def label_field(self) -> str:
        return "data.images.label_mode" if self.images is not None else "data.labels"


class DataLoaderSpec(StrictModel):
    processes: int = Field(default=2, ge=1, le=64, description="Loader processes per worker for image folders (decoding and augmentation); parallel tf.data calls for arrays.")
    prefetch: int = Field(default=2, ge=0, le=64, description="Batches prepared ahead of the model.")

