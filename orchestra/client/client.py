"""The Python client: submit jobs, follow them, read their results.

`Client()` works on this machine (background drivers with embedded Ray,
records in the local storage); `Client("http://HEAD:8265")` works on a Ray
cluster through its job server, from anywhere that reaches it.

Example:

    >>> import orchestra
    >>> client = orchestra.Client(storage="/tmp/orchestra-doc")
    >>> client.list()
    []
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from orchestra.client.inference import evaluate, load_model, predict
from orchestra.client.local import LocalJobs
from orchestra.client.ray_jobs import RayJobs, submission_address
from orchestra.errors import StorageError
from orchestra.spec import JobSpec, load_spec
from orchestra.storage.folders import Storage, storage_root
from orchestra.storage.record import JobStatus


class Client:
    """Jobs on a Ray cluster or on this machine.

    Args:
        address: a Ray job server, e.g. `http://HEAD:8265` (default:
            ORCHESTRA_ADDRESS, else RAY_ADDRESS when it is a URL; neither:
            this machine).
        storage: on this machine, the storage root (default:
            ORCHESTRA_STORAGE, else ~/orchestra_storage). On a cluster the
            storage is the cluster's, named per job in `submit`.
    """

    def __init__(self, address: str | None = None, storage: str | None = None):
        self.address = submission_address(address)
        self.storage = Storage(storage_root(storage))
        self._jobs = RayJobs(self.address) if self.address else LocalJobs(self.storage)

    def submit(self, spec: JobSpec | str | os.PathLike, storage: str | None = None, workers: int | None = None,
               datasets: str | None = None) -> str:
        """Start a job and return its id at once.

        Args:
            spec: a JobSpec, or the path of a JSON spec.
            storage: the storage root the job writes to (on a cluster, a
                path every node shares; default: the cluster's
                ORCHESTRA_STORAGE, else the spec's `storage`).
            workers: overrides `scaling.workers`.
            datasets: the dataset directory, where the job runs.
        """
        if not isinstance(spec, JobSpec):
            spec = load_spec(spec)
        return self._jobs.submit(spec, storage=storage, workers=workers, datasets=datasets)

    def status(self, job_id: str) -> JobStatus:
        """The job's status now: the fields of `orchestra status --json`."""
        return self._jobs.status(job_id)

    def list(self) -> list[JobStatus]:
        """Every job, newest first."""
        return self._jobs.list()

    def wait(self, job_id: str, timeout: float | None = None, poll_seconds: float = 1.0) -> JobStatus:
        """Block until the job has ended; return its final status.
        Raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._jobs.wait_until_ended(job_id, deadline, poll_seconds)
        except TimeoutError:
            state = self.status(job_id).state.value
            raise TimeoutError(f"job {job_id} is still {state} after {timeout:g} s") from None
        return self.status(job_id)

    def follow(self, job_id: str, latest_only: bool = False) -> Iterator[str]:
        """The driver's output as it comes, in chunks, until the job has
        ended; on a cluster streamed, each byte once.

        Args:
            job_id: the job.
            latest_only: on a cluster, only the output of the job's latest
                run (after a resume, the resumed one's). Here a resumed job's
                driver writes on in the same log, all of which is followed.
        """
        if latest_only and self.address:
            return self._jobs.follow(job_id, latest_only=True)
        return self._jobs.follow(job_id)

    def metrics(self, job_id: str) -> list[dict[str, float]]:
        """The per-epoch history of the whole job."""
        return self._jobs.metrics(job_id)

    def logs(self, job_id: str) -> str:
        """The driver's output."""
        return self._jobs.logs(job_id)

    def cancel(self, job_id: str, timeout: float = 60.0) -> JobStatus:
        """Stop the job (its workers end with it); return its final status."""
        self._jobs.cancel(job_id)
        return self.wait(job_id, timeout, poll_seconds=0.5)

    def resume(self, job_id: str, workers: int | None = None, datasets: str | None = None,
               storage: str | None = None) -> None:
        """Continue a STOPPED or FAILED job (a lost driver's job is FAILED)
        from its latest checkpoint, with the numbers of a run never stopped;
        return once its new driver owns the job, and follow it with
        `status` or `wait`. Here the driver runs in the background on this
        machine; on a cluster it is a new Ray job of the same job (same id,
        same folder, one history). Raises JobStateError for a job in any
        other state, or with the driver's words if it refuses.

        Args:
            job_id: the job.
            workers: continue on this many workers (default: as before). The
                global batch (fit.batch_size) stays what it was, so it must
                divide among them; each epoch's numbers are the same, within
                float noise, as on the job's own count.
            datasets: the dataset directory where the driver runs (default:
                ORCHESTRA_DATASETS; on a cluster, the job's submission's).
            storage: on a cluster, its storage as the cluster sees it
                (default: the job's submission's, else the cluster's
                ORCHESTRA_STORAGE); here, the Client's own is the job's.
        """
        if self.address:
            self._jobs.resume(job_id, workers=workers, datasets=datasets, storage=storage)
            return
        if storage is not None and storage_root(storage) != self.storage.root:
            raise StorageError(f"this client reads jobs from {self.storage.root}: make a Client(storage={storage!r})")
        self._jobs.resume(job_id, datasets=datasets, workers=workers)

    # These read the job's files from this machine: on a cluster, give the
    # Client the storage's mount here (`Client(address, storage=PATH)`).

    def load_model(self, job_id: str, checkpoint: str | None = None):
        """`orchestra.load_model` on this client's storage."""
        return load_model(job_id, storage=str(self.storage.root), checkpoint=checkpoint)

    def evaluate(self, job_id: str, data: dict[str, Any] | None = None, checkpoint: str | None = None,
                 datasets: str | None = None) -> dict[str, Any]:
        """`orchestra.evaluate` on this client's storage (read from this machine)."""
        return evaluate(job_id, data=data, storage=str(self.storage.root), checkpoint=checkpoint, datasets=datasets)

    def predict(self, job_id: str, input_path: str, output_path: str, checkpoint: str | None = None) -> dict[str, Any]:
        """`orchestra.predict` on this client's storage (read from this machine)."""
        return predict(job_id, input_path, output_path, storage=str(self.storage.root), checkpoint=checkpoint)
