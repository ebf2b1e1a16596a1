"""Will the job fit the machines it is to run on? Sized before any worker
starts, and before the driver itself builds the model.

A worker's memory is estimated from the spec: the model is assembled in a
`tf.Graph`, where weights are shapes and nothing is allocated, so a Dense of
three million units is sized, not built. Weights, their gradients and the
optimizer's slots (counted by building the optimizer on those shapes), the
activations of a per-worker batch, the job's arrays (each worker holds them)
and TensorFlow's own footprint. A job whose worker cannot fit the largest
node, or whose workers cannot all be placed (memory, a cap of workers per
CPU), is refused naming the field. GPUs and custom resources the cluster
does not have now are not refused: an autoscaler may add the nodes, so the
job waits PENDING, its reason naming what it waits for (`missing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from orchestra.build.accelerators import bytes_per_activation
from orchestra.errors import FieldError
from orchestra.spec import JobSpec

GB = 1e9
# A Ray Train TensorFlow worker's resident memory before the job's own
# (measured: 0.87 GB peak for a model of 88 weights on 1,000 MNIST examples).
WORKER_PROCESS_BYTES = int(0.9 * GB)
# More TensorFlow processes than this per CPU only thrash: a cap on workers per node.
MAX_WORKERS_PER_CPU = 4
# Activations are kept for the backward pass, which makes gradients of the same size.
ACTIVATION_COPIES = 2
BYTES_PER_VALUE = 4  # float32 weights, their gradients and slots, also under a mixed policy


@dataclass(frozen=True)
class Node:
    """One machine of the cluster, as Ray sees it (memory in bytes;
    `resources`: its other Ray resources, custom ones and Ray's
    `accelerator_type:<type>`)."""

    name: str
    cpus: float
    memory: int
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, name: str, totals: dict[str, float]) -> Node:
        """A node from Ray's resource totals for it. Ray's `memory` is what
        it lets tasks have: the node's memory less its object store."""
        custom = {resource: float(amount) for resource, amount in totals.items()
                  if resource not in _RAY_OWN and not resource.startswith("node:")}
        memory = totals.get("memory", 0) + totals.get("object_store_memory", 0)
        return cls(name, float(totals.get("CPU", 0)), int(memory), float(totals.get("GPU", 0)), custom)

    def amount(self, resource: str) -> float:
        return {"CPU": self.cpus, "GPU": self.gpus}.get(resource, self.resources.get(resource, 0.0))


# Ray's own resources of a node, which are not custom ones.
_RAY_OWN = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class Footprint:
    """A worker's memory, estimated in bytes, by what takes it.

    Args:
        weights: weights, their gradients and the optimizer's slots.
        activations: a per-worker batch's layer outputs, kept for the backward pass.
        data: the job's arrays, which each worker holds.
        parameters: the model's weight count.
        heaviest: the spec field of the layer with the most weights.

    Example:

        >>> Footprint(weights=4_000, activations=2_000, data=0, parameters=1_000,
        ...           heaviest="model.layers.1").field
        'model.layers.1'
    """

    weights: int
    activations: int
    data: int
    parameters: int
    heaviest: str
    process: int = WORKER_PROCESS_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data + self.process

    @property
    def field(self) -> str:
        """The field to change: the one whose part is the largest."""
        parts = {self.heaviest: self.weights, "fit.batch_size": self.activations, "data": self.data}
        return max(parts, key=parts.get)

    def describe(self) -> str:
        return (f"about {_gb(self.total)} a worker: {self.parameters:,} weights with their gradients and optimizer "
                f"slots {_gb(self.weights)}, activations {_gb(self.activations)}, data {_gb(self.data)}, "
                f"TensorFlow {_gb(self.process)}")


def footprint(spec: JobSpec, input_shape: tuple[int, ...], data_bytes: int = 0) -> Footprint:
    """Size the spec's model without allocating it (FieldError for a model
    that does not assemble)."""
    from orchestra.keras_compat import tensorflow

    logger = tensorflow().get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # graph mode warns of deprecations (BatchNormalization's) that training never meets
    try:
        return _footprint(spec, input_shape, data_bytes)
    finally:
        logger.setLevel(level)


def _footprint(spec: JobSpec, input_shape: tuple[int, ...], data_bytes: int) -> Footprint:
    from orchestra.build.model import assemble_model, make_optimizer
    from orchestra.keras_compat import tensorflow

    with tensorflow().Graph().as_default():
        try:
            model = assemble_model(spec, input_shape)
        except FieldError:
            raise
        except Exception:  # noqa: BLE001 - a layer that builds only eagerly: unsized here, built and tried next
            return Footprint(weights=0, activations=0, data=data_bytes, parameters=0, heaviest="model")
        try:
            optimizer = make_optimizer(spec.compile.optimizer_spec)
            optimizer.build(model.trainable_variables)
            slots = sum(_size(variable.shape) for variable in optimizer.variables())
        except (TypeError, ValueError) as exc:
            raise FieldError("compile.optimizer", f"{spec.compile.optimizer_spec.type}: {exc}") from None
        parameters = model.count_params()
        trainable = sum(_size(weight.shape) for weight in model.trainable_weights)
        outputs = sum(_size(shape[1:]) for layer in model.layers for shape in _shapes(layer.output_shape))
        heaviest = _heaviest(spec, model)
    per_worker_batch = max(1, spec.fit.batch_size // spec.scaling.workers)
    return Footprint(
        weights=BYTES_PER_VALUE * (parameters + trainable + slots),
        activations=(bytes_per_activation(spec) * ACTIVATION_COPIES * per_worker_batch
                     * (outputs + _size(input_shape))),
        data=data_bytes,
        parameters=parameters,
        heaviest=heaviest,
    )


def fit_problems(spec: JobSpec, need: Footprint, nodes: list[Node], fixed: bool) -> list[tuple[str, str]]:
    """What keeps the job's workers off `nodes`, as (field, message).

    Args:
        fixed: the nodes are all there will be (an embedded Ray on this
            machine): more CPUs than they have are refused too, where a
            cluster's job would wait for them (PENDING)."""
    if not nodes:
        return [("scaling.workers", "the cluster has no live nodes")]
    scaling, problems = spec.scaling, []
    largest = max(node.memory for node in nodes)
    if need.total > largest:
        problems.append((need.field, f"needs {need.describe()}, more than the largest node's "
                                     f"{_gb(largest)} of memory"))
        return problems
    places = sum(min(math.floor(node.cpus * MAX_WORKERS_PER_CPU), node.memory // need.total) for node in nodes)
    if scaling.workers > places:
        problems.append(("scaling.workers", f"{scaling.workers} workers do not fit the cluster: at most {places} "
                                            f"(at most {MAX_WORKERS_PER_CPU} per CPU, and each needs "
                                            f"{need.describe()})"))
    cpus = sum(node.cpus for node in nodes)
    needed = scaling.workers * scaling.cpus_per_worker
    if fixed and needed > cpus:
        problems.append(("scaling.workers",
                         f"{scaling.workers} workers x {scaling.cpus_per_worker:g} CPU need {needed:g} CPUs "
                         f"but the cluster has {cpus:g}: use at most {int(cpus // scaling.cpus_per_worker)} "
                         "workers or fewer scaling.cpus_per_worker"))
    return problems


# Ray Train's own mark for a node's GPU model: a sliver of its accelerator_type resource.
ACCELERATOR_SHARE = 0.001


def scaling_arguments(spec: JobSpec) -> dict:
    """Ray Train's `ScalingConfig` arguments for the spec's workers."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    return {"num_workers": scaling.workers, "use_gpu": scaling.gpus_per_worker > 0,
            "resources_per_worker": resources, "accelerator_type": scaling.accelerator_type}


def worker_resources(spec: JobSpec) -> dict[str, tuple[str, float]]:
    """What Ray places each worker by: Ray resource → (the spec field that
    asks for it, the amount a worker holds)."""
    scaling = spec.scaling
    wanted = {"CPU": ("scaling.cpus_per_worker", scaling.cpus_per_worker)}
    if scaling.gpus_per_worker:
        wanted["GPU"] = ("scaling.gpus_per_worker", scaling.gpus_per_worker)
    for name, amount in scaling.resources_per_worker.items():
        wanted[name] = (f"scaling.resources_per_worker.{name}", amount)
    if scaling.accelerator_type:
        wanted[f"accelerator_type:{scaling.accelerator_type}"] = ("scaling.accelerator_type", ACCELERATOR_SHARE)
    return wanted


def missing(spec: JobSpec, nodes: list[Node]) -> list[tuple[str, str]]:
    """The GPUs, accelerator types and custom resources the job's workers ask
    for that the cluster does not have now, as (field, what is lacking):
    the job waits for them, PENDING. CPUs are left to `fit_problems` and to
    the waiting reason."""
    lacking = []
    workers = spec.scaling.workers
    for resource, (where, amount) in worker_resources(spec).items():
        if resource == "CPU":
            continue
        label = "GPU" if resource == "GPU" else f"'{resource}'"
        if resource.startswith("accelerator_type:"):
            if not any(node.amount(resource) for node in nodes):
                lacking.append((where, f"no node of the cluster has {spec.scaling.accelerator_type} GPUs"))
            continue
        most = max((node.amount(resource) for node in nodes), default=0.0)
        total = sum(node.amount(resource) for node in nodes)
        if total < workers * amount:
            lacking.append((where, f"{workers} workers x {amount:g} {label} need {workers * amount:g}, but the "
                                   f"cluster has {total:g}"))
        elif most < amount:
            lacking.append((where, f"a worker needs {amount:g} {label} on one node, but a node has at most "
                                   f"{most:g}"))
    return lacking


def this_machine() -> Node:
    """The machine this process runs on: what an embedded Ray will have."""
    import os

    from orchestra.keras_compat import tensorflow

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 2 ** 62  # unknown: no refusal on memory
    gpus = len(tensorflow().config.list_physical_devices("GPU"))
    return Node("this machine", float(os.cpu_count() or 1), int(memory), float(gpus))  # no custom resources


def _heaviest(spec: JobSpec, model) -> str:
    own = list(model.layers)[len(model.layers) - len(spec.model.layers):] if spec.model.layers else []
    counts = {f"model.layers.{i}": layer.count_params() for i, layer in enumerate(own)}
    if spec.model.backbone is not None:
        counts["model.backbone"] = model.count_params() - sum(counts.values())
    return max(counts, key=counts.get) if counts else "model"


def _shapes(shape) -> list[tuple]:
    """A layer's output shape(s) as a list of tuples."""
    if isinstance(shape, list):
        return [tuple(s) for s in shape if isinstance(s, (tuple, list))]
    return [tuple(shape)] if isinstance(shape, tuple) else []


def _size(shape) -> int:
    return int(np.prod([int(d) if d is not None else 1 for d in shape], dtype=np.float64))


def _gb(size: int | float) -> str:
    if size < GB / 10:
        return f"{size / 1e6:.2g} MB"
    return f"{size / GB:.2g} GB" if size < 10 * GB else f"{size / GB:.0f} GB"
