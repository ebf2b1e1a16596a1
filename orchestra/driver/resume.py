"""`orchestra resume JOB`: a STOPPED or FAILED job continues from its
latest complete checkpoint as if it had never stopped.

The workers load the checkpoint's model (weights and optimizer state) and
start at its epoch, with the data order that epoch would have had; the
driver-side callbacks (early stopping's best value and wait count, the
checkpoint's best and retention list, TensorBoard's step) come back from the
state saved beside it, the history is cut back to it and TensorBoard events
written after it are dropped, so no step is duplicated or missing. A job
without any checkpoint starts again from its first epoch.

A resume may change the worker count (`--workers`): `fit.batch_size` is
the global batch, and an epoch's order is one seeded permutation cut into
global batches, each split among the workers, so the batches, the
gradients (averaged over the global batch) and the optimizer's steps are
those of the job's own count, and so are the numbers, within float noise.
Each resume is a new attempt in the record (`attempts`: its workers, the
epoch it continued from, on a cluster the Ray job it ran as).
"""

from __future__ import annotations

import re
import time

from orchestra.build.images import index_folder
from orchestra.coordinator.protocol import CheckpointRef
from orchestra.driver.run import own, process_started_at
from orchestra.errors import FieldError, JobStateError
from orchestra.spec import JobSpec
from orchestra.storage import heartbeat
from orchestra.storage.folders import CHECKPOINT_STATE_FILE, Storage
from orchestra.storage.lease import (
    Lease,
    Liveness,
    clear_stop_request,
    owned_elsewhere,
    probe,
)
from orchestra.storage.paths import resolve_stored
from orchestra.storage.record import JobRecord, JobState

RESUMABLE = (JobState.STOPPED, JobState.FAILED)
_CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)$")


def check_resumable(storage: Storage, job_id: str, owned: Lease | None = None) -> JobRecord:
    """The job's record, as a reader sees it (a lost driver is FAILED), or
    as the new owner sees it when this process holds its lease (`owned`:
    every driver before it has ended). LeaseHeld ("job X is owned by a live
    driver on HOST, pid N") if another process holds the lease;
    JobStateError unless the job is STOPPED or FAILED."""
    record = storage.read_record(job_id, history=True)
    if owned is not None:
        record = heartbeat.as_new_owner_sees(record)
    else:
        record = heartbeat.checked(record, storage)
        if not record.state.is_terminal and probe(storage.job_dir(job_id)) is Liveness.HELD:
            raise owned_elsewhere(storage.job_dir(job_id), job_id)
    if record.state not in RESUMABLE:
        raise JobStateError(f"job {job_id} is {record.state.value}: only STOPPED or FAILED jobs can be resumed")
    return record


def latest_checkpoint(storage: Storage, job_id: str) -> CheckpointRef | None:
    """The newest complete checkpoint, or None.
    Complete: published (not a staging folder) with its callback state.
    Found on disk, so a checkpoint saved just before the driver died counts.
    Storage is input: a checkpoints folder, a checkpoint or its state that is
    a symlink is a StorageError, never followed."""
    folder = resolve_stored(storage.job_dir(job_id), "checkpoints", "the checkpoints folder")
    found = []
    for path in folder.glob("epoch-*") if folder.is_dir() else ():
        match = _CHECKPOINT_DIR.match(path.name)
        if match is None:
            continue
        state = resolve_stored(storage.job_dir(job_id), f"checkpoints/{path.name}/{CHECKPOINT_STATE_FILE}",
                               "a checkpoint's state")
        if state.is_file():
            found.append((int(match.group(1)), path))
    if not found:
        return None
    epoch, path = max(found)
    return CheckpointRef(epoch, str(path))


def folder_classes(spec: JobSpec) -> list[str] | None:
    """The classes an image job's training folder has now, or None (not an
    image job, or a folder pre-flight will report on by its field)."""
    if spec.data.images is None:
        return None
    try:
        return index_folder(spec.data.images.train_dir, "data.images.train_dir").class_names
    except FieldError:
        return None


def check_same_classes(record: JobRecord, class_names: list[str] | None) -> None:
    """JobStateError if an image job's folder no longer has the classes it
    started with: its labels are their positions."""
    if record.class_names and class_names is not None and class_names != record.class_names:
        raise JobStateError(f"job {record.job_id} started on the classes {record.class_names} and its image folder "
                          f"now has {class_names}: restore the folder, or submit a new job")


def reopen(storage: Storage, job_id: str, spec: JobSpec | None = None,
           ray_job: str | None = None) -> tuple[JobRecord, CheckpointRef | None]:
    """Take the job's lease without waiting (LeaseHeld if a live driver
    holds it) and, under it, turn a STOPPED or FAILED job (or one whose
    driver is gone) back to PENDING, owned by this process with the next
    generation, as a new attempt (on a cluster, the Ray job `ray_job`);
    return its record and the checkpoint it resumes from. `spec`: the job's
    spec on another worker count, which the record takes from here on."""
    last = storage.read_record(job_id)  # no such job: nothing is written into a folder
    owned = Lease.acquire(storage.job_dir(job_id), job_id, last.generation)
    try:
        record = check_resumable(storage, job_id, owned)
        clear_stop_request(storage.job_dir(job_id))  # a cancel of the driver before
        storage.sweep_staging(job_id)  # what crashed writers left; a checkpoint set aside mid-publish comes back
        checkpoint = latest_checkpoint(storage, job_id)
        record.reopen(checkpoint.epoch if checkpoint else 0)
        if spec is not None:
            record.spec, record.workers = spec.model_dump(mode="json"), spec.scaling.workers
        record.begin_attempt(checkpoint.epoch if checkpoint else 0, ray_job)
        record.startup = {"process": process_started_at(), "checked": time.time()}
        heartbeat.claim(record)
        own(storage, record, owned)
        storage.write_record(record)
    except BaseException:
        storage.fences.pop(job_id, None)
        owned.release()
        raise
    return record, checkpoint
