"""Every check that can fail before a worker starts, reported together.

Pydantic has checked the spec's structure; here it meets the world: Keras's
registries, the data files, the storage root and the cluster's size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from orchestra.build import data as data_lib
from orchestra.build.images import ImageSplits, split_folders
from orchestra.errors import FieldError, SpecError, StorageError
from orchestra.spec import JobSpec
from orchestra.storage.folders import Storage, storage_root


@dataclass
class Prepared:
    """What the checks found, handed on to the driver's run.

    A background driver gets it from the client that checked the spec, as
    JSON (`to_json`), so the checks run once per submit."""

    spec: JobSpec
    storage: Storage
    npz_path: Path | None
    datasets_dir: Path
    examples_dropped_per_epoch: int
    input_shape: tuple[int, ...]
    model_summary: str = ""
    images: ImageSplits | None = None

    def to_json(self) -> str:
        return json.dumps({
            "spec": self.spec.model_dump(mode="json"),
            "storage": str(self.storage.root),
            "npz_path": None if self.npz_path is None else str(self.npz_path),
            "datasets_dir": str(self.datasets_dir),
            "examples_dropped_per_epoch": self.examples_dropped_per_epoch,
            "input_shape": list(self.input_shape),
            "model_summary": self.model_summary,
            "images": None if self.images is None else self.images.to_dict(),
        })

    @classmethod
    def from_json(cls, text: str) -> Prepared:
        raw = json.loads(text)
        return cls(
            spec=JobSpec.model_validate(raw["spec"]),
            storage=Storage(Path(raw["storage"])),
            npz_path=None if raw["npz_path"] is None else Path(raw["npz_path"]),
            datasets_dir=Path(raw["datasets_dir"]),
            examples_dropped_per_epoch=int(raw["examples_dropped_per_epoch"]),
            input_shape=tuple(int(n) for n in raw["input_shape"]),
            model_summary=str(raw["model_summary"]),
            images=None if raw["images"] is None else ImageSplits.from_dict(raw["images"]),
        )


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
    from orchestra.build.model import build_model, check_keras_names

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
    npz_path, images, dropped, input_shape = None, None, 0, ()
    summary: list[str] = []
    try:
        if check_files:
            npz_path, images, dropped, data_shape = _inspect_data(spec, directory)
            input_shape, to_build = tuple(spec.model.input_shape or data_shape), spec
        else:
            known_shape = spec.data.images.image_shape if spec.data.images else spec.model.input_shape
            input_shape = tuple(known_shape or ())
            # Without the data, the model is built only where its input shape is known without it.
            to_build = _without_files(spec) if known_shape or spec.model.backbone else None
        if not problems and to_build is not None:
            build_model(to_build, input_shape).summary(print_fn=summary.append)
    except FieldError as exc:
        problems.append((exc.field, str(exc)))

    if problems:
        raise SpecError(problems, source)
    return Prepared(spec, root, npz_path, directory, dropped, input_shape, "\n".join(summary), images)


def _inspect_data(spec: JobSpec, directory: Path) -> tuple[Path | None, ImageSplits | None, int, tuple[int, ...]]:
    """Read the data the spec names and check it against the batch size and
    the workers: (npz path, image splits, examples dropped per epoch, shape
    of one example). Raises FieldError naming the field."""
    npz_path, images = None, None
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
        raise data_lib.FieldError(
            "fit.batch_size", f"{spec.fit.batch_size} is larger than the {sizes['training']} training examples")
    for name, size in sizes.items():
        if name != "training" and size is not None and size < spec.scaling.workers:
            raise data_lib.FieldError(
                "data", f"the {name} set has {size} examples, fewer than the {spec.scaling.workers} workers")
    dropped = sizes["training"] % spec.fit.batch_size if spec.fit.steps_per_epoch is None else 0
    return npz_path, images, dropped, data_shape


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
