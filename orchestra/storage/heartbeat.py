"""A dead driver is seen as dead, a live one as live, from any host.

The driver of a job stamps its record with its pid and host and, while the
job runs, rewrites a small file of its own, `<job>/heartbeat.json`, every
few seconds (the record itself is written only when something happens),
with a counter that goes up by one each beat. A reader (`status`, `list`,
`wait`, `resume`) that finds an unfinished job asks, in this order:

1. the job's lease (`storage.lease`): a lock held is a live driver, a lock
   free is a driver that has ended, at once, on whichever host it ran;
2. where there is no lease to ask (a job from before leases, a mount that
   cannot tell): a driver on this very machine (same boot, same pid
   namespace, not merely the same hostname) whose process has ended is lost
   at once; any other is lost once its counter has stood still for
   ORCHESTRA_HEARTBEAT_TIMEOUT seconds (default 30) of the reader's own
   monotonic clock. Two hosts' wall clocks are never compared.

A lost driver's job reads as FAILED "driver lost". Nothing is written: the
record on disk stays the driver's.

The beat also carries the driver's side of two conversations: it stops the
driver when a stop was asked of it (`orchestra cancel`) or when another
driver has taken the job over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable

from orchestra.errors import StorageError, StorageWriteError
from orchestra.storage import bucket
from orchestra.storage.folders import Storage, atomic_write_text
from orchestra.storage.lease import (
    SMALL_FILE_LIMIT,
    Lease,
    LeaseLost,
    Liveness,
    probe,
    stop_requested,
    this_machine,
)
from orchestra.storage.paths import read_stored_text
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


def interval_seconds() -> float:
    """Seconds between beats: a sixth of the timeout, at most 5."""
    return min(5.0, timeout_seconds() / 6)


def claim(record: JobRecord) -> None:
    """Make this process the record's driver."""
    record.driver_pid = os.getpid()
    record.driver_host = socket.gethostname()
    record.heartbeat_at = time.time()


def read_beat(storage: Storage, record: JobRecord) -> dict:
    """The record's driver's heartbeat file ({} if none, unreadable, or another driver's)."""
    try:
        beat = json.loads(read_stored_text(bucket.pull_file(storage.job_dir(record.job_id) / HEARTBEAT_FILE),
                                           SMALL_FILE_LIMIT,
                                           "a heartbeat"))  # a FIFO or a device is refused, not waited on
    except (OSError, StorageError, ValueError):
        return {}
    if not isinstance(beat, dict) or beat.get("pid") != record.driver_pid or beat.get("host") != record.driver_host:
        return {}
    return beat


def last_beat(storage: Storage, record: JobRecord) -> float | None:
    """When the record's driver last beat: its heartbeat file, else the time in the record."""
    try:
        return max(float(read_beat(storage, record)["at"]), record.heartbeat_at or 0.0)
    except (KeyError, TypeError, ValueError):
        return record.heartbeat_at


def read_progress(storage: Storage, record: JobRecord) -> JobProgress | None:
    """The running epoch's progress, as the driver's last heartbeat had it."""
    progress = read_beat(storage, record).get("progress")
    try:
        return None if progress is None else JobProgress.model_validate(progress)
    except ValueError:
        return None


class CounterWatch:
    """Heartbeat counters as this process has seen them, timed on its own
    monotonic clock: how long a driver's counter has stood still, as far as
    this reader can tell (0 the first time it looks)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seen: dict[tuple, tuple[object, float]] = {}

    def still_for(self, driver: tuple, counter: object) -> float:
        now = self.clock()
        last = self._seen.get(driver)
        if last is None or last[0] != counter:
            self._seen[driver] = (counter, now)
            return 0.0
        return now - last[1]


WATCH = CounterWatch()


def driver_lost(record: JobRecord, storage: Storage) -> str | None:
    """Why the record's driver is known to be gone, or None."""
    return _lost(record, storage)[0]


def _lost(record: JobRecord, storage: Storage) -> tuple[str | None, bool]:
    """(why the driver is gone or None, whether its lease said so)."""
    if record.state.is_terminal or record.driver_pid is None:
        return None, False
    job_dir = storage.job_dir(record.job_id)
    liveness = probe(job_dir)
    if liveness is Liveness.HELD:
        return None, False
    ended = _ended(record)
    if liveness is Liveness.FREE:
        return f"{ended} (nothing holds the job's lease)", True
    beat = read_beat(storage, record)
    if _on_this_machine(record, beat) and not process_alive(record.driver_pid):
        return ended, False
    driver = (str(job_dir), record.driver_pid, record.driver_host, record.generation)
    still = WATCH.still_for(driver, beat.get("beats"))
    if still > timeout_seconds():
        return (f"{DRIVER_LOST}: the heartbeat of {record.driver_host} has not moved for {still:.0f} s "
                f"(as timed on {socket.gethostname()})"), False
    return None, False


def _ended(record: JobRecord) -> str:
    return f"{DRIVER_LOST}: process {record.driver_pid} on {record.driver_host} has ended"


def as_new_owner_sees(record: JobRecord) -> JobRecord:
    """The record as the new holder of its lease sees it: every driver
    before it has ended, so an unfinished job's driver is lost."""
    if record.state.is_terminal:
        return record
    seen = record.model_copy(deep=True)
    seen.fail(f"{_ended(record)} after epoch {record.epochs_completed}")
    return seen


def _on_this_machine(record: JobRecord, beat: dict) -> bool:
    """Whether the record's driver ran on this machine: the same boot and pid
    namespace where its heartbeat says, else (an older driver) the same hostname."""
    if record.driver_host != socket.gethostname():
        return False
    machine = beat.get("machine")
    return machine is None or machine == this_machine()


def checked(record: JobRecord, storage: Storage) -> JobRecord:
    """The record as a reader must see it: its driver's last heartbeat, and
    FAILED "driver lost" if its driver is gone, else as written."""
    for _ in range(2):
        if record.state.is_terminal:
            return record
        reason, by_lease = _lost(record, storage)
        if not by_lease:
            break
        # The lease was free: a driver that ended well wrote its last record before letting go, and a
        # new owner writes only once it holds the lease. Read again to tell them from a lost driver.
        try:
            again = storage.read_record(record.job_id, history=bool(record.history))
        except StorageError:
            break
        if again.state == record.state and again.generation == record.generation:
            break
        record = again
    seen = record.model_copy(deep=True)
    seen.heartbeat_at = last_beat(storage, record)
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

    With the driver's `lease`, each beat first checks that the job is still
    this driver's (else it stops beating, keeps the `LeaseLost` in `lost`
    and calls `on_stop`) and whether a stop was asked of it (`orchestra
    cancel`: `stop_reason` is set, `on_stop` called, and the next beats say
    "stopping", which tells the canceller it was heard).

    Args:
        record: the job's record, owned by this process (`claim`).
        storage: where it is written.
        interval: seconds between beats (default: `interval_seconds`).
        lease: the driver's lease on the job (None: no ownership checks).
        on_stop: called (from the heartbeat's thread) with why the driver must stop.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> storage = Storage(Path(tempfile.mkdtemp()))
        >>> _ = storage.create_job_dir("job-1")
        >>> with Heartbeat(JobRecord(job_id="job-1", name="job", workers=1, spec={}), storage) as beat:
        ...     pass
        >>> beat.beats
        1
    """

    def __init__(self, record: JobRecord, storage: Storage, interval: float | None = None,
                 lease: Lease | None = None, on_stop: Callable[[str], None] = lambda reason: None):
        self.record = record
        self.storage = storage
        self.interval = interval or interval_seconds()
        self.lease = lease
        self.on_stop = on_stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{record.job_id}", daemon=True)
        self.beats = 0
        self.progress: JobProgress | None = None  # the driver's latest, written with each beat
        self.stop_reason: str | None = None
        self.lost: LeaseLost | None = None

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
            if self.record.state.is_terminal or not self._still_owner():
                return
            self._write()

    def _still_owner(self) -> bool:
        if self.lease is None:
            return True
        try:
            self.lease.check()
        except LeaseLost as lost:
            self.lost = lost
            self._ask_to_stop(str(lost))
            return False
        if self.stop_reason is None and stop_requested(self.lease.job_dir, self.lease.generation):
            self._ask_to_stop("a stop was requested (orchestra cancel)")
        return True

    def _ask_to_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.on_stop(reason)

    def _write(self) -> None:
        self.beats += 1
        beat = {"pid": self.record.driver_pid, "host": self.record.driver_host, "machine": this_machine(),
                "generation": self.record.generation, "at": time.time(), "beats": self.beats,
                "stopping": self.stop_reason,
                "progress": self.progress and self.progress.model_dump(mode="json")}
        try:
            atomic_write_text(self.storage.job_dir(self.record.job_id) / HEARTBEAT_FILE, json.dumps(beat))
        except StorageWriteError:
            pass


