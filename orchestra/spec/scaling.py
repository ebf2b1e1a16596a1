"""The `scaling` and `performance` sections: how many workers with what
resources, and orchestra's fast defaults for them."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestra.spec._base import _PATH_END, StrictModel

# A worker is a TensorFlow process with its own threads and a collective
# server: below a quarter of a CPU it starves, and a job of many such
# workers passes the CPU count of any cluster.
MIN_CPUS_PER_WORKER = 0.25
# One driver follows every worker and one collective ring joins them all.
MAX_WORKERS = 256


class ScalingSpec(StrictModel):
    """How many workers, and what Ray places each of them with: CPUs, GPUs
    (a fraction below 1 or a whole number, as Ray counts them), custom Ray
    resources and the GPU model. A resource the cluster does not have now
    is no error: the job waits PENDING for it, its reason naming it."""

    workers: int = Field(default=2, ge=1, description=f"Ray Train workers (one replica each); at most {MAX_WORKERS}.")
    cpus_per_worker: float = Field(default=1, le=1024, description=f"At least {MIN_CPUS_PER_WORKER}.")
    use_gpu: bool = Field(default=False, description="Workers use GPUs: 1 each unless gpus_per_worker says.")
    gpus_per_worker: float = Field(
        default=0, ge=0, le=1024,
        description="GPUs each worker holds, as Ray counts them: a fraction below 1 (workers share a GPU) or a "
                    "whole number.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker holds (name → amount, as the nodes' `ray start "
                    "--resources` declare them).",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Ray's accelerator type the workers' nodes must have (e.g. A100, H100, T4); needs GPUs.",
    )
    max_failures: int = Field(
        default=0, ge=0, le=100,
        description="Restart the workers from the latest checkpoint this many times.",
    )

    @model_validator(mode="before")
    @classmethod
    def _gpus_from_use_gpu(cls, raw: Any) -> Any:
        """`use_gpu` alone means 1 GPU a worker; `gpus_per_worker` alone
        implies `use_gpu`. Both end up set, so a spec read back from its
        record (every field written out) says the same."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if raw.get("use_gpu") is True and "gpus_per_worker" not in raw:
            raw["gpus_per_worker"] = 1
        gpus = raw.get("gpus_per_worker")
        if "use_gpu" not in raw and isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus > 0:
            raw["use_gpu"] = True
        return raw

    @model_validator(mode="after")
    def _no_contradiction(self) -> ScalingSpec:
        if self.use_gpu and not self.gpus_per_worker:
            raise ValueError(f"gpus_per_worker{_PATH_END}0 contradicts use_gpu true: leave gpus_per_worker out "
                             "(1 GPU a worker) or give the GPUs a worker holds")
        if self.gpus_per_worker and not self.use_gpu:
            raise ValueError(f"use_gpu{_PATH_END}false contradicts gpus_per_worker {self.gpus_per_worker:g}: "
                             "leave use_gpu out or set it true")
        if self.accelerator_type is not None and not self.gpus_per_worker:
            raise ValueError(f"accelerator_type{_PATH_END}'{self.accelerator_type}' names the workers' GPU model, "
                             "but they ask for no GPU: set gpus_per_worker (or use_gpu)")
        return self

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus_as_ray_counts_them(cls, value: float) -> float:
        return _ray_amount(value, "GPU")

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        problems = [_resource_problem(name, amount) for name, amount in value.items()]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ValueError("\n".join(problems))
        return value

    @field_validator("accelerator_type")
    @classmethod
    def _known_accelerator(cls, value: str | None) -> str | None:
        if value is None:
            return value
        known = accelerator_types()
        if value not in known:
            close = [name for name in known if name.lower() == value.lower()] or difflib.get_close_matches(
                value, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
            raise ValueError(f"unknown accelerator type '{value}'{hint} (allowed: Ray's accelerator types, "
                             f"e.g. {', '.join(known[:8])}, ...)")
        return value

    @field_validator("workers")
    @classmethod
    def _few_enough_workers(cls, value: int) -> int:
        if value > MAX_WORKERS:
            raise ValueError(f"{value} workers; at most {MAX_WORKERS} (one driver follows every worker "
                             "and one collective ring joins them all)")
        return value

    @field_validator("cpus_per_worker")
    @classmethod
    def _enough_cpu(cls, value: float) -> float:
        if not value >= MIN_CPUS_PER_WORKER:
            raise ValueError(f"{value:g} CPU; at least {MIN_CPUS_PER_WORKER} (a worker is a TensorFlow process "
                             "with its own threads: with less it starves)")
        return value


# Resources orchestra's own fields ask for; a custom resource may not be one of them.
_OWN_RESOURCES = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker",
                  "memory": "nothing (orchestra sizes a worker's memory itself)",
                  "object_store_memory": "nothing (Ray's object store is not a worker's)",
                  "TPU": "nothing (orchestra trains on CPUs and GPUs)"}
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,99}$")


def _ray_amount(value: float, what: str) -> float:
    """Ray's rule for a worker's share of a resource: a fraction below 1
    (shared), or a whole number; four decimal places at most."""
    if value >= 1 and value != int(value):
        raise ValueError(f"{value:g} {what}; Ray takes a fraction below 1 (workers share it) or a whole "
                         f"number, e.g. {int(value)} or {int(value) + 1}")
    if value and round(value, 4) != value:
        raise ValueError(f"{value!r} {what}; Ray counts resources to 4 decimal places")
    return value


def _resource_problem(name: str, amount: float) -> str | None:
    """Why `name: amount` cannot be a custom Ray resource of a worker, or None."""
    where = f"{name}{_PATH_END}"
    own = next((field for resource, field in _OWN_RESOURCES.items() if resource.lower() == name.lower()), None)
    if own is not None:
        return f"{where}'{name}' is not a custom resource; use {own}"
    if name.startswith(("node:", "accelerator_type:")):
        return f"{where}'{name}' is Ray's own; use scaling.accelerator_type for a GPU model"
    if not _RESOURCE_NAME.match(name):
        return (f"{where}'{name[:40]}' is not a resource name: letters, digits, '_', '.', '-', starting with a "
                "letter or '_'")
    if not amount > 0:
        return f"{where}{amount:g}; a worker's amount must be more than 0 (leave the resource out instead)"
    try:
        _ray_amount(amount, name)
    except ValueError as exc:
        return f"{where}{exc}"
    return None


def accelerator_types() -> list[str]:
    """Ray's accelerator type names (`ray.util.accelerators`), sorted."""
    from ray.util.accelerators import accelerators

    return sorted(value for name, value in vars(accelerators).items()
                  if name[:1].isupper() and isinstance(value, str))


Auto = Literal["auto"]


class PerformanceSpec(StrictModel):
    """orchestra's fast defaults for MultiWorkerMirroredStrategy on CPUs,
    and the number format the workers compute in.

    Each default keeps Keras's meaning (the same per-epoch metrics within
    float noise, the same early-stopping epoch); each can be overridden.
    `mixed_precision` changes the arithmetic, as Keras's policy does: its
    results are close to float32's, not equal.
    """

    steps_per_execution: Annotated[int, Field(ge=1)] | Auto = Field(
        default="auto",
        description="Keras's compile argument; auto: up to 50 steps per call (1 with per-batch TensorBoard).",
    )
    threads_per_worker: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default="auto",
        description="TensorFlow threads per worker; auto: one per CPU the worker holds.",
    )
    gradient_pack_bytes: Annotated[int, Field(ge=0)] | Auto = Field(
        default="auto",
        description="Pack gradients into all-reduces of this many bytes; auto and 0: TensorFlow's default.",
    )
    evaluation_batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        default="auto",
        description="Global batch of validation and test steps unless fit.validation_batch_size is set; auto: 1024.",
    )
    skip_end_of_data_vote: bool = Field(
        default=True,
        description="Declare the training data endless so workers do not vote each step on whether data remains.",
    )
    single_worker_strategy: Literal["none", "multi_worker_mirrored"] = Field(
        default="none",
        description="With 1 worker, train without a distribution strategy (no collectives) or with one.",
    )
    mixed_precision: Literal["mixed_float16", "mixed_bfloat16"] | None = Field(
        default=None,
        description="Keras's mixed precision policy: float16 (with loss scaling) or bfloat16 computations, "
                    "float32 weights and outputs; null: float32 throughout.",
    )

