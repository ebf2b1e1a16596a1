"""The `performance` section's `auto` values, resolved for one run.

MultiWorkerMirroredStrategy on CPUs pays a collective over gRPC for every
step it runs: the gradients' all-reduce, and the reduction of the step's
logs. These defaults cut the number and the cost of those calls without
changing what Keras computes.
"""

from __future__ import annotations

from orchestra.spec import JobSpec, TensorBoardSpec, config_of

MAX_STEPS_PER_EXECUTION = 50
EVALUATION_BATCH = 1024


def steps_per_execution(spec: JobSpec, steps_per_epoch: int) -> int:
    """Steps Keras runs per call into TensorFlow. Per-batch TensorBoard needs
    every step's loss, so it gets 1 (and costs a call per step)."""
    chosen = spec.performance.steps_per_execution
    if chosen != "auto":
        return chosen
    board = config_of(spec.callbacks, TensorBoardSpec)
    if board is not None and board.batch_every is not None:
        return 1
    return max(1, min(MAX_STEPS_PER_EXECUTION, steps_per_epoch))


def threads_per_worker(spec: JobSpec) -> int:
    """TensorFlow's default is one thread per machine core in every worker,
    which oversubscribes a machine shared by several workers."""
    chosen = spec.performance.threads_per_worker
    return max(1, int(spec.scaling.cpus_per_worker)) if chosen == "auto" else chosen


def gradient_pack_bytes(spec: JobSpec) -> int:
    """Bytes per packed all-reduce of gradients; 0 is TensorFlow's default
    (no packing). Measured here (2 workers, seed 000's MLP): one pack for
    all gradients was slower than none (10.7 s against 9.6 s an epoch), so
    auto keeps TensorFlow's default; models with many small tensors may
    gain from packing."""
    chosen = spec.performance.gradient_pack_bytes
    return 0 if chosen == "auto" else chosen


def evaluation_batch_size(spec: JobSpec) -> int:
    """Global batch of validation and test steps: metrics are sums weighted by
    batch size, so larger steps change only float rounding, and there are
    fewer of them to pay a collective for."""
    if spec.fit.validation_batch_size is not None:
        return spec.fit.validation_batch_size
    chosen = spec.performance.evaluation_batch_size
    return EVALUATION_BATCH if chosen == "auto" else chosen


def needs_collectives(spec: JobSpec, world_size: int) -> bool:
    return world_size > 1 or spec.performance.single_worker_strategy == "multi_worker_mirrored"
