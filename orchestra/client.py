"""The Python client: job status, history and models from shared storage.

Example:

    >>> import orchestra
    >>> client = orchestra.Client(storage="/tmp/orchestra-doc")
    >>> client.list()
    []
"""

from __future__ import annotations

from typing import Any

from orchestra.record import JobStatus
from orchestra.storage import Storage, storage_root


class Client:
    """Reads jobs from a storage root (default: ORCHESTRA_STORAGE or
    ~/orchestra_storage)."""

    def __init__(self, storage: str | None = None):
        self.storage = Storage(storage_root(storage))

    def status(self, job_id: str) -> JobStatus:
        return self.storage.read_record(job_id).status()

    def list(self) -> list[JobStatus]:
        """Every job, newest first."""
        return [record.status() for record in self.storage.records()]

    def metrics(self, job_id: str) -> list[dict[str, float]]:
        """The per-epoch history of the whole job."""
        return self.storage.read_record(job_id).history

    def load_model(self, job_id: str, checkpoint: str | None = None):
        return load_model(job_id, storage=str(self.storage.root), checkpoint=checkpoint)


def load_model(job_id: str, storage: str | None = None, checkpoint: str | None = None) -> Any:
    """Load a job's model with tf-keras, compiled as the spec says.

    Args:
        job_id: the job.
        storage: its storage root (default: ORCHESTRA_STORAGE or ~/orchestra_storage).
        checkpoint: None for the model training ended with (the one
            `test_metrics` evaluates; the best epoch's under
            `restore_best_weights`), `"best"` for the best checkpoint,
            `"latest"` for the newest one.
    """
    from orchestra.keras_compat import keras
    from orchestra.model import build_model
    from orchestra.spec import JobSpec
    from orchestra.worker import model_file

    store = Storage(storage_root(storage))
    record = store.read_record(job_id)
    if checkpoint is None:
        directory = record.model_path
    elif checkpoint == "best":
        directory = record.best_checkpoint
    elif checkpoint == "latest":
        directory = record.checkpoints[-1].path if record.checkpoints else None
    else:
        raise ValueError(f"checkpoint must be None, 'best' or 'latest', not {checkpoint!r}")
    if directory is None:
        raise FileNotFoundError(f"job {job_id} ({record.state.value}) has no {checkpoint or 'final'} model")
    path = model_file(directory)
    if path.name.endswith(".keras"):
        return keras().models.load_model(str(path))
    spec = JobSpec.model_validate(record.spec)
    model = build_model(spec, tuple(record.input_shape))
    model.load_weights(str(path))
    return model
