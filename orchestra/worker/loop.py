"""The loop each Ray Train worker runs: one replica of
MultiWorkerMirroredStrategy, trained with Keras's `fit`, obeying the
driver's decision at the end of every epoch.

    train_loop (Ray Train's entry) → strategy → train:
        build the model → restore a checkpoint → pipelines → fit (bridge) → test → save
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from orchestra.build import tuning
from orchestra.build.accelerators import collective_options, grow_gpu_memory
from orchestra.coordinator.learning_rate import scheduled_learning_rate
from orchestra.coordinator.protocol import FinalResult, StartReply, WorkerConfig
from orchestra.spec import (
    JobSpec,
    LearningRateSchedulerSpec,
    TensorBoardSpec,
    config_of,
)
from orchestra.storage.folders import Storage, model_file
from orchestra.worker.bridge import (
    RayChannel,
    channel_callback,
    set_learning_rate,
    worker_group,
)
from orchestra.worker.histograms import WeightHistograms
from orchestra.worker.pipelines import JobExamples, Pipelines, job_examples
from orchestra.worker.progress import progress_callback
from orchestra.worker.saving import collective_save, load_best_weights


def train_loop(config: dict[str, WorkerConfig]) -> None:
    """Entry point of every Ray Train worker: `config["worker"]` comes from the driver."""
    import ray.train

    from orchestra.keras_compat import tensorflow

    worker = config["worker"]
    context = ray.train.get_context()
    world_size = context.get_world_size()
    _configure_threads(tuning.threads_per_worker(worker.spec))
    grow_gpu_memory(worker.spec)
    tf = tensorflow()
    if tuning.needs_collectives(worker.spec, world_size):
        # Must exist before any other TensorFlow op runs in this process.
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=collective_options(worker.spec, tuning.gradient_pack_bytes(worker.spec)))
    else:
        strategy = tf.distribute.get_strategy()
    train(worker, context.get_world_rank(), world_size, strategy, RayChannel(worker.channel))


def _configure_threads(threads: int) -> None:
    from orchestra.keras_compat import tensorflow

    tf = tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def train(config: WorkerConfig, rank: int, world_size: int, strategy, channel) -> None:
    """Train one replica of the job with Keras's `fit`: under
    MultiWorkerMirroredStrategy on a Ray worker, or under TensorFlow's
    default strategy for the in-process reference run (rank 0 of 1)."""
    spec = config.spec
    startup = {"tensorflow": time.time()}  # the strategy exists: TensorFlow is set up
    start = channel.start(rank, os.getpid(), worker_group())
    examples = job_examples(config)
    try:
        startup["data"] = time.time()
        pipelines = Pipelines(config, examples, rank, world_size, strategy)
        model = _build(spec, examples, pipelines, strategy)
        initial_epoch, best_weights = _restore(model, start, strategy)
        _first_learning_rate(spec, model, initial_epoch)
        validation, validation_steps = pipelines.validation()
        startup["model"] = time.time()
        bridge = channel_callback(
            channel, start.attempt, rank, best_weights,
            samples_per_epoch=pipelines.steps * pipelines.per_worker_batch,
            log_batches=_logs_batches(spec),
            histograms=_histograms(spec, config, rank),
            startup=startup,
            fence=config.lease,
        )
        try:
            model.fit(
                pipelines.training(initial_epoch),
                epochs=spec.fit.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=pipelines.steps,
                validation_data=validation,
                validation_freq=spec.fit.validation_freq,
                validation_steps=validation_steps,
                callbacks=[bridge, *_progress(channel, rank, pipelines)],
                verbose=spec.fit.verbose,
            )
        except BaseException:
            bridge.drain(raise_errors=False)  # the checkpoint being written is published before the job ends
            raise
        bridge.drain()  # a no-op after on_train_end; kept so no path skips it
        if bridge.finishes:
            _finish(model, config, examples, pipelines, rank, channel)
    finally:
        examples.close()  # the loader processes end here, not only with the worker


def _build(spec: JobSpec, examples: JobExamples, pipelines: Pipelines, strategy):
    from orchestra.build.model import build_model

    with strategy.scope():
        return build_model(spec, examples.input_shape, tuning.steps_per_execution(spec, pipelines.steps))


def _restore(model, start: StartReply, strategy) -> tuple[int, list | None]:
    """Load the checkpoint the channel named, if any: (initial epoch, the
    restore_best_weights snapshot saved with it)."""
    if start.checkpoint is None:
        return 0, None
    folder = Path(start.checkpoint.path)
    with strategy.scope():
        # Slots must exist for the checkpoint's optimizer state to load into them.
        model.optimizer.build(model.trainable_variables)
    model.load_weights(str(model_file(folder)))
    learning_rate = Storage.read_checkpoint_state(folder).get("learning_rate")
    if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        set_learning_rate(model, float(learning_rate))  # as the driver decided it (ReduceLROnPlateau)
    return start.checkpoint.epoch, load_best_weights(folder)


def _first_learning_rate(spec: JobSpec, model, initial_epoch: int) -> None:
    """A LearningRateScheduler's rate for the first epoch this run trains:
    the driver decides each later one when the epoch before ends."""
    scheduler = config_of(spec.callbacks, LearningRateSchedulerSpec)
    if scheduler is not None:
        set_learning_rate(model, scheduled_learning_rate(scheduler.schedule, initial_epoch))


def _logs_batches(spec: JobSpec) -> bool:
    board = config_of(spec.callbacks, TensorBoardSpec)
    return board is not None and board.batch_every is not None


def _progress(channel, rank: int, pipelines: Pipelines) -> list:
    """The chief reports where the epoch is (for progress bars); the others need not."""
    if rank != 0:
        return []
    return [progress_callback(channel, pipelines.steps, pipelines.global_batch)]


def _histograms(spec: JobSpec, config: WorkerConfig, rank: int) -> WeightHistograms | None:
    board = config_of(spec.callbacks, TensorBoardSpec)
    if rank != 0 or board is None or not board.histogram_freq:
        return None
    return WeightHistograms(Path(config.tensorboard_dir) / "train", board.histogram_freq)


def _finish(model, config: WorkerConfig, examples: JobExamples, pipelines: Pipelines, rank: int,
            channel) -> None:
    """Evaluate on the test set (if any), save the final model, tell the driver."""
    test_metrics: dict[str, Any] | None = None
    if examples.test is not None:
        dataset, steps = pipelines.evaluation(examples.test)
        results = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
        test_metrics = {name: float(value) for name, value in results.items()}
    model_dir = Path(config.model_dir)
    collective_save(model, model_dir, rank, weights_only=False, fence=config.lease)
    if rank == 0:
        channel.finished(FinalResult(test_metrics, str(model_dir)))
