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
`orchestra resume JOB --address` continues a job as a new Ray job of the
same orchestra job (`<job>.resume1`, ...), whose driver
(`python -m orchestra.driver resume`) reopens the job's folder.

What it costs: `list` is one `list_jobs` call plus the logs of the runs
that have not ended; a run's final status, which can no longer change, is
kept in a cache on this machine (`~/.cache/orchestra/ray-jobs/`), so each
finished run's log is read at most once. `status` asks for each of the
job's runs and one more (two calls for a job never resumed). Following a job streams its log
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

from orchestra.errors import ClusterError, JobStateError, SpecError, StorageError
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
JOB_KEY = "job_id"  # the orchestra job a Ray job is a run of
DRIVER_END_SECONDS = 60.0  # how long a resume waits for the last run's driver to end after it said so


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

    A job is one or more Ray jobs: the one it was submitted as, whose
    submission id is the job's id, then one per `resume`
    (`<job>.resume1`, `<job>.resume2`, ...; `resume_id`). Each is a run of
    the same job, in the same folder of the cluster's storage; a job's
    status is its latest run's, its history and log those of all its runs.

    Args:
        address: the head's job server, e.g. `http://127.0.0.1:8265`.
    """

    def __init__(self, address: str):
        self.address = address.rstrip("/")
        from ray.job_submission import JobSubmissionClient

        # "Uploading package ..." on every submit (set after the import, which sets INFO)
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)

        with cluster_errors(self.address):
            self._jobs = JobSubmissionClient(self.address, headers=token_headers(self.address))
        self.cache = StatusCache(self.address)

    def submit(self, spec: JobSpec, *, storage: str | None = None, workers: int | None = None,
               datasets: str | None = None) -> str:
        """Start `spec` as a Ray job; return the job's id: the orchestra job
        id, its folder in the cluster's storage and its first Ray job's id.
        Raises SpecError for a layer, optimizer, loss or metric Keras does
        not know; the files the spec names are checked on the cluster."""
        from orchestra.build.model import check_keras_names

        problems = check_keras_names(spec)
        if problems:
            raise SpecError(problems, spec.name)
        job_id = new_job_id(spec.name)
        with tempfile.TemporaryDirectory(prefix="orchestra-submit-") as folder:
            (Path(folder) / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json")))
            self._start_run(job_id, job_id, ["run", SPEC_FILE, "--job-id", job_id], name=spec.name,
                            workers=workers or spec.scaling.workers,
                            options={"--storage": storage, "--workers": workers, "--datasets": datasets},
                            working_dir=folder)
        return job_id

    def resume(self, job_id: str, *, workers: int | None = None, datasets: str | None = None,
               storage: str | None = None) -> None:
        """Continue a STOPPED or FAILED job (JobStateError for any other)
        from its latest checkpoint as a new Ray job, on `workers` workers
        if given; return once its driver owns the job. The storage and
        datasets are the job's first run's unless given. JobStateError with
        the driver's words if it refuses (a batch that does not divide
        among `workers`, a job another driver owns)."""
        from orchestra.driver.resume import RESUMABLE

        runs = self._runs(job_id)
        if _job_of(runs[0]) != job_id:
            raise ClusterError(f"Ray job '{job_id}' is one run of job {_job_of(runs[0])}: resume that job")
        status = self._current(runs)
        if status.state not in RESUMABLE:
            raise JobStateError(f"job {job_id} is {status.state.value}: only STOPPED or FAILED jobs can be resumed")
        # A cancelled driver says STOPPED before it has ended: the new one would find the job still owned.
        try:
            self._wait_for_ray(runs[-1].submission_id, time.monotonic() + DRIVER_END_SECONDS, 0.5)
        except TimeoutError:
            raise JobStateError(f"job {job_id}: the driver of Ray job '{runs[-1].submission_id}' has not ended "
                                f"{DRIVER_END_SECONDS:g} s after it said {status.state.value}: try again "
                                "once it has") from None
        first = runs[0].entrypoint or ""
        run_id = resume_id(job_id, len(runs))
        self._start_run(job_id, run_id, ["resume", job_id], name=status.name, workers=workers or status.workers,
                        options={"--storage": storage or _option(first, "--storage"), "--workers": workers,
                                 "--datasets": datasets or _option(first, "--datasets")})
        while True:
            ended = _ray_state(self._info(run_id)) in RAY_TERMINAL_STATES  # before the read: its last words are read
            log = self._log(run_id)
            if status_lines.parse_statuses(log):  # its first: the job reopened, owned by its driver
                return
            if ended:
                lines = [line for line in log.splitlines() if line.strip()]
                raise JobStateError(f"job {job_id} did not resume: {' / '.join(lines[-3:]) or 'its driver ended'}")
            time.sleep(0.5)

    def _start_run(self, job_id: str, run_id: str, verb: list[str], *, name: str, workers: int,
                   options: dict[str, Any], working_dir: str | None = None) -> None:
        """Submit a Ray job `run_id` whose entrypoint is orchestra's driver
        (`python -m orchestra.driver VERB...`), with the client's own
        orchestra package."""
        command = ["python", "-m", "orchestra.driver", *verb, "--ray-job", run_id, "--status-lines"]
        for flag, value in options.items():
            if value is not None:
                command += [flag, str(value)]
        runtime_env = {"py_modules": [str(Path(__file__).parent.parent)], "env_vars": dict(TENSORFLOW_ENV),
                       **({"working_dir": working_dir} if working_dir else {})}
        metadata = {METADATA_KEY: "1", JOB_KEY: job_id, "name": name, "workers": str(workers)}
        with cluster_errors(self.address):
            self._jobs.submit_job(entrypoint=shlex.join(command), submission_id=run_id,
                                  runtime_env=runtime_env, metadata=metadata)

    def status(self, job_id: str) -> JobStatus:
        return self._current(self._runs(job_id))

    def list(self) -> list[JobStatus]:
        """Every orchestra job, newest first: one Ray job server call, plus
        the logs of the runs that have not ended."""
        runs: dict[str, list[Any]] = {}
        ours = [job for job in self._call(self._jobs.list_jobs) if (job.metadata or {}).get(METADATA_KEY)]
        for job in sorted(ours, key=lambda job: job.start_time or 0):
            runs.setdefault(_job_of(job), []).append(job)
        newest = sorted(runs.values(), key=lambda group: group[0].start_time or 0, reverse=True)
        return [self._current(group) for group in newest]

    def _runs(self, job_id: str) -> list[Any]:
        """The Ray jobs of orchestra job `job_id`, oldest first (one get per
        run, and one more); for the id of a resume's Ray job, that one only."""
        first = self._info(job_id)
        runs = [first]
        while _job_of(first) == job_id:
            info = self._call(self._jobs.get_job_info, resume_id(job_id, len(runs)), missing_ok=True)
            if info is None:
                break
            runs.append(info)
        return runs

    def _current(self, runs: list[Any]) -> JobStatus:
        """The job's status: its latest run's, past runs that ended without a
        word (a resume its driver refused: the job is as the run before left it)."""
        for info in reversed(runs):
            status, spoke = self._run_status(info)
            if spoke or info is runs[0]:
                return status
        raise AssertionError("unreachable: the first run answers")

    def _run_status(self, info: Any) -> tuple[JobStatus, bool]:
        """One run's status from Ray's job info and its driver's log (kept in
        the cache once it can no longer change), and whether its driver has
        written one."""
        cached = self.cache.get(_job_of(info), key=info.submission_id)
        if cached is not None:
            return cached, True
        log = self._log(info.submission_id)
        statuses = status_lines.parse_statuses(log)
        status = _combined_status(info, statuses)
        ended = _ray_state(info) in RAY_TERMINAL_STATES
        if status.state.is_terminal and ended and statuses:
            self.cache.put(status, key=info.submission_id)
        elif not status.state.is_terminal:
            status = status.model_copy(update={"progress": status_lines.latest_progress(log)})
        return status, bool(statuses) or not ended

    def metrics(self, job_id: str) -> list[dict[str, int | float]]:
        """The per-epoch history of all the job's runs: a resumed run's
        first status lines roll it back to the checkpoint it started from."""
        runs = self._runs(job_id)
        return status_lines.history_from(
            [status for info in runs for status in status_lines.parse_statuses(self._log(info.submission_id))])

    def logs(self, job_id: str) -> str:
        """The driver output of all the job's runs, one after the other."""
        return "".join(self._log(info.submission_id) for info in self._runs(job_id))

    def _log(self, run_id: str) -> str:
        return self._call(self._jobs.get_job_logs, run_id, job_id=run_id)

    def follow(self, job_id: str, latest_only: bool = False) -> Iterator[str]:
        """The driver's output as it comes, in chunks, until the job has
        ended: the earlier runs' logs (unless `latest_only`), then the latest
        run's, streamed, each byte once; a dropped stream is reopened and
        what was already seen skipped."""
        *earlier, latest = self._runs(job_id)
        for info in [] if latest_only else earlier:
            yield self._log(info.submission_id)
        run_id = latest.submission_id
        seen = 0
        for attempt in range(RETRIES + 1):
            received = 0
            try:
                for chunk in _iterate(self._jobs.tail_job_logs(run_id)):
                    received += len(chunk)
                    if received > seen:
                        yield chunk[len(chunk) - (received - seen):]
                        seen = received
                return
            except Exception as error:  # noqa: BLE001 - Ray's SDK raises RuntimeError and aiohttp errors
                self._back_off_or_raise(error, attempt, run_id)

    def wait_until_ended(self, job_id: str, deadline: float | None, poll_seconds: float) -> None:
        """Return once Ray says the driver of the job's latest run has ended
        (TimeoutError past the monotonic `deadline`): Ray's job state only,
        no logs, each poll."""
        self._wait_for_ray(self._runs(job_id)[-1].submission_id, deadline, poll_seconds)

    def _wait_for_ray(self, run_id: str, deadline: float | None, poll_seconds: float) -> None:
        while _ray_state(self._info(run_id)) not in RAY_TERMINAL_STATES:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(poll_seconds)

    def cancel(self, job_id: str) -> None:
        """Ask Ray to stop the driver of the job's latest run (SIGTERM, then
        SIGKILL); its workers go with it."""
        run_id = self._runs(job_id)[-1].submission_id
        self._call(self._jobs.stop_job, run_id, job_id=run_id)

    def _info(self, job_id: str):
        info = self._call(self._jobs.get_job_info, job_id, job_id=job_id)
        if not (info.metadata or {}).get(METADATA_KEY):
            raise ClusterError(f"Ray job '{job_id}' at {self.address} is not an orchestra job")
        return info

    def _call(self, method, *args, job_id: str | None = None, missing_ok: bool = False):
        """One request to the job server: passing failures retried with
        backoff, the last one (or any other) as a ClusterError; a job the
        server does not have is None with `missing_ok`."""
        for attempt in range(RETRIES + 1):
            try:
                return method(*args)
            except Exception as error:  # noqa: BLE001 - Ray's SDK raises RuntimeError, ConnectionError, requests errors
                if missing_ok and _missing(error):
                    return None
                self._back_off_or_raise(error, attempt, job_id)
        raise AssertionError("unreachable: the last attempt raises")

    def _back_off_or_raise(self, error: Exception, attempt: int, job_id: str | None) -> None:
        """Wait before trying a passing failure again; raise the last one, or
        any other, as a ClusterError."""
        if attempt == RETRIES or not _transient(error):
            with cluster_errors(self.address, job_id):
                raise error
        time.sleep(_backoff(attempt))


def resume_id(job_id: str, number: int) -> str:
    """The Ray job (submission id) of a job's `number`th resume through a job server."""
    return f"{job_id}.resume{number}"


def _job_of(info: Any) -> str:
    """The orchestra job a Ray job is a run of (a job from before runs: its own id)."""
    return (info.metadata or {}).get(JOB_KEY) or info.submission_id


def _option(entrypoint: str, flag: str) -> str | None:
    """The value a driver's entrypoint gives `flag`, if any."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return None
    return words[words.index(flag) + 1] if flag in words[:-1] else None


RETRIES = 4
RAY_TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
CACHE_ENV = "ORCHESTRA_CACHE"


def _backoff(attempt: int) -> float:
    return min(4.0, 0.25 * 2 ** attempt)


def _missing(error: BaseException) -> bool:
    """The job server does not have the job asked for."""
    text = str(error)
    return "does not exist" in text or "status code 404" in text


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
    """Final statuses of a cluster's jobs' runs (Ray jobs), kept on this
    machine: a run that has ended cannot change, so its log need not be read
    again (a resume is a new run, with a status of its own). Files are
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

    def _path(self, key: str) -> Path:
        return self.folder / f"{check_job_id(key)}.json"

    def get(self, job_id: str, key: str | None = None) -> JobStatus | None:
        """Job `job_id`'s final status as run `key` (default: its first) left it."""
        try:
            status = JobStatus.model_validate_json(self._path(key or job_id).read_text())
        except (OSError, ValueError):
            return None
        return status if status.job_id == job_id and status.state.is_terminal else None

    def put(self, status: JobStatus, key: str | None = None) -> None:
        try:
            atomic_write_text(self._path(key or status.job_id), status.model_dump_json())
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
        job_id=_job_of(info), name=metadata.get("name", info.submission_id), state=state, reason=reason,
        workers=int(metadata.get("workers", 0)), created_at=(info.start_time or 0) / 1000,
        ended_at=info.end_time / 1000 if info.end_time else None,
    )


def _update(last: JobStatus | None, info: Any, state: JobState, reason: str) -> JobStatus:
    if last is None:
        return _placeholder(info, state, reason)
    ended = info.end_time / 1000 if info.end_time else None
    return last.model_copy(update={"state": state, "reason": reason, "ended_at": ended})


def token_headers(address: str) -> dict[str, str]:
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
def cluster_errors(address: str, job_id: str | None = None):
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
