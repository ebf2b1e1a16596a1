"""Prepared spec → Ray Train job, driven to its end.

The driver runs `TensorflowTrainer.fit()` in a background thread and, in the
foreground, the coordinator: it reads the channel's events (whole epochs,
saved checkpoints, restarts, the final evaluation), runs the driver-side
callbacks and answers the workers. `run_in_process` is the reference run:
the same coordinator and records around one plain Keras `fit`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from typing import Callable

from orchestra.coordinator import Checkpoint, Coordinator, EpochResult
from orchestra.coordinator.protocol import CheckpointRef, EpochReports, WorkerConfig
from orchestra.driver.callbacks import make_callbacks
from orchestra.driver.preflight import Prepared
from orchestra.driver.ray_runtime import ensure_ray, live_nodes, total_cpus
from orchestra.driver.resources import missing, scaling_arguments
from orchestra.driver.signals import stop_main_thread, stop_on_signals
from orchestra.errors import OrchestraError, StorageWriteError
from orchestra.keras_compat import TENSORFLOW_ENV
from orchestra.spec import JobSpec
from orchestra.storage import heartbeat
from orchestra.storage.bucket import ray_storage
from orchestra.storage.folders import Storage
from orchestra.storage.lease import Lease, LeaseLost, held, start_ticks
from orchestra.storage.record import JobProgress, JobRecord

POLL_SECONDS = 0.5

Progress = Callable[[EpochResult], None]
OnStep = Callable[[JobProgress], None]


def create_job(prepared: Prepared, in_process: bool = False, job_id: str | None = None,
               ray_job: str | None = None) -> JobRecord:
    """The job's folder, its lease (this process owns the job from here on)
    and PENDING record: the first things written. A job submitted through a
    client comes with the id the client returned (and on a cluster, the Ray
    job that runs this driver: `ray_job`)."""
    spec = prepared.spec
    job_id = job_id or prepared.storage.new_job_id(spec.name)
    job_dir = prepared.storage.create_job_dir(job_id)
    try:
        owned = Lease.acquire(job_dir, job_id)
    except OrchestraError:  # a storage without locks: nothing is left behind
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    record = JobRecord(
        job_id=job_id,
        name=spec.name,
        workers=1 if in_process else spec.scaling.workers,
        mode="in_process" if in_process else "ray",
        spec=spec.model_dump(mode="json"),
        examples_dropped_per_epoch=prepared.examples_dropped_per_epoch,
        input_shape=list(prepared.input_shape),
    )
    record.begin_attempt(ray_job=ray_job)
    heartbeat.claim(record)
    own(prepared.storage, record, owned)
    record.startup = {"process": process_started_at(), "checked": time.time()}
    if prepared.images is not None:
        record.class_names = prepared.images.train.class_names
        record.skipped_files = len(prepared.images.skipped)
        record.skipped_examples = prepared.images.skipped[:10]
    prepared.storage.write_record(record)
    return record


def process_started_at() -> float:
    """When this process started (Unix time), from Linux's /proc; now elsewhere."""
    ticks = start_ticks()
    if ticks is None:
        return time.time()
    try:
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def own(storage: Storage, record: JobRecord, owned: Lease) -> None:
    """Make the record this lease's: its generation, checked before each
    write of the record or its history from now on."""
    record.generation = owned.generation
    storage.fences[record.job_id] = owned.check


def _coordinator(prepared: Prepared, record: JobRecord, progress: Progress, on_step: OnStep,
                 beat: heartbeat.Heartbeat, resume_from: CheckpointRef | None) -> Coordinator:
    storage, job_id = prepared.storage, record.job_id
    callbacks = make_callbacks(prepared.spec, lambda epoch: storage.checkpoint_dir(job_id, epoch),
                               storage.tensorboard_dir(job_id), record.workers, prepared.model_summary)
    for callback in callbacks:
        if isinstance(callback, Checkpoint) and beat.lease is not None:
            callback.before_delete = beat.lease.check  # retention deletes only while the job is ours

    def step(current: JobProgress) -> None:
        beat.progress = current
        on_step(current)

    coordinator = Coordinator(record, storage, callbacks, progress, fallback_monitor=prepared.spec.default_monitor,
                              on_step=step)
    if record.resumes:
        coordinator.roll_back(resume_from)
    return coordinator


def _worker_config(prepared: Prepared, record: JobRecord, beat: heartbeat.Heartbeat, channel=None) -> WorkerConfig:
    storage = prepared.storage
    return WorkerConfig(
        spec=prepared.spec,
        npz_path=str(prepared.npz_path) if prepared.npz_path else None,
        datasets_dir=str(prepared.datasets_dir),
        model_dir=str(storage.model_dir(record.job_id)),
        tensorboard_dir=str(storage.tensorboard_dir(record.job_id)),
        images=prepared.images,
        channel=channel,
        lease=beat.lease.fence if beat.lease is not None else None,
    )


def run_in_process(prepared: Prepared, record: JobRecord, progress: Progress = lambda result: None,
                   resume_from: CheckpointRef | None = None, on_step: OnStep = lambda step: None) -> JobRecord:
    """The reference run: the same spec trained in this process by plain
    Keras `fit`, no Ray, no distribution strategy, the same driver-side
    callbacks, the same records, checkpoints and TensorBoard runs.
    `resume_from` and `on_step` as in `run_job`."""
    from orchestra.coordinator.channel import LocalChannel
    from orchestra.keras_compat import tensorflow
    from orchestra.worker.loop import train

    stop_on_signals()
    with record_outcome(prepared.storage, record) as beat:
        coordinator = _coordinator(prepared, record, progress, on_step, beat, resume_from)
        train(_worker_config(prepared, record, beat), 0, 1, tensorflow().distribute.get_strategy(),
              LocalChannel(coordinator, resume_from))
        _end(prepared.storage, record, record.finish)
    return record


def run_job(prepared: Prepared, record: JobRecord, progress: Progress = lambda result: None,
            resume_from: CheckpointRef | None = None, on_step: OnStep = lambda step: None) -> JobRecord:
    """Train the job on Ray Train workers to its end; return its final record.
    Whatever ends it, the record says so: STOPPED on Ctrl-C or SIGTERM,
    FAILED with the reason on any error, here or on a worker.

    Args:
        prepared: the checked spec and where things are.
        record: the job's record (PENDING).
        progress: called with each epoch's result.
        resume_from: for a resumed job (`record.resumes`), the checkpoint
            it continues from, or None: from the start.
        on_step: called with the running epoch's progress, about once a second.
    """
    stop_on_signals()  # while Ray starts, too; again once it has (_run_on_ray)
    with record_outcome(prepared.storage, record) as beat:
        _run_on_ray(prepared, record, progress, on_step, beat, resume_from)
    return record


@contextlib.contextmanager
def record_outcome(storage: Storage, record: JobRecord):
    """The driver's hold on a running job, a context manager that yields
    its `Heartbeat`. A job that ends by an exception is recorded as STOPPED
    (Ctrl-C, SIGTERM or `orchestra cancel`, which goes on up) or FAILED with
    the error (which the record now tells). A driver whose job another has
    taken over writes nothing more: LeaseLost goes on up instead. The lease
    is let go at the end."""
    owned = held(storage.job_dir(record.job_id))
    if owned is None:  # a record made elsewhere (create_job and reopen take the lease themselves)
        owned = Lease.acquire(storage.job_dir(record.job_id), record.job_id, record.generation)
        own(storage, record, owned)
    # A driver in the main thread is stopped as by SIGTERM; in another thread, `_drive` notices.
    in_main = threading.current_thread() is threading.main_thread()
    try:
        with heartbeat.Heartbeat(record, storage, lease=owned,
                                 on_stop=lambda reason: in_main and stop_main_thread()) as beat:
            try:
                yield beat
            except KeyboardInterrupt:
                if beat.lost is not None:
                    raise beat.lost from None
                _end(storage, record, record.stop, f"interrupted after epoch {record.epochs_completed}")
                raise
            except LeaseLost:
                raise
            except Exception as exc:  # noqa: BLE001 - the record carries it
                if beat.lost is not None:
                    raise beat.lost from None
                _end(storage, record, record.fail, f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        storage.fences.pop(record.job_id, None)
        owned.release()


def _end(storage: Storage, record: JobRecord, move: Callable[..., None], *reason: str) -> None:
    """Make the record's last move (`record.finish`, `.fail`, `.stop`) and write it."""
    if record.state.is_terminal:
        return
    move(*reason)
    try:
        storage.write_record(record)
    except StorageWriteError as exc:
        # Nothing else can tell it: once this process has ended, readers see "driver lost".
        print(f"orchestra: job {record.job_id} ended {record.state.value} ({record.reason}) but {exc}",
              file=sys.stderr)


def _run_on_ray(prepared: Prepared, record: JobRecord, progress: Progress, on_step: OnStep,
                beat: heartbeat.Heartbeat, resume_from: CheckpointRef | None) -> None:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestra.coordinator.channel import Channel
    from orchestra.worker.loop import train_loop

    spec, storage = prepared.spec, prepared.storage
    ensure_ray(show_worker_output=spec.fit.verbose > 0)
    record.startup = {**record.startup, "ray": time.time()}
    stop_on_signals()  # after ray.init, which installs handlers of its own
    # On the driver's node, as Ray Train's controller is: the loss of a worker's node must not take it along.
    channel = Channel.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote(spec.scaling.workers, resume_from)
    coordinator = _coordinator(prepared, record, progress, on_step, beat, resume_from)
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"worker": _worker_config(prepared, record, beat, channel)},
        scaling_config=ScalingConfig(**scaling_arguments(spec)),
        run_config=RunConfig(
            name=record.job_id,
            **ray_storage(storage.job_dir(record.job_id)),  # in the bucket for a job on one
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            worker_runtime_env={"env_vars": dict(TENSORFLOW_ENV)},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported on the record
            failure.append(exc)

    # RUNNING once every worker has started (Coordinator.on_worker_started).
    record.reason = _waiting_reason(spec)
    storage.write_record(record)
    thread = threading.Thread(target=fit, name=f"fit-{record.job_id}", daemon=True)
    thread.start()
    try:
        _drive(channel, coordinator, thread, beat)
    finally:
        ray.kill(channel)  # releases any worker still waiting for a decision
    if failure:
        _end(storage, record, record.fail, _error_text(failure[0], record.worker_pids))
    else:
        _end(storage, record, record.finish)


def _waiting_reason(spec: JobSpec) -> str:
    """What the job waits for until Ray has placed its workers: the CPUs,
    and any GPU, accelerator type or custom resource the cluster lacks now."""
    lacking = "".join(f"; {field}: {text}" for field, text in missing(spec, live_nodes()))
    return (f"waiting for resources: {spec.scaling.workers} workers x {spec.scaling.cpus_per_worker:g} CPU "
            f"(the cluster has {total_cpus():g} CPU in all){lacking}")


def _drive(channel, coordinator: Coordinator, thread: threading.Thread, beat: heartbeat.Heartbeat) -> None:
    """Answer the channel's events until training has ended and all is read,
    or the heartbeat says stop (a driver run outside the main thread, which
    no signal reaches)."""
    import ray

    while True:
        if beat.stop_reason is not None:
            raise KeyboardInterrupt(beat.stop_reason)
        training = thread.is_alive()  # before the read: an event sent as training ends is still read
        events = ray.get(channel.next_events.remote(POLL_SECONDS))
        if not events and not training:
            return
        for event in events:
            decision = coordinator.handle(event)
            if isinstance(event, EpochReports):
                channel.decide.remote(event.attempt, event.epoch, decision)


# A worker that dies cuts its peers' collectives: their errors follow from it.
_DEATH = ("HealthCheck", "ActorDied", "WorkerCrashed", "OutOfMemory", "ActorUnavailable", "NodeDied")
_COLLATERAL = ("Collective ops is aborted", "UnavailableError", "Connection reset by peer", "CancelledError",
               "Socket closed", "failed to connect")


def _error_text(exc: BaseException, pids: dict[str, int] | None = None) -> str:
    """The root cause a user can act on, not Ray's wrapping of it: of the
    workers that failed, the one that died (Ray's health check, an actor
    death) over peers whose collectives it cut, whichever Ray heard of first;
    the others follow in brackets. A worker that died raised nothing: Ray
    only lost it, so the text says what kills a process without a word
    (`pids`: rank → the workers' process ids, from the record)."""
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        ranked = sorted(failures.items(), key=lambda item: (_blame(item[1]), item[0]))
        (rank, error), others = ranked[0], ranked[1:]
        text = f"worker {rank}: {_summary(error)}"
        if _blame(error) == 0:
            pid = (pids or {}).get(str(rank))
            text = f"worker {rank}{f' (pid {pid})' if pid else ''} {_death(error)}; Ray saw {_summary(error)}"
        if others:
            text += " [then " + "; ".join(f"worker {r}: {_summary(e)[:200]}" for r, e in others) + "]"
        return text[:2000]
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line or "Exception" in line) and not line.startswith("File "):
            return line[:2000]
    return (text or type(exc).__name__)[:2000]


def _death(error: BaseException) -> str:
    """What happened to a worker that died, as far as Ray's words tell."""
    text = str(error)
    if "OutOfMemory" in type(error).__name__ or "OUT_OF_MEMORY" in text or "out of memory" in text.lower():
        return "was killed for lack of memory (Ray's memory monitor or the kernel's out-of-memory killer)"
    code = re.search(r"exit(?:ed)? (?:with )?code:? (-?\d+)", text)
    if code and code.group(1) not in ("0", "1", "2"):  # Ray's own codes for a lost connection
        return f"exited with code {code.group(1)}"
    return ("died without reporting an error: killed by a signal (kill -9, the kernel's out-of-memory killer) "
            "or crashed")


def _blame(error: BaseException) -> int:
    """0 for a worker that died, 1 for an error of its own, 2 for a peer's collective cut short."""
    kind, text = type(error).__name__, str(error)
    if any(mark in kind or mark in text.split("\n", 1)[0] for mark in _DEATH):
        return 0
    return 2 if any(mark in text for mark in _COLLATERAL) else 1


def _summary(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    # Ray's worker errors run to many lines: their first says what, their last why.
    summary = lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1]})"
    return f"{type(error).__name__}: {summary}"
