"""Jobs on this machine, each driven by its own background driver process.

The embedded default for `Client()` and `orchestra submit --detach`: a
driver process per job, with its own embedded Ray, outliving the Python
session that started it (`python -m orchestra.driver`). The client checks
the spec and hands the driver what the checks found
(`<storage>/.drivers/<job>.prepared.json`), so they run once. The
driver's output goes to `<storage>/.drivers/<job>.log` beside its pid, and
the job record in the storage is the status.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from orchestra.errors import StorageError
from orchestra.spec import JobSpec
from orchestra.storage import heartbeat
from orchestra.storage.bucket import node_path
from orchestra.storage.folders import Storage, check_job_id, new_job_id, storage_root
from orchestra.storage.lease import (
    SMALL_FILE_LIMIT,
    Liveness,
    Process,
    probe,
    request_stop,
    start_ticks,
    this_machine,
)
from orchestra.storage.paths import read_stored_text
from orchestra.storage.record import JobState, JobStatus

DRIVERS_DIR = ".drivers"
DRIVER_EXIT_SECONDS = 10.0  # how long a follower waits for a finished job's driver to print its last lines
STOP_ANSWER_BEATS = 3  # heartbeats `cancel` gives a driver to say it heard the stop request

_children: dict[int, subprocess.Popen] = {}  # reaped on status, so none lingers as a zombie


class LocalJobs:
    """Jobs whose records are in `storage` and whose drivers run here."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.drivers = node_path(storage.root) / DRIVERS_DIR  # on a bucket: a folder of this machine's

    def submit(self, spec: JobSpec, *, storage: str | None = None, workers: int | None = None,
               datasets: str | None = None) -> str:
        """Check the spec as `orchestra submit` would (SpecError before
        anything starts), then start its driver in the background."""
        from orchestra.driver.preflight import preflight

        if storage is not None and storage_root(storage) != self.storage.root:
            raise StorageError(f"this client reads jobs from {self.storage.where}: make a Client(storage={storage!r})")
        spec = spec.with_overrides(workers=workers)
        prepared = preflight(spec, storage=str(self.storage.root), datasets=datasets)
        job_id = new_job_id(spec.name)
        self.drivers.mkdir(parents=True, exist_ok=True)
        self._prepared_file(job_id).write_text(prepared.to_json())
        self._start_driver(job_id, ["run", "--prepared", str(self._prepared_file(job_id)), "--job-id", job_id],
                           "w")
        return job_id

    def resume(self, job_id: str, datasets: str | None = None, workers: int | None = None) -> None:
        """Check that the job can resume (JobStateError if not), then continue
        it from its latest checkpoint with a background driver (on `workers`
        workers if given; JobStateError with the driver's words if it refuses)."""
        from orchestra.driver.resume import check_resumable
        from orchestra.errors import JobStateError

        resumes = check_resumable(self.storage, job_id).resumes
        self.drivers.mkdir(parents=True, exist_ok=True)
        options = [*(["--datasets", datasets] if datasets else []),
                   *(["--workers", str(workers)] if workers is not None else [])]
        driver = self._start_driver(job_id, ["resume", job_id, *options], "a")
        # Returns once the driver owns the job: until then its record is the lost one's.
        while self.storage.read_record(job_id).resumes == resumes:
            if driver.poll() is not None:
                lines = [line for line in self.logs(job_id).splitlines() if line.strip()]
                raise JobStateError(f"job {job_id} did not resume: {' / '.join(lines[-3:])}")
            time.sleep(0.2)

    def _prepared_file(self, job_id: str) -> Path:
        return self.drivers / f"{check_job_id(job_id)}.prepared.json"

    def _start_driver(self, job_id: str, verb: list[str], log_mode: str) -> subprocess.Popen:
        # Status and progress lines in the log let a follower draw the progress bar.
        command = [sys.executable, "-m", "orchestra.driver", *verb, "--storage", str(self.storage.root),
                   "--status-lines"]
        with open(self.drivers / f"{job_id}.log", log_mode) as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        _children[driver.pid] = driver
        # Which process, on which machine, started when: a pid alone may be reused, or another host's.
        (self.drivers / f"{job_id}.pid").write_text(
            Process(socket.gethostname(), driver.pid, this_machine(), start_ticks(driver.pid)).to_json())
        return driver

    def status(self, job_id: str) -> JobStatus:
        try:
            record = heartbeat.checked(self.storage.read_record(job_id), self.storage)
            status = record.status()
            if not status.state.is_terminal:
                status.progress = heartbeat.read_progress(self.storage, record)
            return status
        except StorageError:
            pid = self._pid(job_id)
            if pid is None:
                raise
        spec = json.loads(self._prepared_file(job_id).read_text())["spec"]
        started = (self.drivers / f"{job_id}.pid").stat().st_mtime
        placeholder = dict(job_id=job_id, name=spec["name"], workers=spec["scaling"]["workers"], created_at=started)
        if _alive(pid):
            return JobStatus(state=JobState.PENDING, reason="the driver is starting", **placeholder)
        lines = [line for line in self.logs(job_id).splitlines() if line.strip()]
        reason = " / ".join(lines[-4:]) or "the driver ended before writing a record"
        return JobStatus(state=JobState.FAILED, reason=reason[:2000], **placeholder)

    def list(self) -> list[JobStatus]:
        return [heartbeat.checked(record, self.storage).status() for record in self.storage.records()]

    def metrics(self, job_id: str) -> list[dict[str, int | float]]:
        return self.storage.read_record(job_id, history=True).history

    def logs(self, job_id: str) -> str:
        path = self.drivers / f"{check_job_id(job_id)}.log"
        if not path.is_file():
            raise StorageError(f"no driver log for job '{job_id}': only jobs submitted with --detach or "
                               "Client.submit keep one (a foreground job printed to its terminal)")
        return path.read_text(errors="replace")

    def follow(self, job_id: str, poll_seconds: float = 0.3) -> Iterator[str]:
        """The driver's output as it comes, in chunks, until the job has
        ended: only the bytes added since the last look are read."""
        self.logs(job_id)  # StorageError for a job with no driver log
        path = self.drivers / f"{check_job_id(job_id)}.log"
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        ended_at = None
        with open(path, "rb") as log:
            while True:
                # Checked before reading, so the bytes written before the end are read after it.
                done = self._driver_done(job_id, ended_at)
                if ended_at is None and self.status(job_id).state.is_terminal:
                    ended_at = time.monotonic()
                text = decode(log.read(), final=done)
                if text:
                    yield text
                if done:
                    return
                time.sleep(poll_seconds)

    def _driver_done(self, job_id: str, ended_at: float | None) -> bool:
        """The job has ended and its driver has written its last words (exited,
        or had `DRIVER_EXIT_SECONDS` to do so)."""
        if ended_at is None:
            return False
        pid = self._pid(job_id)
        return pid is None or not _alive(pid) or time.monotonic() - ended_at > DRIVER_EXIT_SECONDS

    def wait_until_ended(self, job_id: str, deadline: float | None, poll_seconds: float) -> None:
        """Return once the job has ended (TimeoutError past the monotonic `deadline`)."""
        while not self.status(job_id).state.is_terminal:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(poll_seconds)

    def cancel(self, job_id: str) -> None:
        """Ask the job's driver to stop, as Ctrl-C would: it records STOPPED
        and ends its workers. The request goes through the job folder (a
        stop request its heartbeat polls), so it reaches a driver on any
        host sharing the storage, or one in a terminal. Only a driver that
        does not answer within a few heartbeats, or has not created its job
        yet, is sent SIGTERM, and only if the process is that driver: on this
        machine, started when its pid file says (a reused pid started
        later), running orchestra's driver for this job."""
        driver = self._driver(job_id)
        try:
            record = self.storage.read_record(job_id)
        except StorageError:
            if driver is None:
                raise
            record = None
        if record is not None:
            job_dir = self.storage.job_dir(job_id)
            if record.state.is_terminal or probe(job_dir) is Liveness.FREE:
                return  # it has ended, or its driver has ("driver lost"): nothing runs to be stopped
            request_stop(job_dir, record.generation)
            if self._stop_heard(job_id):
                return
        if driver is not None and driver.runs_here() and _is_driver_of(driver.pid, job_id):
            os.kill(driver.pid, signal.SIGTERM)

    def _stop_heard(self, job_id: str) -> bool:
        """Whether the driver answered a stop request (its heartbeat says it
        is stopping, its job ended, or it let the lease go) within a few beats."""
        deadline = time.monotonic() + STOP_ANSWER_BEATS * heartbeat.interval_seconds() + 1.0
        while time.monotonic() < deadline:
            record = self.storage.read_record(job_id)
            if (record.state.is_terminal or heartbeat.read_beat(self.storage, record).get("stopping")
                    or probe(self.storage.job_dir(job_id)) is Liveness.FREE):
                return True
            time.sleep(0.2)
        return False

    def _pid(self, job_id: str) -> int | None:
        driver = self._driver(job_id)
        return None if driver is None else driver.pid

    def _driver(self, job_id: str) -> Process | None:
        """The background driver its pid file names (an older file's bare pid: on no known host)."""
        path = self.drivers / f"{check_job_id(job_id)}.pid"
        try:
            text = read_stored_text(path, SMALL_FILE_LIMIT, f"the driver pid file of job '{job_id}'").strip()
            driver = Process.from_json(text) if text.startswith("{") else Process("", int(text))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise StorageError(f"the driver pid file of job '{job_id}' is unreadable: {path}") from None
        return driver if driver.pid > 0 else None


def _is_driver_of(pid: int, job_id: str) -> bool:
    """Whether process `pid` on this host runs orchestra's driver for `job_id` (its command line says so)."""
    try:
        arguments = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [word.decode(errors="replace") for word in arguments]
    return "orchestra.driver" in words and (job_id in words or f"{job_id}.prepared.json" in " ".join(words))


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return heartbeat.process_alive(pid)

