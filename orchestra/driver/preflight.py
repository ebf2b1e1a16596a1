"""Every check that can fail before a worker starts, reported together.

Pydantic has checked the spec's structure; here it meets the world: Keras's
registries, the data files, the storage root and the cluster's size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from orchestra.build import data as data_lib
from orchestra.build.images import ImageSplits, split_folders
from orchestra.driver.plugins import plugin_problems
from orchestra.driver.ray_runtime import check_embedded_auth, cluster_nodes
from orchestra.driver.resources import fit_problems, footprint, this_machine
from orchestra.driver.trial import Sample, trial_step
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
        available_cpus: this machine's CPUs as an embedded Ray would have
            them (default: the machine's count).
        check_cluster: check the job against the cluster it will run on
            (the Ray cluster this process is a job driver of, else this
            machine's embedded Ray): memory, CPUs, GPUs.
        check_files: False checks everything but the files the spec names
            (data, weights) and the storage, for a spec written for
            another machine's storage (`validate --schema-only`); the
            trial step then takes generated examples.
    """
    from orchestra.build.model import build_model, check_keras_names

    problems: list[tuple[str, str]] = list(check_keras_names(spec)) + plugin_problems(spec)

    root = None
    try:
        root = Storage(storage_root(storage, spec.storage))
        if check_files:
            root.check_writable()
    except StorageError as exc:
        problems.append(("storage", str(exc)))

    directory = data_lib.datasets_dir(datasets)
    found = DataFound()
    summary: list[str] = []
    try:
        if check_files:
            found = _inspect_data(spec, directory)
            spec = data_lib.with_validation_resolved(spec)  # workers read the file the driver checked
            input_shape, to_build = tuple(spec.model.input_shape or found.shape), spec
        else:
            known_shape = spec.data.images.image_shape if spec.data.images else spec.model.input_shape
            input_shape = tuple(known_shape or ())
            # Without the data, the model is built only where its input shape is known without it.
            to_build = _without_files(spec) if known_shape or spec.model.backbone else None
        if not problems and to_build is not None:
            problems += _resource_problems(to_build, input_shape, found.nbytes, check_cluster, available_cpus)
        if not problems and to_build is not None:
            model = build_model(to_build, input_shape)
            model.summary(print_fn=summary.append)
            trial_step(spec, model, found.sample or Sample.generated(spec, model))
    except FieldError as exc:
        problems.append((exc.field, str(exc)))

    if problems:
        raise SpecError(problems, source)
    return Prepared(spec, root, found.npz_path, directory, found.dropped, input_shape, "\n".join(summary),
                    found.images)


def _resource_problems(spec: JobSpec, input_shape: tuple[int, ...], data_bytes: int, check_cluster: bool,
                       available_cpus: float | None) -> list[tuple[str, str]]:
    """The job against the cluster it will run on; without the cluster
    (in-process, schema only), against this machine's memory, where the
    driver builds the model and runs the trial step."""
    need = footprint(spec, input_shape, data_bytes)
    machine = this_machine()
    if available_cpus is not None:
        machine = dataclasses.replace(machine, cpus=available_cpus)
    if not check_cluster:
        return fit_problems(spec, need, [machine], fixed=False)[:1] if need.total > machine.memory else []
    nodes = cluster_nodes(show_worker_output=spec.fit.verbose > 0)
    if not nodes:
        check_embedded_auth()
    return fit_problems(spec, need, nodes or [machine], fixed=not nodes)


@dataclass
class DataFound:
    """What reading the spec's data found (nothing, when it was not read)."""

    npz_path: Path | None = None
    images: ImageSplits | None = None
    dropped: int = 0
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    sample: Sample | None = None


def _inspect_data(spec: JobSpec, directory: Path) -> DataFound:
    """Read the data the spec names and check it against the batch size and
    the workers: where it is, examples dropped per epoch, the shape of one
    example, the bytes a worker holds, two examples for the trial step.
    Raises FieldError naming the field."""
    npz_path, images, nbytes = None, None, 0
    if spec.data.shards is not None:  # from the manifest and a few examples, never the whole set
        from orchestra.build.shards import inspect_shards

        shards = inspect_shards(spec, directory)
        return DataFound(None, None, shards.dropped, shards.shape, 0, Sample(shards.x, shards.y, shards.labels))
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
        distinct = {id(a): a for a in vars(arrays).values() if a is not None}  # validation on 'test' shares x_test
        nbytes = sum(a.nbytes for a in distinct.values())
    if sizes["training"] < spec.fit.batch_size:
        raise data_lib.FieldError(
            "fit.batch_size", f"{spec.fit.batch_size} is larger than the {sizes['training']} training examples")
    for name, size in sizes.items():
        if name != "training" and size is not None and size < spec.scaling.workers:
            raise data_lib.FieldError(
                "data", f"the {name} set has {size} examples, fewer than the {spec.scaling.workers} workers")
    dropped = sizes["training"] % spec.fit.batch_size if spec.fit.steps_per_epoch is None else 0
    sample = Sample.of_images(spec, images.train) if images else Sample.of_arrays(arrays.x_train, arrays.y_train)
    return DataFound(npz_path, images, dropped, data_shape, nbytes, sample)


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
