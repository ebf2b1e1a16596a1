"""A dead driver is seen as dead.

The driver of a job stamps its record with its pid and host and, while the
job runs, rewrites a small file of its own, `<job>/heartbeat.json`, every
few seconds (the record itself is written only when something happens). A
reader (`status`, `list`, `wait`, `resume`) that finds an unfinished job
whose driver is gone — its process no longer exists on this host, or its
heartbeat is older than ORCHESTRA_HEARTBEAT_TIMEOUT seconds (default 30) —
shows it as FAILED with the reason "driver lost". Nothing is written: the
record on disk stays the driver's.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from orchestra.errors import StorageWriteError
from orchestra.storage.folders import Storage, atomic_write_text
from orchestra.storage.record import JobProgress, JobRecord

TIMEOUT_ENV = "ORCHESTRA_HEARTBEAT_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
DRIVER_LOST = "driver lost"
HEARTBEAT_FILE = "heartbeat.json"


def timeout_seconds() -> float:
    try:
        return max(0.5, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def claim(record: JobRecord) -> None:
    """Make this process the record's driver."""
    record.driver_pid = os.getpid()
    record.driver_host = socket.gethostname()
    record.heartbeat_at = time.time()


def _read_beat(storage: Storage, record: JobRecord) -> dict:
    """The record's driver's heartbeat file ({} if none, unreadable, or another driver's)."""
    try:
        beat = json.loads((storage.job_dir(record.job_id) / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(beat, dict) or beat.get("pid") != record.driver_pid or beat.get("host") != record.driver_host:
        return {}
    return beat


def last_beat(storage: Storage, record: JobRecord) -> float | None:
    """When the record's driver last beat: its heartbeat file, else the time in the record."""
    try:
        return max(float(_read_beat(storage, record)["at"]), record.heartbeat_at or 0.0)
    except (KeyError, TypeError, ValueError):
        return record.heartbeat_at


def read_progress(storage: Storage, record: JobRecord) -> JobProgress | None:
    """The running epoch's progress, as the driver's last heartbeat had it."""
    progress = _read_beat(storage, record).get("progress")
    try:
        return None if progress is None else JobProgress.model_validate(progress)
    except ValueError:
        return None


def driver_lost(record: JobRecord, now: float | None = None) -> str | None:
    """Why the record's driver is known to be gone, or None."""
    if record.state.is_terminal or record.heartbeat_at is None:
        return None
    if record.driver_host == socket.gethostname() and record.driver_pid and not process_alive(record.driver_pid):
        return f"{DRIVER_LOST}: process {record.driver_pid} on {record.driver_host} has ended"
    silence = (now or time.time()) - record.heartbeat_at
    if silence > timeout_seconds():
        return f"{DRIVER_LOST}: no heartbeat from {record.driver_host} for {silence:.0f} s"
    return None


def checked(record: JobRecord, storage: Storage) -> JobRecord:
    """The record as a reader must see it: its driver's last heartbeat, and
    FAILED "driver lost" if its driver is gone, else as written."""
    if record.state.is_terminal:
        return record
    seen = record.model_copy(deep=True)
    seen.heartbeat_at = last_beat(storage, record)
    reason = driver_lost(seen)
    if reason is not None:
        seen.fail(f"{reason} after epoch {record.epochs_completed}")
    return seen


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Heartbeat:
    """Rewrites the job's heartbeat file from a background thread while the
    job runs (a context manager). A failed write is retried on the next
    beat: the job itself is not the heartbeat's to fail.

    Args:
        record: the job's record, owned by this process (`claim`).
        storage: where it is written.
        interval: seconds between beats (default: a sixth of the timeout).
    """

    def __init__(self, record: JobRecord, storage: Storage, interval: float | None = None):
        self.record = record
        self.storage = storage
        self.interval = interval or min(5.0, timeout_seconds() / 6)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{record.job_id}", daemon=True)
        self.beats = 0
        self.progress: JobProgress | None = None  # the driver's latest, written with each beat

    def __enter__(self) -> Heartbeat:
        claim(self.record)
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if self.record.state.is_terminal:
                return
            self._write()

    def _write(self) -> None:
        self.beats += 1
        beat = {"pid": self.record.driver_pid, "host": self.record.driver_host, "at": time.time(),
                "beats": self.beats, "progress": self.progress and self.progress.model_dump(mode="json")}
        try:
            atomic_write_text(self.storage.job_dir(self.record.job_id) / HEARTBEAT_FILE, json.dumps(beat))
        except StorageWriteError:
            pass
