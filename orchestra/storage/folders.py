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

On an S3 bucket (`s3://bucket/prefix`) the root is this process's mirror of
the bucket (storage.bucket): every write here is published there too, and
every read first fetches what the bucket holds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import TypeAdapter

from orchestra.errors import StorageError, StorageWriteError
from orchestra.storage import bucket
from orchestra.storage.paths import read_stored_text
from orchestra.storage.record import JobRecord

STORAGE_ENV = "ORCHESTRA_STORAGE"
DEFAULT_STORAGE = "~/orchestra_storage"
RECORD_FILE = "job.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_STATE_FILE = "state.json"
MODEL_FILE = "model.keras"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best_weights.npz"
# What a publish leaves in a folder while it writes, and what it sets aside while it switches.
STAGING_PREFIX = ".staging-"
OLD_PREFIX = ".old-"
# Sizes past which a file in storage is refused unread (a record is a few kB).
RECORD_LIMIT = 16 << 20
STATE_LIMIT = 16 << 20
HISTORY_LIMIT = 256 << 20
_HISTORY_ENTRY = TypeAdapter(dict[str, int | float])
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CHECKPOINT_NAME = re.compile(r"^epoch-\d{4,}$")


def storage_root(override: str | None = None, spec_storage: str | None = None) -> Path:
    """--storage, else ORCHESTRA_STORAGE, else the spec's storage, else the default."""
    raw = override or os.environ.get(STORAGE_ENV) or spec_storage or DEFAULT_STORAGE
    if bucket.is_uri(raw):
        return bucket.mirror_path(bucket.parse_uri(raw))
    if "://" in raw and not raw.startswith("file://"):
        raise StorageError(f"storage '{raw}': a path (or file://), or an S3 bucket (s3://<bucket>/<prefix>)")
    if "\x00" in raw:
        raise StorageError(f"storage {raw!r}: a path cannot hold a NUL character")
    try:
        return Path(raw.removeprefix("file://")).expanduser().absolute()
    except RuntimeError:  # '~name' of a user this machine does not know
        raise StorageError(f"storage '{raw}': no such user's home; give an absolute path") from None


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
    directory = bucket.pull_folder(directory)
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
        bucket.push_file(path)
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
    If `final` exists (an epoch saved again, the model of a resumed job) the
    two are switched, so a complete folder is there at every moment, and
    the old one is removed after. On failure the staging folder is removed
    (a full disk gets its space back) and StorageWriteError names `final`.
    A folder in a bucket's mirror is uploaded first (storage.bucket: its
    files, then the manifest that makes it visible), then kept in this
    process's mirror."""
    if bucket.locate(final) is not None:
        try:
            bucket.publish_folder(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = bucket.own(final)
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_directory(staging)
        if final.is_symlink() or not final.exists():
            os.replace(staging, final)
            fsync_directory(final.parent)
            return
        old = staging
        if not _exchange(staging, final):  # no atomic switch here: the old one steps aside, then the new one in
            old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(staging, final)
            except OSError:
                os.replace(old, final)
                raise
        fsync_directory(final.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageWriteError.of(final, exc) from exc
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with
    RENAME_EXCHANGE); False where the system or the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def sweep_folder(folder: Path) -> list[str]:
    """Tidy what crashed publishes left in `folder`: staging folders are
    removed, a folder set aside by a publish that did not finish goes back
    under its name if nothing took it (else it is removed). Symlinks are
    removed, never followed. Returns the names removed or restored."""
    swept = []
    for path in sorted(folder.glob(".*")) if folder.is_dir() and not folder.is_symlink() else ():
        if path.name.startswith(OLD_PREFIX):
            original = folder / path.name[len(OLD_PREFIX):].rpartition("-")[0]
            if (not path.is_symlink() and path.is_dir() and _JOB_ID.fullmatch(original.name)
                    and not original.exists() and not original.is_symlink()):
                os.replace(path, original)
                swept.append(path.name)
                continue
        elif not path.name.startswith(STAGING_PREFIX):
            continue
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
        swept.append(path.name)
    if swept:
        fsync_directory(folder)
    return swept


def remove_published(folder: str | Path) -> None:
    """Delete a published checkpoint folder (retention), in the bucket too."""
    bucket.remove_folder(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _history_entry(line: str) -> dict[str, int | float]:
    """One line of history.jsonl: numbers by name, with the epoch; ValueError if not."""
    entry = _HISTORY_ENTRY.validate_json(line)
    if type(entry.get("epoch")) is not int:
        raise ValueError("an entry without its epoch")
    return entry


def _unfenced() -> None:
    """No lease to check: a job this process does not drive."""


class Storage:
    """Job folders under one root."""

    def __init__(self, root: Path):
        self.root = bucket.own(root)  # a mirror of a bucket named by another process: this process's own
        # Called with every record written (a Ray job's driver prints it for the client).
        self.on_write: Callable[[JobRecord], None] | None = None
        # Writes from more than one thread (a driver's callbacks and its signal handling) land in order.
        self._write_lock = threading.Lock()
        # Per job, checked before each record or history write: its driver's lease (storage.lease.Fence.check).
        self.fences: dict[str, Callable[[], None]] = {}

    @property
    def where(self) -> str:
        """The storage as people name it: its path, or its bucket's `s3://` place."""
        place = bucket.locate(self.root)
        return place.uri if place else str(self.root)

    def check_writable(self) -> None:
        place = bucket.locate(self.root)
        if place is not None:
            probe = place.child(f".probe-{secrets.token_hex(4)}")
            try:
                bucket.bucket().put(probe, b"")
                bucket.bucket().delete(probe)
            except (OSError, StorageError) as exc:
                raise StorageError(f"storage {place.uri} is not writable: {exc}") from None
            return
        # A root that does not exist yet is made by the first job, not by a check:
        # a folder made and removed in its nearest existing folder stands for it.
        # A link there counts, dangling or not: the job cannot make a folder in its place.
        existing = self.root
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        try:
            if existing != self.root:
                if not stat.S_ISDIR(os.stat(existing).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
                return
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
        place = bucket.locate(path)
        if place is not None and bucket.bucket().listing(place):
            raise StorageError(f"job '{job_id}' already exists in {place.uri}")
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

    def sweep_staging(self, job_id: str) -> list[str]:
        """Remove the staging folders crashed drivers and workers left in the
        job's folder and its checkpoints, and put back a checkpoint or model
        a crash left set aside mid-publish. Only for the job's one owner,
        when it (re)starts: a live writer's staging folder would go too."""
        job_dir = self.job_dir(job_id)
        if job_dir.is_symlink():
            raise StorageError(f"the folder of job '{job_id}' ({job_dir}) is a symlink: refused")
        try:
            return (sweep_folder(job_dir) + sweep_folder(job_dir / "checkpoints")
                    + bucket.sweep_folders(job_dir) + bucket.sweep_folders(job_dir / "checkpoints"))
        except OSError as exc:
            raise StorageWriteError.of(job_dir, exc) from exc

    def write_record(self, record: JobRecord) -> None:
        """Write the record atomically (without its history, which
        `append_history` keeps) and announce it to `on_write`."""
        with self._write_lock:  # serialised inside the lock: writes land in the order of their contents
            self.fences.get(record.job_id, _unfenced)()
            job_dir = self.job_dir(record.job_id)
            atomic_write_text(job_dir / RECORD_FILE, record.stored(job_dir))
            bucket.push_tree(self.tensorboard_dir(record.job_id))  # event files, at each record write
        if self.on_write is not None:
            self.on_write(record)

    def read_record(self, job_id: str, history: bool = False) -> JobRecord:
        """The job's record; with `history`, its per-epoch history too
        (`list` and `status` need only the record). StorageError, one line,
        for a record that is missing, unreadable, or names a path outside
        its job folder."""
        path = self.job_dir(job_id) / RECORD_FILE
        self.pull_job(job_id)
        try:
            record = JobRecord.from_stored(read_stored_text(path, RECORD_LIMIT, f"the record of job '{job_id}'"), path)
        except FileNotFoundError:
            raise StorageError(f"no job '{job_id}' in {self.where}") from None
        except OSError as exc:
            raise StorageError(f"cannot read the record of job '{job_id}': {exc.strerror or exc}") from None
        if record.history and not record.metrics:  # a record from before history.jsonl held its history
            record.metrics = record.history[-1]
        if history:
            record.history = self.read_history(job_id) or record.history
        return record

    def append_history(self, job_id: str, entry: dict) -> None:
        """Add one epoch's line to the history: a constant cost per epoch,
        whatever the job's length."""
        self.fences.get(job_id, _unfenced)()
        path = self.job_dir(job_id) / HISTORY_FILE
        line = json.dumps(entry, allow_nan=True) + "\n"
        try:
            with open(path, "a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise StorageWriteError.of(path, exc) from exc
        bucket.push_file(path)

    def rewrite_history(self, job_id: str, entries: list[dict]) -> None:
        """Replace the history (a restart or resume cuts it back to its checkpoint)."""
        text = "".join(json.dumps(entry, allow_nan=True) + "\n" for entry in entries)
        self.fences.get(job_id, _unfenced)()
        atomic_write_text(self.job_dir(job_id) / HISTORY_FILE, text)

    def read_history(self, job_id: str) -> list[dict]:
        """Every epoch's entry, oldest first; a last line cut short by a
        crash mid-append is left out."""
        path = bucket.pull_file(self.job_dir(job_id) / HISTORY_FILE)
        try:
            text = read_stored_text(path, HISTORY_LIMIT, f"the history of job '{job_id}'")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read the history of job '{job_id}': {exc.strerror or exc}") from None
        lines = text.splitlines()
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(_history_entry(line))
            except ValueError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    break  # cut short by a crash mid-append
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise StorageError(f"the history of job '{job_id}' ({path}) is unreadable at line {number}: "
                                   f"{first}") from None
        return entries

    def records(self) -> list[JobRecord]:
        """Every job in the storage, newest first."""
        for job_id in bucket.job_names(self.root):
            if _JOB_ID.fullmatch(job_id):  # a key the bucket lists is input: `..` is no job
                bucket.pull_file(self.root / job_id / RECORD_FILE)
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob(f"*/{RECORD_FILE}"):
            try:
                found.append(JobRecord.from_stored(read_stored_text(path, RECORD_LIMIT, "a record"), path))
            except (OSError, StorageError):
                continue  # not a job `list` can show; `status` of it says why
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def pull_job(self, job_id: str) -> None:
        """On a bucket: this process's mirror of the job made like the
        bucket's (record, history, checkpoints, final model); TensorBoard's
        files and Ray's are left to those who read them."""
        job_dir = self.job_dir(job_id)
        if bucket.locate(job_dir) is None:
            return
        bucket.pull_file(job_dir / RECORD_FILE)
        bucket.pull_file(job_dir / HISTORY_FILE)
        names = bucket.bucket().listing(bucket.locate(job_dir / "checkpoints"))
        published = {name.split("/")[0] for name in names if name.endswith(f"/{bucket.MANIFEST_FILE}")}
        local = job_dir / "checkpoints"
        for folder in local.glob("epoch-*") if local.is_dir() else ():
            if folder.name not in published and (folder / bucket.MANIFEST_FILE).is_file():
                shutil.rmtree(folder, ignore_errors=True)  # deleted in the bucket (retention)
        for name in sorted(published):
            if _CHECKPOINT_NAME.fullmatch(name):
                bucket.pull_folder(local / name)
        bucket.pull_folder(self.model_dir(job_id))

    @staticmethod
    def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
        """The driver's callback state saved with a checkpoint: {"epoch": int,
        "callbacks": {name: state}}; StorageError if the file is not that."""
        path = bucket.pull_folder(checkpoint) / CHECKPOINT_STATE_FILE
        try:
            state = json.loads(read_stored_text(path, STATE_LIMIT, "a checkpoint's state"))
        except (OSError, ValueError) as exc:
            raise StorageError(f"the checkpoint state {path} is unreadable: {exc.strerror or exc}"
                               if isinstance(exc, OSError) else f"the checkpoint state {path} is not JSON") from None
        if (not isinstance(state, dict) or type(state.get("epoch")) is not int
                or not isinstance(state.get("callbacks"), dict)
                or not all(isinstance(value, dict) for value in state["callbacks"].values())):
            raise StorageError(f"the checkpoint state {path} is not a state file: "
                               'expected {"epoch": <int>, "callbacks": {<name>: {...}}}')
        return state
