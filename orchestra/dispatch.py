"""Prepared spec → Ray Train job on an embedded local Ray, driven to its end.

The driver runs `TensorflowTrainer.fit()` in a background thread and, in the
foreground, the coordinator: it reads the channel's events (whole epochs,
saved checkpoints, restarts, the final evaluation), runs the driver-side
callbacks and answers the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from typing import Any, Callable

from orchestra import heartbeat
from orchestra.coordinator import Checkpoint, Coordinator, CoordinatorCallback, EarlyStopping, EpochResult, TensorBoard
from orchestra.preflight import Prepared
from orchestra.record import JobRecord, JobState
from orchestra.interrupt import stop_on_signals
from orchestra.spec import CheckpointSpec, JobSpec
from orchestra.storage import StorageWriteError

POLL_SECONDS = 0.5


def cluster_address() -> str | None:
    """The GCS address of the Ray cluster this process is a job driver of
    (Ray Jobs sets RAY_ADDRESS for its drivers), or None: embedded Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address and "://" not in address else None


def ensure_ray(show_worker_output: bool = False) -> None:
    """Connect to Ray, unless this process already is: to the cluster when
    running as a Ray job's driver, else to a new embedded local Ray, never
    to a stray `ray start` cluster that happens to run on this machine.
    Workers' output (Keras's progress with `fit.verbose`) reaches this
    terminal only when asked for."""
    import ray

    if ray.is_initialized():
        return
    # Worker prints are otherwise routed through logging and shown twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cluster_address()
    if address:
        ray.init(address=address, log_to_driver=show_worker_output, configure_logging=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=show_worker_output,
                 configure_logging=False)


def make_callbacks(prepared: Prepared, job_id: str, workers: int) -> list[CoordinatorCallback]:
    """The driver-side callbacks the spec asks for, in the order they run."""
    spec, storage = prepared.spec, prepared.storage
    callbacks: list[CoordinatorCallback] = []
    if spec.callbacks.early_stopping is not None:
        callbacks.append(EarlyStopping(**spec.callbacks.early_stopping.model_dump()))
    checkpoint = spec.callbacks.checkpoint
    if checkpoint is None and spec.scaling.max_failures > 0:
        # A job that may be restarted needs something to restart from.
        monitor = "val_loss" if spec.data.has_validation else "loss"
        checkpoint = CheckpointSpec(monitor=monitor, keep=1)
    if checkpoint is not None:
        callbacks.append(Checkpoint(lambda epoch: storage.checkpoint_dir(job_id, epoch), **checkpoint.model_dump()))
    if spec.callbacks.tensorboard is not None:
        callbacks.append(TensorBoard(
            storage.tensorboard_dir(job_id), spec.callbacks.tensorboard.update_freq,
            hparams=hyperparameters(spec, workers), model_summary=prepared.model_summary,
        ))
    return callbacks


def hyperparameters(spec: JobSpec, workers: int) -> dict[str, Any]:
    """What runs are compared by on TensorBoard's HParams dashboard."""
    optimizer = spec.compile.optimizer_spec
    return {
        "optimizer": optimizer.type,
        "learning_rate": optimizer.learning_rate if optimizer.learning_rate is not None else "default",
        "batch_size": spec.fit.batch_size,
        "epochs": spec.fit.epochs,
        "layers": " > ".join(_layer_label(layer.type, layer.arguments) for layer in spec.model.layers),
        "workers": workers,
        "seed": spec.seed,
        "loss": spec.compile.loss,
    }


def _layer_label(kind: str, arguments: dict[str, Any]) -> str:
    """`Dense(100)`, `Dropout(0.3)`, `Flatten`: a layer by its main argument."""
    main = next((arguments[k] for k in ("units", "rate", "filters", "pool_size") if k in arguments), None)
    return kind if main is None else f"{kind}({main})"


def create_job(prepared: Prepared, in_process: bool = False, job_id: str | None = None) -> JobRecord:
    """The job's folder and PENDING record: the first thing written. A job
    submitted through a client comes with the id the client returned."""
    spec = prepared.spec
    job_id = job_id or prepared.storage.new_job_id(spec.name)
    prepared.storage.create_job_dir(job_id)
    record = JobRecord(
        job_id=job_id,
        name=spec.name,
        workers=1 if in_process else spec.scaling.workers,
        mode="in_process" if in_process else "ray",
        spec=spec.model_dump(mode="json"),
        examples_dropped_per_epoch=prepared.examples_dropped_per_epoch,
        input_shape=list(prepared.input_shape),
    )
    heartbeat.claim(record)
    if prepared.images is not None:
        record.class_names = prepared.images.train.class_names
        record.skipped_files = len(prepared.images.skipped)
        record.skipped_examples = prepared.images.skipped[:10]
    prepared.storage.write_record(record)
    return record


def _coordinator(prepared: Prepared, record: JobRecord, progress: Callable[[EpochResult], None],
                 resume_from: dict[str, Any] | None) -> Coordinator:
    coordinator = Coordinator(
        record, prepared.storage, make_callbacks(prepared, record.job_id, record.workers), progress,
        fallback_monitor="val_loss" if prepared.spec.data.has_validation else "loss",
    )
    if record.resumes:
        coordinator.roll_back(resume_from)
    return coordinator


def _worker_config(prepared: Prepared, record: JobRecord) -> dict[str, Any]:
    storage = prepared.storage
    return {
        "spec": prepared.spec.model_dump(mode="json"),
        "npz_path": str(prepared.npz_path) if prepared.npz_path else None,
        "datasets_dir": str(prepared.datasets_dir),
        "model_dir": str(storage.model_dir(record.job_id)),
        "tensorboard_dir": str(storage.tensorboard_dir(record.job_id)),
        "images": _image_lists(prepared),
    }


def _image_lists(prepared: Prepared) -> dict[str, Any] | None:
    """The image files the driver found readable, for the workers to share."""
    if prepared.images is None:
        return None
    return {name: None if index is None else {"files": index.files, "labels": index.labels.tolist(),
                                              "class_names": index.class_names}
            for name, index in (("train", prepared.images.train), ("validation", prepared.images.validation))}


def run_in_process(
    prepared: Prepared,
    record: JobRecord,
    progress: Callable[[EpochResult], None] = lambda result: None,
    resume_from: dict[str, Any] | None = None,
) -> JobRecord:
    """The reference run: the same spec trained in this process by plain
    Keras `fit`, no Ray, no distribution strategy, the same driver-side
    callbacks, the same records, checkpoints and TensorBoard runs.
    `resume_from` as in `run_job`."""
    from orchestra.coordinator.channel import LocalChannel
    from orchestra.keras_compat import tensorflow
    from orchestra.worker import train

    stop_on_signals()
    with _record_outcome(prepared, record):
        coordinator = _coordinator(prepared, record, progress, resume_from)
        record.transition(JobState.RUNNING)
        prepared.storage.write_record(record)
        train(prepared.spec, _worker_config(prepared, record), 0, 1, tensorflow().distribute.get_strategy(),
              LocalChannel(coordinator, resume_from))
        _end(prepared, record, JobState.SUCCEEDED, None)
    return record


def run_job(
    prepared: Prepared,
    record: JobRecord,
    progress: Callable[[EpochResult], None] = lambda result: None,
    resume_from: dict[str, Any] | None = None,
) -> JobRecord:
    """Train the job on Ray Train workers to its end; return its final record.
    Whatever ends it, the record says so: STOPPED on Ctrl-C or SIGTERM,
    FAILED with the reason on any error, here or on a worker.

    Args:
        prepared: the checked spec and where things are.
        record: the job's record (PENDING).
        progress: called with each epoch's result.
        resume_from: for a resumed job (`record.resumes`), the checkpoint
            `{"epoch", "path"}` it continues from, or None: from the start.
    """
    stop_on_signals()  # while Ray starts, too; again once it has (_run_on_ray)
    with _record_outcome(prepared, record):
        _run_on_ray(prepared, record, progress, resume_from)
    return record


@contextlib.contextmanager
def _record_outcome(prepared: Prepared, record: JobRecord):
    """A job that ends by an exception is recorded as STOPPED (Ctrl-C or
    SIGTERM, which goes on up) or FAILED with the error (which the record
    now tells). The heartbeat beats meanwhile."""
    with heartbeat.Heartbeat(record, prepared.storage):
        try:
            yield
        except KeyboardInterrupt:
            _end(prepared, record, JobState.STOPPED, f"interrupted after epoch {record.epochs_completed}")
            raise
        except Exception as exc:  # noqa: BLE001 - the record carries it
            _end(prepared, record, JobState.FAILED, f"{type(exc).__name__}: {exc}"[:2000])


def _end(prepared: Prepared, record: JobRecord, state: JobState, reason: str | None) -> None:
    if record.state.is_terminal:
        return
    record.transition(state, reason)
    try:
        prepared.storage.write_record(record)
    except StorageWriteError as exc:
        # Nothing else can tell it: once this process has ended, readers see "driver lost".
        print(f"orchestra: job {record.job_id} ended {state.value} ({reason}) but {exc}", file=sys.stderr)


def _run_on_ray(prepared: Prepared, record: JobRecord, progress: Callable[[EpochResult], None],
                resume_from: dict[str, Any] | None) -> None:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestra.coordinator.channel import Channel
    from orchestra.worker import train_loop

    spec, storage = prepared.spec, prepared.storage
    ensure_ray(show_worker_output=spec.fit.verbose > 0)
    stop_on_signals()  # after ray.init, which installs handlers of its own
    # On the driver's node, as Ray Train's controller is: the loss of a worker's node must not take it along.
    channel = Channel.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote(spec.scaling.workers, resume_from)
    coordinator = _coordinator(prepared, record, progress, resume_from)
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={**_worker_config(prepared, record), "channel": channel},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=record.job_id,
            storage_path=str(storage.job_dir(record.job_id) / "ray"),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            # Set before TensorFlow is first imported in the worker, or tf.keras is Keras 3.
            worker_runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported on the record
            outcome["error"] = exc

    # RUNNING once every worker has started (Coordinator.on_worker_started).
    record.reason = _waiting_reason(spec)
    storage.write_record(record)
    thread = threading.Thread(target=fit, name=f"fit-{record.job_id}", daemon=True)
    thread.start()
    try:
        _drive(channel, coordinator, thread)
    finally:
        ray.kill(channel)  # releases any worker still waiting for a decision
    if "error" in outcome:
        _end(prepared, record, JobState.FAILED, _error_text(outcome["error"]))
    else:
        _end(prepared, record, JobState.SUCCEEDED, None)


def _waiting_reason(spec: JobSpec) -> str:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    return (f"waiting for resources: {spec.scaling.workers} workers x {spec.scaling.cpus_per_worker:g} CPU "
            f"(the cluster has {cpus:g} CPU in all)")


def _drive(channel, coordinator: Coordinator, thread: threading.Thread) -> None:
    """Answer the channel's events until training has ended and all is read."""
    import ray

    while True:
        event = ray.get(channel.next_event.remote(POLL_SECONDS))
        if event is None:
            if not thread.is_alive():
                return
            continue
        kind = event["kind"]
        if kind == "epoch":
            decision = coordinator.on_epoch(event["reports"])
            channel.decide.remote(event["attempt"], event["epoch"], dataclasses.asdict(decision))
        elif kind == "started":
            coordinator.on_worker_started(event["rank"], event["pid"])
        elif kind == "saved":
            coordinator.on_checkpoint_saved(event["epoch"], event["path"])
        elif kind == "restart":
            coordinator.on_restart(event["checkpoint"])
        elif kind == "finished":
            coordinator.on_finished(event)


def _error_text(exc: BaseException) -> str:
    """The root cause a user can act on, not Ray's wrapping of it."""
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank, error = min(failures.items())
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        # Ray's worker errors run to many lines: their first says what, their last why.
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1]})"
        return f"worker {rank}: {type(error).__name__}: {summary}"[:2000]
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line or "Exception" in line) and not line.startswith("File "):
            return line[:2000]
    return (text or type(exc).__name__)[:2000]
