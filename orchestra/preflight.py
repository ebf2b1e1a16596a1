"""Every check that can fail before a worker starts, reported together.

Pydantic has checked the spec's structure; here it meets the world: Keras's
registries, the data files, the storage root and the cluster's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestra import data as data_lib
from orchestra.images import ImageSplits, split_folders
from orchestra.spec import JobSpec, SpecError
from orchestra.storage import Storage, StorageError, storage_root


@dataclass
class Prepared:
    """What the checks found, handed on to dispatch."""

    spec: JobSpec
    storage: Storage
    npz_path: Path | None
    datasets_dir: Path
    examples_dropped_per_epoch: int
    input_shape: tuple[int, ...]
    model_summary: str = ""
    images: ImageSplits | None = None


def preflight(
    spec: JobSpec,
    *,
    storage: str | None = None,
    datasets: str | None = None,
    available_cpus: float | None = None,
    check_cluster: bool = True,
    source: str = "spec",
    check_files: bool = True,
) -> Prepared:
    """Raise SpecError listing every problem, or return what dispatch needs.

    Args:
        check_files: False checks everything but the files the spec names
            (data, weights) and the storage, for a spec written for
            another machine's storage (`validate --schema-only`).
    """
    from orchestra.model import ModelError, build_model, check_keras_names

    problems: list[tuple[str, str]] = list(check_keras_names(spec))

    root = None
    try:
        root = Storage(storage_root(storage, spec.storage))
        if check_files:
            root.check_writable()
    except StorageError as exc:
        problems.append(("storage", str(exc)))

    needed = spec.scaling.workers * spec.scaling.cpus_per_worker
    capacity = available_cpus if available_cpus is not None else float(os.cpu_count() or 1)
    if check_cluster and needed > capacity:
        problems.append((
            "scaling.workers",
            f"{spec.scaling.workers} workers x {spec.scaling.cpus_per_worker:g} CPU need {needed:g} CPUs "
            f"but the cluster has {capacity:g}: use at most {int(capacity // spec.scaling.cpus_per_worker)} workers "
            "or fewer scaling.cpus_per_worker",
        ))

    directory = data_lib.datasets_dir(datasets)
    npz_path = None
    dropped = 0
    input_shape: tuple[int, ...] = ()
    summary: list[str] = []
    images = None
    try:
        if not check_files:
            known_shape = spec.data.images.image_shape if spec.data.images else spec.model.input_shape
            if not problems and (known_shape or spec.model.backbone):
                build_model(_without_files(spec), tuple(known_shape or ())).summary(print_fn=summary.append)
            input_shape = tuple(known_shape or ())
            raise _Unchecked()
        if spec.data.images is not None:
            images = split_folders(spec.data)
            sizes = {"training": len(images.train.files),
                     "validation": len(images.validation.files) if images.validation else None}
            data_shape = spec.data.images.image_shape
        else:
            npz_path = data_lib.resolve_source(spec.data.source, directory)
            arrays = data_lib.prepare(spec.data, npz_path, directory)
            sizes = {"training": len(arrays.x_train), "validation": _len(arrays.x_val), "test": _len(arrays.x_test)}
            data_shape = arrays.input_shape
        if sizes["training"] < spec.fit.batch_size:
            raise data_lib.DataError(
                "fit.batch_size", f"{spec.fit.batch_size} is larger than the {sizes['training']} training examples")
        for name, size in sizes.items():
            if name != "training" and size is not None and size < spec.scaling.workers:
                raise data_lib.DataError(
                    "data", f"the {name} set has {size} examples, fewer than the {spec.scaling.workers} workers")
        if spec.fit.steps_per_epoch is None:
            dropped = sizes["training"] % spec.fit.batch_size
        input_shape = tuple(spec.model.input_shape or data_shape)
        if not problems:
            build_model(spec, data_shape).summary(print_fn=summary.append)
    except _Unchecked:
        pass
    except data_lib.DataError as exc:
        problems.append((exc.field, str(exc)))
    except ModelError as exc:
        problems.append((exc.field, str(exc)))

    if problems:
        raise SpecError(problems, source)
    return Prepared(spec, root, npz_path, directory, dropped, input_shape, "\n".join(summary), images)


class _Unchecked(Exception):
    """The files were not to be checked: nothing more to do."""


def _len(array) -> int | None:
    return None if array is None else len(array)


def _without_files(spec: JobSpec) -> JobSpec:
    """The spec with its backbone's weights file left out, so the model can
    be built without the file (its shape is checked where the file is)."""
    backbone = spec.model.backbone
    if backbone is None or backbone.weights is None:
        return spec
    model = spec.model.model_copy(update={"backbone": backbone.model_copy(update={"weights": None})})
    return spec.model_copy(update={"model": model})
