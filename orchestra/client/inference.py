"""A finished job's model put to use: evaluate it on data, predict classes.

Both run in this process with plain Keras (no workers): the model is the
job's best checkpoint when it has one, else the model training ended with.
Storage is data, never code: the model is rebuilt from the job's spec and
only its weights are read from the file.
"""

from __future__ import annotations

import contextlib
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from orchestra.errors import FieldError, JobStateError, SpecError, StorageError
from orchestra.spec import DataSpec, JobSpec, problems_of
from orchestra.storage.folders import Storage, model_file, storage_root
from orchestra.storage.record import JobRecord


def load_model(job_id: str, storage: str | None = None, checkpoint: str | None = None) -> Any:
    """Load a job's model with tf-keras, compiled as the spec says.

    Args:
        job_id: the job.
        storage: its storage root (default: ORCHESTRA_STORAGE or ~/orchestra_storage).
        checkpoint: None or `"final"` for the model training ended with
            (the one `test_metrics` evaluates; the best epoch's under
            `restore_best_weights`), `"best"` for the best checkpoint,
            `"latest"` for the newest one.
    """
    return load_record_model(Storage(storage_root(storage)).read_record(job_id), checkpoint)


def load_record_model(record: JobRecord, checkpoint: str | None = None) -> Any:
    """`load_model` for a job record already read. The model is rebuilt from
    the job's spec (validated again) and only the weights are read from the
    file: nothing in storage is code, so a `.keras` file's config is never
    deserialized. JobStateError, naming the file, if the weights do not fit."""
    from orchestra.build.model import build_model

    if checkpoint in (None, "final"):
        directory = record.model_path
    elif checkpoint == "best":
        directory = record.best_checkpoint
    elif checkpoint == "latest":
        directory = record.checkpoints[-1].path if record.checkpoints else None
    else:
        raise ValueError(f"checkpoint must be 'final', 'best' or 'latest', not {checkpoint!r}")
    if directory is None:
        raise JobStateError(f"job {record.job_id} ({record.state.value}) has no {checkpoint or 'final'} model")
    path = model_file(directory)
    if path.is_symlink():
        raise StorageError(f"job {record.job_id}: {path} is a symlink: refused")
    if not path.is_file():
        raise JobStateError(f"job {record.job_id}: its {checkpoint or 'final'} model is gone ({path} is missing)")
    model = build_model(_spec_without_files(record), tuple(record.input_shape))
    load_weights_only(model, path, record.job_id)
    return model


def _spec_without_files(record: JobRecord) -> JobSpec:
    """The record's spec, validated again (the record is input too); its
    backbone's weights file is left out: the job's own weights replace it."""
    try:
        spec = JobSpec.model_validate(record.spec)
    except ValidationError as exc:
        field, message = (problems_of(exc, JobSpec) or [("spec", str(exc))])[0]
        raise StorageError(f"job {record.job_id}: the spec in its record is not valid ({field}: {message})") from None
    backbone = spec.model.backbone
    if backbone is None or backbone.weights is None:
        return spec
    backbone = backbone.model_copy(update={"weights": None})
    return spec.model_copy(update={"model": spec.model.model_copy(update={"backbone": backbone})})


def load_weights_only(model, path: Path, job_id: str) -> None:
    """Read the weights of `path` (`model.keras` or `model.weights.h5`) into
    `model`. For both names tf-keras's `load_weights` reads only the weights
    (saving_lib.load_weights_only: a `.keras` archive's `model.weights.h5`,
    never its config or its modules); a `.keras` that is not a zip archive
    would go another way, and HDF5 links to other files would be followed,
    so both are refused here."""
    if not stat.S_ISREG(path.lstat().st_mode):
        raise StorageError(f"job {job_id}: {path} is not a regular file")
    if path.name.endswith(".keras") and not zipfile.is_zipfile(path):
        raise JobStateError(f"job {job_id}: {path} is not a .keras archive")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "build"):
        optimizer.build(model.trainable_variables)  # the file's optimizer state has somewhere to go
    try:
        outside = link_out_of(path)
        if outside is None:
            model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py, zipfile and Keras raise many kinds for a file that does not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise JobStateError(f"job {job_id}: the weights in {path} do not fit the model its spec builds: "
                            f"{first}") from None
    if outside is not None:
        raise StorageError(f"job {job_id}: {path} reads another file through its object {outside!r}: refused")


def link_out_of(path: Path) -> str | None:
    """The first object of the weights file `path` (of a `.keras` archive:
    its `model.weights.h5`) that HDF5 would read from another file (an
    external link, a virtual dataset), or None."""
    import h5py

    found: list[str] = []
    with contextlib.ExitStack() as stack:
        source: Any = path
        if path.name.endswith(".keras"):
            source = stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open("model.weights.h5"))
        weights = stack.enter_context(h5py.File(source, "r"))

        def visit(name: str, link: Any) -> None:
            if isinstance(link, h5py.ExternalLink):
                found.append(name)
            elif isinstance(link, h5py.HardLink):
                target = weights.get(name)
                if isinstance(target, h5py.Dataset) and target.is_virtual:
                    found.append(name)

        weights.visititems_links(visit)
    return found[0] if found else None


def load_job_model(job_id: str, storage: str | None = None, checkpoint: str | None = None):
    """(model, record): `checkpoint` None picks the best checkpoint if the job
    has one, else its final model; "best", "latest" or "final" choose."""
    record = Storage(storage_root(storage)).read_record(job_id)
    if checkpoint is None:
        checkpoint = "best" if record.best_checkpoint else "final"
    return load_record_model(record, checkpoint), record


def _data_spec(record, overrides: dict[str, Any] | None) -> DataSpec:
    """The job's data section with `overrides` merged in (validated)."""
    data = dict(record.spec["data"])
    overrides = overrides or {}
    if "source" in overrides:
        data.pop("images", None)
        data.pop("augmentation", None)
    if "images" in overrides:
        data.pop("source", None)
    data.update(overrides)
    try:
        return JobSpec.model_validate(dict(record.spec, data=data)).data
    except ValidationError as exc:
        problems = [(path, message) for path, message in problems_of(exc, JobSpec) if path.startswith("data")]
        if problems:
            raise SpecError(problems, "--data") from None
    # Rules of the whole job (e.g. what a callback monitors) may not hold for other data; the data must.
    return DataSpec.model_validate(data)


def evaluation_arrays(data: DataSpec, datasets: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, which set): the test arrays when the data has them, else the
    validation set, else the training set, all unaugmented."""
    from orchestra.build import data as data_lib

    if data.images is not None:
        from orchestra.build.images import FolderExamples, split_folders

        splits = split_folders(data)
        which, index = ("validation", splits.validation) if splits.validation else ("training", splits.train)
        x, y = FolderExamples(index, data, threads=4, seed=0).arrays()
        return x, y, which
    directory = data_lib.datasets_dir(datasets)
    if data.shards is not None:
        from orchestra.build.shards import evaluation_arrays

        return evaluation_arrays(data, directory)
    arrays = data_lib.prepare(data, data_lib.resolve_source(data.source, directory), directory)
    for which, x, y in (("test", arrays.x_test, arrays.y_test), ("validation", arrays.x_val, arrays.y_val)):
        if x is not None:
            return x, y, which
    return arrays.x_train, arrays.y_train, "training"


def evaluate(job_id: str, data: dict[str, Any] | None = None, storage: str | None = None,
             checkpoint: str | None = None, datasets: str | None = None) -> dict[str, Any]:
    """Evaluate a job's model with Keras's `evaluate`.

    Args:
        job_id: the job.
        data: fields of the spec's `data` section to replace, e.g.
            `{"source": "other.npz"}` or `{"test_size": 100}`; default: the
            job's own data (its test set, else its validation set).
        storage: the storage root.
        checkpoint: None (best checkpoint, else final model), "best",
            "latest" or "final".
        datasets: the dataset directory.

    Returns:
        {"metrics": {name: value}, "examples": n, "set": which set}.
    """
    model, record = load_job_model(job_id, storage, checkpoint)
    try:
        x, y, which = evaluation_arrays(_data_spec(record, data), datasets)
    except FieldError as exc:
        raise SpecError([(exc.field, str(exc))], "--data") from None
    results = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
    return {"metrics": {k: float(v) for k, v in results.items()}, "examples": int(len(x)), "set": which}


def predict(job_id: str, input_path: str | Path, output_path: str | Path, storage: str | None = None,
            checkpoint: str | None = None) -> dict[str, Any]:
    """Write a job's predictions for the examples in an `.npz` file.

    Args:
        input_path: an `.npz` with the raw examples under `x` (or its only
            array), prepared as the job's data was (rescale, flatten, …).
        output_path: the `.npz` to write: `probabilities` (the model's
            outputs), `classes` (the predicted class of each example) and,
            for image folders, `class_names`.

    Returns:
        {"examples": n, "output": path, "classes": counts by class}.
    """
    from orchestra.build import data as data_lib

    model, record = load_job_model(job_id, storage, checkpoint)
    data = DataSpec.model_validate(record.spec["data"])
    try:
        with np.load(input_path) as npz:
            key = "x" if "x" in npz.files else (npz.files[0] if len(npz.files) == 1 else None)
            if key is None:
                raise SpecError([("INPUT", f"{input_path} has {', '.join(npz.files)}; put the examples under 'x'")],
                                str(input_path))
            x = npz[key]
    except (OSError, ValueError) as exc:
        raise SpecError([("INPUT", f"cannot read {input_path} as .npz: {exc}")], str(input_path)) from None
    try:
        x = data_lib.prepare_features(x, data)
    except FieldError as exc:
        raise SpecError([(exc.field, str(exc))], str(input_path)) from None
    probabilities = model.predict(x, batch_size=256, verbose=0)
    if probabilities.shape[-1] == 1:
        classes = (probabilities[:, 0] > 0.5).astype(np.int64)
    else:
        classes = probabilities.argmax(axis=-1)
    extra = {"class_names": np.array(record.class_names)} if record.class_names else {}
    try:
        np.savez(output_path, probabilities=probabilities, classes=classes, **extra)
    except OSError as exc:
        raise FieldError("--output", f"cannot write {output_path}: {exc.strerror or exc}") from None
    counts = np.bincount(classes, minlength=probabilities.shape[-1] if probabilities.shape[-1] > 1 else 2)
    return {"examples": int(len(x)), "output": str(output_path), "classes": counts.tolist()}
