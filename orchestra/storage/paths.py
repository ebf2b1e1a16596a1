"""Paths in storage are data: names relative to the job folder.

Anyone who can write to the shared storage can edit a record or a
checkpoint's state file, so a path read from one is input like any other.
Records and state files hold names relative to their job folder
(`checkpoints/epoch-0007`, `model`); a name read back is resolved against
the job folder and refused (StorageError) if it leaves the folder or passes
through a symlink on the way. Files read from storage are read only when
they are regular files of a bounded size: a FIFO, a device or a symlink in
place of a record is refused, not waited on.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from orchestra.errors import StorageError


def stored_name(job_dir: Path, path: str | os.PathLike | None) -> str | None:
    """`path` as a record or state file holds it: relative to `job_dir`.
    A name already relative is kept (normalised); an absolute path outside
    the job folder is a StorageError (no job writes one)."""
    if path is None:
        return None
    return str(PurePosixPath(*_inside(job_dir, str(path), "a path to store")))


def resolve_stored(job_dir: Path, name: str, field: str) -> Path:
    """A name read from `job_dir`'s record or state file, as a path inside
    the job folder. An absolute path inside the folder (records written
    before names were relative) is accepted; one that leaves the folder, or
    passes through a symlink below the storage root, is a StorageError
    naming `field`."""
    parts = _inside(job_dir, name, field)
    for depth in range(len(parts) + 1):
        current = job_dir.joinpath(*parts[:depth])
        if current.is_symlink():
            raise StorageError(f"job '{job_dir.name}': {field} {_shown(name)} passes through the symlink "
                               f"{current}: paths in storage must stay inside the job folder")
    return job_dir.joinpath(*parts)


def _inside(job_dir: Path, name: str, field: str) -> tuple[str, ...]:
    """The parts of `name` below `job_dir`, or StorageError."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise StorageError(f"job '{job_dir.name}': {field} {_shown(name)} is not a path")
    path = Path(os.path.normpath(name))
    if path.is_absolute():
        try:
            path = path.relative_to(os.path.normpath(job_dir))
        except ValueError:
            raise StorageError(f"job '{job_dir.name}': {field} {_shown(name)} is outside the job folder "
                               f"{job_dir}: refused") from None
    parts = tuple(part for part in path.parts if part != ".")
    if not parts or parts[0] == "..":
        raise StorageError(f"job '{job_dir.name}': {field} {_shown(name)} is not inside the job folder "
                           f"{job_dir}: refused")
    return parts


def _shown(name: object) -> str:
    return repr(name if not isinstance(name, str) else name[:200])


def read_stored_text(path: Path, limit: int, what: str) -> str:
    """The text of a file in storage: a regular file (not a symlink, FIFO,
    device or folder) of at most `limit` bytes, in UTF-8. FileNotFoundError
    and other OSErrors pass through; anything else that is wrong is a
    StorageError naming `what` and the file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if path.is_symlink():
            raise StorageError(f"{what} ({path}) is a symlink: refused") from None
        raise exc from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{what} ({path}) is not a regular file")
        if info.st_size > limit:
            raise StorageError(f"{what} ({path}) is {info.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise StorageError(f"{what} ({path}) is more than the {limit} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"{what} ({path}) is not UTF-8 text (byte {exc.start})") from None
