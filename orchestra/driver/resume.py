"""`orchestra resume JOB`: a STOPPED or FAILED job continues from its
latest complete checkpoint as if it had never stopped.

The workers load the checkpoint's model (weights and optimizer state) and
start at its epoch, with the data order that epoch would have had; the
driver-side callbacks (early stopping's best value and wait count, the
checkpoint's best and retention list, TensorBoard's step) come back from the
state saved beside it, the history is cut back to it and TensorBoard events
written after it are dropped, so no step is duplicated or missing. A job
without any checkpoint starts again from its first epoch.
"""

from __future__ import annotations

import re
import time

from orchestra.coordinator.protocol import CheckpointRef
from orchestra.driver.run import process_started_at
from orchestra.errors import JobStateError
from orchestra.storage import heartbeat
from orchestra.storage.folders import CHECKPOINT_STATE_FILE, Storage
from orchestra.storage.record import JobRecord, JobState

RESUMABLE = (JobState.STOPPED, JobState.FAILED)
_CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)$")


def check_resumable(storage: Storage, job_id: str) -> JobRecord:
    """The job's record, as a reader sees it (a lost driver is FAILED);
    JobStateError unless it is STOPPED or FAILED."""
    record = heartbeat.checked(storage.read_record(job_id, history=True), storage)
    if record.state not in RESUMABLE:
        raise JobStateError(f"job {job_id} is {record.state.value}: only STOPPED or FAILED jobs can be resumed")
    return record


def latest_checkpoint(storage: Storage, job_id: str) -> CheckpointRef | None:
    """The newest complete checkpoint, or None.
    Complete: published (not a staging folder) with its callback state.
    Found on disk, so a checkpoint saved just before the driver died counts."""
    folder = storage.job_dir(job_id) / "checkpoints"
    found = []
    for path in folder.glob("epoch-*") if folder.is_dir() else ():
        match = _CHECKPOINT_DIR.match(path.name)
        if match and (path / CHECKPOINT_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    if not found:
        return None
    epoch, path = max(found)
    return CheckpointRef(epoch, str(path))


def check_same_classes(record: JobRecord, class_names: list[str] | None) -> None:
    """JobStateError if an image job's folder no longer has the classes it
    started with: its labels are their positions."""
    if record.class_names and class_names != record.class_names:
        raise JobStateError(f"job {record.job_id} started on the classes {record.class_names} and its image folder "
                          f"now has {class_names}: restore the folder, or submit a new job")


def reopen(storage: Storage, job_id: str) -> tuple[JobRecord, CheckpointRef | None]:
    """Turn a STOPPED or FAILED job back to PENDING, owned by this process;
    return its record and the checkpoint it resumes from."""
    record = check_resumable(storage, job_id)
    checkpoint = latest_checkpoint(storage, job_id)
    record.reopen(checkpoint.epoch if checkpoint else 0)
    record.startup = {"process": process_started_at(), "checked": time.time()}
    heartbeat.claim(record)
    storage.write_record(record)
    return record, checkpoint
