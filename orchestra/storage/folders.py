"""Shared storage: one folder per job, atomic records, atomic checkpoints.

    <root>/<job_id>/job.json                 the record: state and last epoch (write, fsync, rename)
    <root>/<job_id>/history.jsonl            one line per epoch (append, fsync)
    <root>/<job_id>/heartbeat.json           the driver's sign of life (storage.heartbeat)
    <root>/<job_id>/checkpoints/epoch-0007/   one checkpoint (published by rename):
        model.keras | model.weights.h5         the model, or its weights only
        state.json                             the driver's callback state at that epoch
        best_weights.npz                       restore_best_weights' snapshot, if any
    <root>/<job_id>/model/                    the model training ended with
    <root>/<job_id>/tensorboard/{train,validation}/
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from orchestra.errors import StorageError, StorageWriteError
from orchestra.storage.record import JobRecord

STORAGE_ENV = "ORCHESTRA_STORAGE"
DEFAULT_STORAGE = "~/orchestra_storage"
RECORD_FILE = "job.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_STATE_FILE = "state.json"
MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best_weights.npz"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def storage_root(override: str | None = None, spec_storage: str | None = None) -> Path:
    """--storage, else ORCHESTRA_STORAGE, else the spec's storage, else the default."""
    raw = override or os.environ.get(STORAGE_ENV) or spec_storage or DEFAULT_STORAGE
    if "://" in raw and not raw.startswith("file://"):
        raise StorageError(f"storage '{raw}': only local or mounted shared paths are supported (file:// or a path)")
    return Path(raw.removeprefix("file://")).expanduser().absolute()


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise StorageError(
            f"invalid job id {job_id!r}: letters, digits, '_', '.', '-' only, "
            "starting with a letter or digit"
        )
    return job_id


def new_job_id(name: str) -> str:
    """`<name>-<date>-<time>-<4 hex>`: sorts by submission, unique without a lookup."""
    return check_job_id(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def model_file(directory: str | Path) -> Path:
    """The model file of a checkpoint or model folder: the whole model if
    it was saved, else its weights."""
    directory = Path(directory)
    full = directory / MODEL_FILE
    return full if full.is_file() else directory / WEIGHTS_FILE


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename: readers see the old file or the new, never half.
    Raises StorageWriteError naming `path` when the storage refuses."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would: teammates sharing the storage can read it
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageWriteError):
            raise StorageWriteError.of(path, exc) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(staging: Path, final: Path) -> None:
    """Make a fully written staging folder visible under its final name.
    On failure the staging folder is removed (a full disk gets its space
    back) and StorageWriteError names `final`."""
    try:
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_directory(final.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageWriteError.of(final, exc) from exc


class Storage:
    """Job folders under one root."""

    def __init__(self, root: Path):
        self.root = root
        # Called with every record written (a Ray job's driver prints it for the client).
        self.on_write: Callable[[JobRecord], None] | None = None
        # Writes from more than one thread (a driver's callbacks and its signal handling) land in order.
        self._write_lock = threading.Lock()

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise StorageError(f"storage root {self.root} is not writable: {exc.strerror}") from None

    def new_job_id(self, name: str) -> str:
        return new_job_id(name)

    def job_dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def create_job_dir(self, job_id: str) -> Path:
        path = self.job_dir(job_id)
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise StorageError(f"job '{job_id}' already exists in {self.root}") from None
        except OSError as exc:
            raise StorageWriteError.of(path, exc) from exc
        return path

    def checkpoint_dir(self, job_id: str, epoch: int) -> Path:
        return self.job_dir(job_id) / "checkpoints" / f"epoch-{epoch:04d}"

    def model_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "model"

    def tensorboard_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "tensorboard"

    def write_record(self, record: JobRecord) -> None:
        """Write the record atomically (without its history, which
        `append_history` keeps) and announce it to `on_write`."""
        with self._write_lock:  # serialised inside the lock: writes land in the order of their contents
            atomic_write_text(self.job_dir(record.job_id) / RECORD_FILE, record.model_dump_json(indent=1))
        if self.on_write is not None:
            self.on_write(record)

    def read_record(self, job_id: str, history: bool = False) -> JobRecord:
        """The job's record; with `history`, its per-epoch history too
        (`list` and `status` need only the record)."""
        path = self.job_dir(job_id) / RECORD_FILE
        try:
            record = JobRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise StorageError(f"no job '{job_id}' in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read the record of job '{job_id}': {exc.strerror or exc}") from None
        except ValueError as exc:  # not JSON, or not a record: storage is input like any other
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise StorageError(f"the record of job '{job_id}' ({path}) is unreadable: {first}") from None
        if record.history and not record.metrics:  # a record from before history.jsonl held its history
            record.metrics = record.history[-1]
        if history:
            record.history = self.read_history(job_id) or record.history
        return record

    def append_history(self, job_id: str, entry: dict) -> None:
        """Add one epoch's line to the history: a constant cost per epoch,
        whatever the job's length."""
        path = self.job_dir(job_id) / HISTORY_FILE
        line = json.dumps(entry, allow_nan=True) + "\n"
        try:
            with open(path, "a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise StorageWriteError.of(path, exc) from exc

    def rewrite_history(self, job_id: str, entries: list[dict]) -> None:
        """Replace the history (a restart or resume cuts it back to its checkpoint)."""
        text = "".join(json.dumps(entry, allow_nan=True) + "\n" for entry in entries)
        atomic_write_text(self.job_dir(job_id) / HISTORY_FILE, text)

    def read_history(self, job_id: str) -> list[dict]:
        """Every epoch's entry, oldest first; a last line cut short by a
        crash mid-append is left out."""
        path = self.job_dir(job_id) / HISTORY_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read the history of job '{job_id}': {exc.strerror or exc}") from None
        entries = []
        for line in text.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
        return entries

    def records(self) -> list[JobRecord]:
        """Every job in the storage, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob(f"*/{RECORD_FILE}"):
            try:
                found.append(JobRecord.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    @staticmethod
    def read_checkpoint_state(checkpoint: Path) -> dict:
        return json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())
