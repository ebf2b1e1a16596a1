"""The loop each Ray Train worker runs: one replica of
MultiWorkerMirroredStrategy, trained with Keras's `fit`, obeying the
driver's decision at the end of every epoch."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestra import tuning

MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best_weights.npz"


def _configure_threads(threads: int) -> None:
    from orchestra.keras_compat import tensorflow

    tf = tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def save_model(model, directory: Path, weights_only: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if weights_only:
        model.save_weights(str(directory / WEIGHTS_FILE))
    else:
        # Named explicitly: tf-keras keeps "use the .keras format" in a
        # thread-local, and in any thread but the first (Ray Train runs this
        # loop in one) it silently writes HDF5 from the second save on.
        model.save(str(directory / MODEL_FILE), save_format="keras_v3")


def model_file(directory: str | Path) -> Path:
    directory = Path(directory)
    full = directory / MODEL_FILE
    return full if full.is_file() else directory / WEIGHTS_FILE


def collective_save(model, final: Path, rank: int, weights_only: bool, extra: dict[str, Any] | None = None,
                    best_weights: list | None = None) -> None:
    """Every worker takes part in a save under MultiWorkerMirroredStrategy, or
    the chief would wait in a collective forever: the chief writes to a
    staging folder beside `final` and publishes it by rename, the others
    write to scratch that is thrown away. `extra` (the driver's callback
    state) and `best_weights` (the restore_best_weights snapshot) go into
    the same folder, so a job resumed from it has both as they were."""
    import json

    import numpy as np

    from orchestra.storage import StorageWriteError, publish_directory

    if rank == 0:
        staging = final.parent / f".staging-{final.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_model(model, staging, weights_only)
            if extra is not None:
                (staging / "state.json").write_text(json.dumps(extra))
            if best_weights is not None:
                np.savez(staging / BEST_WEIGHTS_FILE, *best_weights)
        except OSError as exc:  # a full disk: give its space back, name what could not be written
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageWriteError.of(final, exc) from exc
        publish_directory(staging, final)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="orchestra-scratch-"))
        try:
            save_model(model, scratch, weights_only)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class RayChannel:
    """The worker's side of the channel actor: plain blocking calls."""

    def __init__(self, handle):
        self.handle = handle

    def start(self, rank: int, pid: int, group: str) -> dict[str, Any]:
        return ray_get(self.handle.start.remote(rank, pid, group))

    def report(self, attempt: int, rank: int, epoch: int, payload: dict[str, Any]) -> dict[str, Any]:
        return ray_get(self.handle.report.remote(attempt, rank, epoch, payload))

    def checkpoint_saved(self, epoch: int, path: str) -> None:
        ray_get(self.handle.checkpoint_saved.remote(epoch, path))

    def finished(self, payload: dict[str, Any]) -> None:
        ray_get(self.handle.finished.remote(payload))


def train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker; `config` comes from dispatch."""
    import ray.train

    from orchestra.keras_compat import tensorflow
    from orchestra.spec import JobSpec

    spec = JobSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    world_size = context.get_world_size()
    _configure_threads(tuning.threads_per_worker(spec))
    tf = tensorflow()
    if tuning.needs_collectives(spec, world_size):
        # Must exist before any other TensorFlow op runs in this process.
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                bytes_per_pack=tuning.gradient_pack_bytes(spec),
            )
        )
    else:
        strategy = tf.distribute.get_strategy()
    train(spec, config, context.get_world_rank(), world_size, strategy, RayChannel(config["channel"]))


def train(spec, config: dict[str, Any], rank: int, world_size: int, strategy, channel) -> None:
    """Train one replica of the job with Keras's `fit`: under
    MultiWorkerMirroredStrategy on a Ray worker, or under TensorFlow's
    default strategy for the in-process reference run (rank 0 of 1)."""
    import numpy as np

    from orchestra import data as data_lib
    from orchestra.model import build_model

    start = channel.start(rank, os.getpid(), worker_group())
    train_examples, validation_examples, test_examples, input_shape = job_examples(spec, config)
    global_batch = spec.fit.batch_size
    steps = spec.fit.steps_per_epoch or data_lib.steps_per_epoch(len(train_examples), global_batch)
    per_worker_batch = global_batch // world_size
    evaluation_batch = max(1, tuning.evaluation_batch_size(spec) // world_size)

    with strategy.scope():
        model = build_model(spec, input_shape, tuning.steps_per_execution(spec, steps))

    initial_epoch, best_weights = 0, None
    if start["checkpoint"] is not None:
        resume_from = Path(start["checkpoint"]["path"])
        with strategy.scope():
            # Slots must exist for the checkpoint's optimizer state to load into them.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(str(model_file(resume_from)))
        initial_epoch = start["checkpoint"]["epoch"]
        if (resume_from / BEST_WEIGHTS_FILE).is_file():
            with np.load(resume_from / BEST_WEIGHTS_FILE) as saved:
                best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    train_data = strategy.distribute_datasets_from_function(
        lambda _: data_lib.training_pipeline(
            train_examples,
            global_batch=global_batch, rank=rank, world_size=world_size,
            shuffle=spec.fit.shuffle, seed=spec.seed, initial_epoch=initial_epoch,
            class_weight=spec.fit.class_weight,
            parallel_calls=spec.data_loader.processes, prefetch=spec.data_loader.prefetch,
            declare_endless=spec.performance.skip_end_of_data_vote,
        )
    )

    def evaluation_data(examples, per_worker_batch):
        return strategy.distribute_datasets_from_function(
            lambda _: data_lib.evaluation_pipeline(
                examples, per_worker_batch=per_worker_batch, rank=rank, world_size=world_size
            )
        )

    validation, validation_steps = None, None
    if validation_examples is not None:
        validation = evaluation_data(validation_examples, evaluation_batch)
        validation_steps = data_lib.evaluation_steps(len(validation_examples), evaluation_batch, world_size)
        if spec.fit.validation_steps:
            validation_steps = min(validation_steps, spec.fit.validation_steps)
    board = spec.callbacks.tensorboard
    bridge = channel_callback(
        channel, start["attempt"], rank, best_weights,
        samples_per_epoch=steps * per_worker_batch,
        log_batches=bool(board and board.update_freq == "batch"),
        histograms=WeightHistograms(Path(config["tensorboard_dir"]) / "train", board.histogram_freq)
        if board and board.histogram_freq and rank == 0 else None,
    )
    model.fit(
        train_data,
        epochs=spec.fit.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=validation,
        validation_freq=spec.fit.validation_freq,
        validation_steps=validation_steps,
        callbacks=[bridge],
        verbose=spec.fit.verbose,
    )
    if bridge.superseded:
        return

    test_metrics = None
    if test_examples is not None:
        results = model.evaluate(
            evaluation_data(test_examples, evaluation_batch),
            steps=data_lib.evaluation_steps(len(test_examples), evaluation_batch, world_size),
            verbose=0,
            return_dict=True,
        )
        test_metrics = {name: float(value) for name, value in results.items()}
    model_dir = Path(config["model_dir"])
    collective_save(model, model_dir, rank, weights_only=False)
    if rank == 0:
        channel.finished({"test_metrics": test_metrics, "model_path": str(model_dir)})


def job_examples(spec, config: dict[str, Any]):
    """The job's (training, validation, test) examples and the shape of one:
    arrays from the spec's source, or the image files the driver listed.
    Validation and test may be None."""
    from orchestra import data as data_lib

    lists = config.get("images")
    if lists is None:
        npz = Path(config["npz_path"]) if config["npz_path"] else None
        arrays = data_lib.prepare(spec.data, npz, Path(config["datasets_dir"]))
        test = None if arrays.x_test is None else data_lib.ArrayExamples(arrays.x_test, arrays.y_test)
        validation = None if arrays.x_val is None else data_lib.ArrayExamples(arrays.x_val, arrays.y_val)
        return data_lib.ArrayExamples(arrays.x_train, arrays.y_train), validation, test, arrays.input_shape
    import numpy as np

    from orchestra.images import FolderExamples, FolderIndex

    def examples(name: str):
        listed = lists[name]
        if listed is None:
            return None
        index = FolderIndex(listed["files"], np.array(listed["labels"], np.int64), listed["class_names"])
        return FolderExamples(index, spec.data, threads=spec.data_loader.processes, seed=spec.seed)

    return examples("train"), examples("validation"), None, spec.data.images.image_shape


def worker_group() -> str:
    """Names this worker's group: Ray Train gives every group it starts
    fresh addresses in TF_CONFIG, so a restarted group has a new name."""
    import json

    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return ",".join(cluster.get("worker", [])) or f"local-{os.getpid()}"


def channel_callback(channel, attempt: int, rank: int, best_weights: list | None, samples_per_epoch: int,
                     log_batches: bool, histograms: WeightHistograms | None = None):
    """The Keras callback that reports each epoch to the driver and carries
    out its decision (stop, snapshot the best weights, checkpoint)."""
    from orchestra.keras_compat import keras

    class ChannelCallback(keras().callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best_weights = best_weights
            self.superseded = False  # a newer attempt of the worker group took over

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.batch_losses = []

        def on_train_batch_end(self, batch, logs=None):
            if log_batches and logs and "loss" in logs:
                self.batch_losses.append(float(logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            logs = {key: float(value) for key, value in (logs or {}).items()}
            learning_rate = getattr(self.model.optimizer, "learning_rate", None)
            if learning_rate is not None and not callable(learning_rate):
                logs["learning_rate"] = float(learning_rate.numpy())
            payload = {
                "rank": rank, "epoch": epoch + 1, "logs": logs,
                "epoch_time": time.perf_counter() - self.started,
                "samples": samples_per_epoch, "batch_losses": self.batch_losses,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            self.obey(channel.report(attempt, rank, epoch + 1, payload))
            if histograms is not None:
                histograms.write(self.model, epoch + 1)

        def obey(self, decision: dict[str, Any]) -> None:
            if decision.get("snapshot_best_weights"):
                self.best_weights = self.model.get_weights()
            if decision.get("checkpoint_dir"):
                final = Path(decision["checkpoint_dir"])
                final.parent.mkdir(parents=True, exist_ok=True)
                collective_save(self.model, final, rank, decision["save_weights_only"],
                                decision["checkpoint_state"], self.best_weights)
                if rank == 0:
                    channel.checkpoint_saved(decision["checkpoint_state"]["epoch"], str(final))
            if decision.get("stop"):
                self.model.stop_training = True
                self.superseded = decision.get("stale", False)

        def on_train_end(self, logs=None):
            if self.best_weights is not None and not self.superseded:
                self.model.set_weights(self.best_weights)

    return ChannelCallback()


class WeightHistograms:
    """Weight histograms every `every` epochs, written by the chief: the
    weights live on the workers, so this one TensorBoard write happens there
    (into the job's `train` run, beside the driver's scalars)."""

    def __init__(self, logdir: Path, every: int):
        from orchestra.keras_compat import tensorflow

        self.tf = tensorflow()
        self.every = every
        self.writer = self.tf.summary.create_file_writer(str(logdir), filename_suffix=".histograms")

    def write(self, model, epoch: int) -> None:
        if epoch % self.every:
            return
        with self.writer.as_default():
            for weight in model.weights:
                self.tf.summary.histogram(weight.name.replace(":", "_"), weight.numpy(), step=epoch)
        self.writer.flush()


def ray_get(ref):
    import ray

    return ray.get(ref)
