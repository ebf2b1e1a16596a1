"""The `scaling` and `performance` sections: how many workers with what
resources, and orchestra's fast defaults for them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from orchestra.spec._base import StrictModel

# A worker is a TensorFlow process with its own threads and a collective
# server: below a quarter of a CPU it starves, and a job of many such
# workers passes the CPU count of any cluster.
MIN_CPUS_PER_WORKER = 0.25
# One driver follows every worker and one collective ring joins them all.
MAX_WORKERS = 256


class ScalingSpec(StrictModel):
    workers: int = Field(default=2, ge=1, description=f"Ray Train workers (one replica each); at most {MAX_WORKERS}.")
    cpus_per_worker: float = Field(default=1, le=1024, description=f"At least {MIN_CPUS_PER_WORKER}.")
    use_gpu: bool = False
    max_failures: int = Field(
        default=0, ge=0, le=100,
        description="Restart the workers from the latest checkpoint this many times.",
    )

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


Auto = Literal["auto"]


class PerformanceSpec(StrictModel):
    """orchestra's fast defaults for MultiWorkerMirroredStrategy on CPUs.

    Each keeps Keras's meaning (the same per-epoch metrics within float
    noise, the same early-stopping epoch); each can be overridden.
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

