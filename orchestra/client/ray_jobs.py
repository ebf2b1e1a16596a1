"""Jobs on an existing Ray cluster, through its job server (Ray Jobs).

`orchestra submit SPEC --address http://HEAD:8265` hands the spec and the
orchestra package to Ray's job submission API. The client checks what it
can without the cluster's files (the spec's structure, Keras's names); on
the cluster the Ray job's entrypoint is orchestra's driver
(`python -m orchestra.driver run`), which checks the files, trains with the
cluster's Ray and prints a status line per record write
(`orchestra.storage.status_lines`).
Everything a client knows of a job comes from Ray's job state and those
lines, so a laptop needs only the address and the cluster's token.

What it costs: `list` is one `list_jobs` call plus the logs of the jobs
that have not ended; a job's final status, which can no longer change, is
kept in a cache on this machine (`~/.cache/orchestra/ray-jobs/`), so each
finished job's log is read at most once. Following a job streams its log
(Ray's `tail_job_logs`): the log crosses the network once, not once a
second. The job server's passing failures (a reset connection, a 5xx) are
retried with backoff a few times before they are shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from orchestra.errors import ClusterError, SpecError, StorageError
from orchestra.keras_compat import TENSORFLOW_ENV
from orchestra.net import is_loopback, is_private_channel
from orchestra.spec import JobSpec
from orchestra.storage import status_lines
from orchestra.storage.folders import atomic_write_text, check_job_id, new_job_id
from orchestra.storage.record import JobState, JobStatus

ADDRESS_ENVS = ("ORCHESTRA_ADDRESS", "RAY_ADDRESS")
DASHBOARD_PORT = 8265
SPEC_FILE = "spec.json"
METADATA_KEY = "orchestra"


def submission_address(explicit: str | None = None) -> str | None:
    """--address, else ORCHESTRA_ADDRESS, else RAY_ADDRESS when it is a job
    server's URL. A bare `host:port` RAY_ADDRESS is a GCS address (Ray Jobs
    sets one for its drivers): that process trains where it is."""
    if explicit:
        return explicit if "://" in explicit else f"http://{explicit}"
    for name in ADDRESS_ENVS:
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return None


class RayJobs:
    """orchestra jobs on the cluster whose job server is at `address`.

    Args:
        address: the head's job server, e.g. `http://127.0.0.1:8265`.
    """

    def __init__(self, address: str):
        self.address = address.rstrip("/")
        from ray.job_submission import JobSubmissionClient

        # "Uploading package ..." on every submit (set after the import, which sets INFO)
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)

        with _cluster_errors(self.address):
            self._jobs = JobSubmissionClient(self.address, headers=_token_headers(self.address))
        self.cache = StatusCache(self.address)

    def submit(self, spec: JobSpec, *, storage: str | None = None, workers: int | None = None,
               datasets: str | None = None) -> str:
        """Start `spec` as a Ray job; return its id, which is also the
        orchestra job id and the job's folder in the cluster's storage.
        Raises SpecError for a layer, optimizer, loss or metric Keras does
        not know; the files the spec names are checked on the cluster."""
        from orchestra.build.model import check_keras_names

        problems = check_keras_names(spec)
        if problems:
            raise SpecError(problems, spec.name)
        job_id = new_job_id(spec.name)
        command = ["python", "-m", "orchestra.driver", "run", SPEC_FILE, "--job-id", job_id, "--status-lines"]
        for flag, value in (("--storage", storage), ("--workers", workers), ("--datasets", datasets)):
            if value is not None:
                command += [flag, str(value)]
        with tempfile.TemporaryDirectory(prefix="orchestra-submit-") as folder:
            (Path(folder) / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json")))
            runtime_env = {
                "working_dir": folder,
                "py_modules": [str(Path(__file__).parent)],
                "env_vars": dict(TENSORFLOW_ENV),
            }
            metadata = {METADATA_KEY: "1", "name": spec.name,
                        "workers": str(workers or spec.scaling.workers)}
            with _cluster_errors(self.address):
                self._jobs.submit_job(entrypoint=shlex.join(command), submission_id=job_id,
                                      runtime_env=runtime_env, metadata=metadata)
        return job_id

    def status(self, job_id: str) -> JobStatus:
        cached = self.cache.get(job_id)
        if cached is not None:
            return cached
        return self._status(self._info(job_id))

    def list(self) -> list[JobStatus]:
        jobs = [job for job in self._call(self._jobs.list_jobs) if (job.metadata or {}).get(METADATA_KEY)]
        jobs.sort(key=lambda job: job.start_time or 0, reverse=True)
        return [self.cache.get(job.submission_id) or self._status(job) for job in jobs]

    def _status(self, info: Any) -> JobStatus:
        """A job's status from Ray's job info and its driver's log; kept in
        the cache once it can no longer change."""
        log = self.logs(info.submission_id)
        status = _combined_status(info, status_lines.parse_statuses(log))
        if status.state.is_terminal and _ray_state(info) in RAY_TERMINAL_STATES:
            self.cache.put(status)
        elif not status.state.is_terminal:
            status = status.model_copy(update={"progress": status_lines.latest_progress(log)})
        return status

    def metrics(self, job_id: str) -> list[dict[str, int | float]]:
        self._info(job_id)
        return status_lines.history_from(status_lines.parse_statuses(self.logs(job_id)))

    def logs(self, job_id: str) -> str:
        return self._call(self._jobs.get_job_logs, job_id, job_id=job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """The driver's output as it comes, in chunks, until the job has
        ended: streamed, each byte once; a dropped stream is reopened and
        what was already seen skipped."""
        self._info(job_id)
        seen = 0
        for attempt in range(RETRIES + 1):
            received = 0
            try:
                for chunk in _iterate(self._jobs.tail_job_logs(job_id)):
                    received += len(chunk)
                    if received > seen:
                        yield chunk[len(chunk) - (received - seen):]
                        seen = received
                return
            except Exception as error:  # noqa: BLE001 - Ray's SDK raises RuntimeError and aiohttp errors
                self._back_off_or_raise(error, attempt, job_id)

    def wait_until_ended(self, job_id: str, deadline: float | None, poll_seconds: float) -> None:
        """Return once Ray says the job's driver has ended (TimeoutError past
        the monotonic `deadline`): Ray's job state only, no logs, each poll."""
        while _ray_state(self._info(job_id)) not in RAY_TERMINAL_STATES and self.cache.get(job_id) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(poll_seconds)

    def cancel(self, job_id: str) -> None:
        """Ask Ray to stop the driver (SIGTERM, then SIGKILL); its workers go with it."""
        self._info(job_id)
        self._call(self._jobs.stop_job, job_id, job_id=job_id)

    def _info(self, job_id: str):
        info = self._call(self._jobs.get_job_info, job_id, job_id=job_id)
        if not (info.metadata or {}).get(METADATA_KEY):
            raise ClusterError(f"Ray job '{job_id}' at {self.address} is not an orchestra job")
        return info

    def _call(self, method, *args, job_id: str | None = None):
        """One request to the job server: passing failures retried with
        backoff, the last one (or any other) as a ClusterError."""
        for attempt in range(RETRIES + 1):
            try:
                return method(*args)
            except Exception as error:  # noqa: BLE001 - Ray's SDK raises RuntimeError, ConnectionError, requests errors
                self._back_off_or_raise(error, attempt, job_id)
        raise AssertionError("unreachable: the last attempt raises")

    def _back_off_or_raise(self, error: Exception, attempt: int, job_id: str | None) -> None:
        """Wait before trying a passing failure again; raise the last one, or
        any other, as a ClusterError."""
        if attempt == RETRIES or not _transient(error):
            with _cluster_errors(self.address, job_id):
                raise error
        time.sleep(_backoff(attempt))


RETRIES = 4
RAY_TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
CACHE_ENV = "ORCHESTRA_CACHE"


def _backoff(attempt: int) -> float:
    return min(4.0, 0.25 * 2 ** attempt)


def _transient(error: BaseException) -> bool:
    """A failure worth trying again: the connection dropped or the server
    answered 5xx. A refused token, an unknown job or a bad request are not."""
    from ray.exceptions import AuthenticationError

    if isinstance(error, AuthenticationError):
        return False
    text = str(error)
    if "does not exist" in text or "404" in text:
        return False
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    return any(mark in text for mark in ("status code 5", "Connection reset", "Connection aborted",
                                          "Server disconnected", "closed unexpectedly", "Bad Gateway",
                                          "Service Unavailable", "Internal Server Error"))


def _iterate(stream) -> Iterator[str]:
    """An async iterator's items, one at a time, in this (synchronous) thread."""
    loop = asyncio.new_event_loop()
    try:
        iterator = stream.__aiter__()
        while True:
            try:
                yield loop.run_until_complete(iterator.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _ray_state(info: Any) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


class StatusCache:
    """Final statuses of a cluster's jobs, kept on this machine: a job that
    has ended cannot change, so its log need not be read again. Files are
    data only (JSON of a JobStatus, validated on read); an unreadable one is
    as good as none.

    Args:
        address: the job server the statuses come from.
        root: the cache folder (default: ORCHESTRA_CACHE, else XDG_CACHE_HOME
            or ~/.cache, then orchestra/ray-jobs).
    """

    def __init__(self, address: str, root: Path | None = None):
        if root is None:
            xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            root = Path(os.environ.get(CACHE_ENV) or xdg / "orchestra") / "ray-jobs"
        self.folder = Path(root) / hashlib.sha256(address.encode()).hexdigest()[:16]

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{check_job_id(job_id)}.json"

    def get(self, job_id: str) -> JobStatus | None:
        try:
            status = JobStatus.model_validate_json(self._path(job_id).read_text())
        except (OSError, ValueError):
            return None
        return status if status.job_id == job_id and status.state.is_terminal else None

    def put(self, status: JobStatus) -> None:
        try:
            atomic_write_text(self._path(status.job_id), status.model_dump_json())
        except (OSError, StorageError):
            pass  # a cache that cannot be written only costs a read next time


def _combined_status(info: Any, statuses: list[JobStatus]) -> JobStatus:
    """The driver's last status, corrected by what Ray knows: a driver Ray
    stopped or lost cannot have said so itself."""
    ray_state = _ray_state(info)
    last = statuses[-1] if statuses else None
    if last is not None and (last.state.is_terminal or ray_state in ("PENDING", "RUNNING")):
        return last
    if ray_state in ("PENDING", "RUNNING"):
        return _placeholder(info, JobState.PENDING, "the driver is starting")
    if ray_state == "STOPPED":
        reached = f" after epoch {last.epochs_completed}" if last else " before training started"
        return _update(last, info, JobState.STOPPED, f"cancelled{reached}")
    message = (info.message or "").strip()
    if last is None:
        return _placeholder(info, JobState.FAILED, message or "the driver failed before writing a record")
    # Ray appends the log's tail ("..., last available logs ...:"): here, the driver's own status lines.
    cause = message.splitlines()[0].split(", last available logs", 1)[0] if message else ray_state
    return _update(last, info, JobState.FAILED, f"driver lost: {cause}")


def _placeholder(info: Any, state: JobState, reason: str) -> JobStatus:
    metadata = info.metadata or {}
    return JobStatus(
        job_id=info.submission_id, name=metadata.get("name", info.submission_id), state=state, reason=reason,
        workers=int(metadata.get("workers", 0)), created_at=(info.start_time or 0) / 1000,
        ended_at=info.end_time / 1000 if info.end_time else None,
    )


def _update(last: JobStatus | None, info: Any, state: JobState, reason: str) -> JobStatus:
    if last is None:
        return _placeholder(info, state, reason)
    ended = info.end_time / 1000 if info.end_time else None
    return last.model_copy(update={"state": state, "reason": reason, "ended_at": ended})


def _token_headers(address: str) -> dict[str, str]:
    """The cluster's token, from where Ray's own commands take it:
    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token (none with RAY_AUTH_MODE=disabled). Sent as a header
    of this client's requests only, leaving this process's Ray untouched.

    A token only travels where no one else reads it: over https, or over
    http to this machine (a tunnel). ~/.ray/auth_token, which Ray also makes
    for a local cluster, is sent only to this machine unless named
    explicitly with RAY_AUTH_TOKEN_PATH. ClusterError otherwise."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named or Path.home() / ".ray" / "auth_token").expanduser()
    if not token and path.is_file():
        if not named and not is_loopback(urlsplit(address).hostname or ""):
            return {}  # the default file is this machine's cluster's token, not the remote one's
        token = path.read_text().strip()
    if token and not is_private_channel(address):
        raise ClusterError(f"refusing to send the cluster's token in clear text to {address}: use https://, or "
                           "reach the job server through a tunnel to this machine (kubectl port-forward, ssh -L) "
                           "and use http://127.0.0.1:PORT")
    return {"authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _cluster_errors(address: str, job_id: str | None = None):
    """Turn the job server's failures into one ClusterError a user can act on."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        if "Authentication failed" in str(error):
            raise ClusterError(
                f"the Ray job server at {address} refused the token: use the token of that cluster "
                "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
        raise ClusterError(
            f"the Ray job server at {address} asks for a token and none was sent: set RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH (~/.ray/auth_token is sent only to a job server on this machine)") from None
    except ClusterError:
        raise
    except Exception as error:  # noqa: BLE001 - Ray's SDK raises RuntimeError, ConnectionError, requests errors
        text = str(error).strip()
        if isinstance(error, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
            raise ClusterError(f"cannot reach a Ray job server at {address}: is the head running, "
                               f"with its dashboard on port {DASHBOARD_PORT}?") from None
        if job_id is not None and ("does not exist" in text or "404" in text):
            raise ClusterError(f"no job '{job_id}' on the Ray cluster at {address}") from None
        last_line = text.splitlines()[-1] if text else type(error).__name__
        raise ClusterError(f"Ray job server at {address}: {last_line[:500]}") from None
