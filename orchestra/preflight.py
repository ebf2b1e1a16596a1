"""Every check that can fail before a worker starts, reported together.

Pydantic has checked the spec's structure; here it meets the world: Keras's
registries, the data files, the storage root and the cluster's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestra import data as data_lib
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


def preflight(
    spec: JobSpec,
    *,
    storage: str | None = None,
    datasets: str | None = None,
    available_cpus: float | None = None,
    check_cluster: bool = True,
    source: str = "spec",
) -> Prepared:
    """Raise SpecError listing every problem, or return what dispatch needs."""
    from orchestra.model import ModelError, build_model, check_keras_names

    problems: list[tuple[str, str]] = list(check_keras_names(spec))

    try:
        root = Storage(storage_root(storage, spec.storage))
        root.check_writable()
    except StorageError as exc:
        problems.append(("storage", str(exc)))
        root = None

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
    try:
        npz_path = data_lib.resolve_source(spec.data.source, directory)
        arrays = data_lib.prepare(spec.data, npz_path, directory)
        if len(arrays.x_train) < spec.fit.batch_size:
            raise data_lib.DataError(
                "fit.batch_size", f"{spec.fit.batch_size} is larger than the {len(arrays.x_train)} training examples")
        for name, evaluation in (("validation", arrays.x_val), ("test", arrays.x_test)):
            if evaluation is not None and len(evaluation) < spec.scaling.workers:
                raise data_lib.DataError(
                    "data", f"the {name} set has {len(evaluation)} examples, fewer than the {spec.scaling.workers} workers")
        if spec.fit.steps_per_epoch is None:
            dropped = len(arrays.x_train) % spec.fit.batch_size
        input_shape = tuple(spec.model.input_shape or arrays.input_shape)
        if not problems:
            build_model(spec, arrays.input_shape).summary(print_fn=summary.append)
    except data_lib.DataError as exc:
        problems.append((exc.field, str(exc)))
    except ModelError as exc:
        problems.append((exc.field, str(exc)))

    if problems:
        raise SpecError(problems, source)
    return Prepared(spec, root, npz_path, directory, dropped, input_shape, "\n".join(summary))
