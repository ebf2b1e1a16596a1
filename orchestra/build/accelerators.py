"""What a worker computes on and in which number format, chosen from the spec.

GPUs change two things in a worker: its collectives (NCCL, when each worker
holds whole GPUs of its own; NCCL refuses two ranks on one device, so
workers sharing a GPU keep TensorFlow's gRPC ring) and its memory
(TensorFlow takes every GPU's whole memory at start unless told to grow,
which starves a second worker on a shared GPU). `threads_per_worker` keeps
its CPU meaning either way (`orchestra/build/tuning.py`).

Mixed precision is Keras's policy, set while the model is assembled, so
that its layers compute in float16 or bfloat16 and keep float32 weights;
the last layer computes and outputs float32, as Keras's guide asks, so the
loss and the softmax keep their precision. Under `mixed_float16`, Keras's
`compile` wraps the optimizer in a `LossScaleOptimizer` (dynamic loss
scaling) because the model's policy says float16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from orchestra.spec import JobSpec

Collectives = Literal["AUTO", "RING", "NCCL"]


def collective_implementation(spec: JobSpec) -> Collectives:
    """MultiWorkerMirroredStrategy's all-reduce: NCCL for workers with one or
    more whole GPUs each, else gRPC's ring (the CPU default; `AUTO` would
    pick NCCL for a shared GPU, which NCCL refuses)."""
    gpus = spec.scaling.gpus_per_worker
    if gpus >= 1:
        return "NCCL"
    return "RING" if gpus > 0 else "AUTO"


def collective_options(spec: JobSpec, bytes_per_pack: int):
    """TensorFlow's CommunicationOptions for the spec's workers."""
    from orchestra.keras_compat import tensorflow

    experimental = tensorflow().distribute.experimental
    return experimental.CommunicationOptions(
        bytes_per_pack=bytes_per_pack,
        implementation=getattr(experimental.CommunicationImplementation, collective_implementation(spec)),
    )


def grow_gpu_memory(spec: JobSpec) -> list[str]:
    """Let TensorFlow take GPU memory as it needs it rather than all at
    start; before any op runs in the process. Returns the GPUs set."""
    if not spec.scaling.gpus_per_worker:
        return []
    from orchestra.keras_compat import tensorflow

    tf = tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return [gpu.name for gpu in gpus]


def bytes_per_activation(spec: JobSpec) -> int:
    """Bytes of one activation value: 2 under a mixed policy, else 4."""
    return 2 if spec.performance.mixed_precision else 4


@contextlib.contextmanager
def precision_policy(spec: JobSpec) -> Iterator[None]:
    """Keras's global dtype policy set to the spec's `mixed_precision` while
    the model is assembled (layers take it when made), then put back."""
    policy = spec.performance.mixed_precision
    if policy is None:
        yield
        return
    from orchestra.keras_compat import keras

    mixed = keras().mixed_precision
    previous = mixed.global_policy()
    mixed.set_global_policy(policy)
    try:
        yield
    finally:
        mixed.set_global_policy(previous)


def output_arguments(spec: JobSpec, arguments: dict[str, Any]) -> dict[str, Any]:
    """The last layer's arguments: float32 under a mixed policy, unless the
    spec gives the layer a dtype of its own."""
    if spec.performance.mixed_precision is None or "dtype" in arguments:
        return arguments
    return {**arguments, "dtype": "float32"}

