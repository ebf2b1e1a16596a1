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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

from orchestra.errors import ClusterError, SpecError
from orchestra.keras_compat import TENSORFLOW_ENV
from orchestra.spec import JobSpec
from orchestra.storage import status_lines
from orchestra.storage.folders import new_job_id
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
            self._jobs = JobSubmissionClient(self.address, headers=_token_headers())

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
        info = self._info(job_id)
        return _combined_status(info, status_lines.parse_statuses(self.logs(job_id)))

    def list(self) -> list[JobStatus]:
        with _cluster_errors(self.address):
            jobs = [job for job in self._jobs.list_jobs() if (job.metadata or {}).get(METADATA_KEY)]
        jobs.sort(key=lambda job: job.start_time or 0, reverse=True)
        return [_combined_status(job, status_lines.parse_statuses(self.logs(job.submission_id))) for job in jobs]

    def metrics(self, job_id: str) -> list[dict[str, int | float]]:
        self._info(job_id)
        return status_lines.history_from(status_lines.parse_statuses(self.logs(job_id)))

    def logs(self, job_id: str) -> str:
        with _cluster_errors(self.address, job_id):
            return self._jobs.get_job_logs(job_id)

    def cancel(self, job_id: str) -> None:
        """Ask Ray to stop the driver (SIGTERM, then SIGKILL); its workers go with it."""
        self._info(job_id)
        with _cluster_errors(self.address, job_id):
            self._jobs.stop_job(job_id)

    def _info(self, job_id: str):
        with _cluster_errors(self.address, job_id):
            info = self._jobs.get_job_info(job_id)
        if not (info.metadata or {}).get(METADATA_KEY):
            raise ClusterError(f"Ray job '{job_id}' at {self.address} is not an orchestra job")
        return info


def _combined_status(info: Any, statuses: list[JobStatus]) -> JobStatus:
    """The driver's last status, corrected by what Ray knows: a driver Ray
    stopped or lost cannot have said so itself."""
    ray_state = str(info.status.value if hasattr(info.status, "value") else info.status)
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
    return _update(last, info, JobState.FAILED, f"driver lost: {message or ray_state}")


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


def _token_headers() -> dict[str, str]:
    """The cluster's token, from where Ray's own commands take it:
    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token (none with RAY_AUTH_MODE=disabled). Sent as a header
    of this client's requests only, leaving this process's Ray untouched."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
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
            "or RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token") from None
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
