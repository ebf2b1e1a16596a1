"""One copy of a job's prepared arrays per node, however many workers it runs.

Each worker of a job would otherwise prepare the whole arrays and hold them.
Instead the first worker on a node to get here prepares them and writes
them as `.npy` files into a private folder of this node; every worker (the
first too) memory-maps the files, so one copy in the page cache serves
them all, and TensorFlow reads it in place (`data.host_tensor`: the maps
are copy-on-write, which TensorFlow can wrap without a copy, and nothing
writes to them).

    <tmp>/orchestra-arrays-<uid>/<key>/x_train.npy …   the arrays of one key
    <tmp>/orchestra-arrays-<uid>/<key>.lock             held by every process using them
    <tmp>/orchestra-arrays-<uid>/<key>.make             one maker at a time

The key hashes the data spec (its validation choice too), the identity
(path, size, modification time, inode) of the source file and of the
validation file, and the boot, so a different spec, a changed
file or a file half-written before a crash is never read. Every process
that maps a set holds its `.lock` shared for the rest of its life; a set
whose `.lock` nobody holds any more (its job ended, or was killed: the
kernel drops a dead process's locks) is deleted by the next process that
opens a set on this node, which takes that `.lock` exclusively to do it.

`ShardCache` keeps the same kind of per-node copy of shard files read from
a bucket (`data.shards.path: s3://...`), one folder a manifest, with the
same use locks and sweep:

    <tmp>/orchestra-shards-<uid>/<key>/<sha256>         one shard file, named by its checksum
    <tmp>/orchestra-shards-<uid>/<key>/<sha256>.lock    held while it is downloaded
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from orchestra.build.data import Arrays, prepare, resolve_validation
from orchestra.errors import StorageError
from orchestra.spec import DataSpec
from orchestra.storage.bucket import MIRROR_ENV

NAMES = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
LOCK_SUFFIX = ".lock"
MAKE_SUFFIX = ".make"
FORMAT = 2  # 2: the validation-is-test marker
KEY_LENGTH = 32
SAME_AS_TEST = "validation-is-test"  # marker: x_val, y_val are x_test, y_test

# key → the descriptor of its `.lock`, held shared for the life of this process.
_held: dict[str, int] = {}


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / f"orchestra-arrays-{os.getuid()}"


def node_arrays(spec: DataSpec, npz_path: Path | None, directory: Path, root: Path | None = None) -> Arrays:
    """`prepare(spec, npz_path, directory)`, memory-mapped from this node's
    one copy, made now if no process on the node has made it yet.

    Raises OSError when the folder cannot be used (not this user's own, a
    full disk): the caller can still prepare the arrays in its own memory.

        node_arrays(spec.data, npz, datasets).x_train.filename
        # PosixPath('/tmp/orchestra-arrays-1000/5f0c…/x_train.npy')
    """
    root = _private_folder(root or default_root())
    key = cache_key(spec, npz_path)
    _sweep(root, keep=key)
    if key not in _held:
        _held[key] = _use_lock(root, key)
    making = os.open(root / f"{key}{MAKE_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(making, fcntl.LOCK_EX)  # one maker at a time
        entry = root / key
        arrays = _mapped(entry)
        if arrays is None:
            _write(entry, prepare(spec, npz_path, directory))
            arrays = _mapped(entry)
        if arrays is None:
            raise OSError(errno.EIO, f"the arrays just written to {entry} do not read back")
        return arrays
    finally:
        os.close(making)


def cache_key(spec: DataSpec, npz_path: Path | None) -> str:
    """Names one set of prepared arrays: the same key, the same arrays."""
    source = {"keras": spec.source} if npz_path is None else _identity(npz_path)
    validation = resolve_validation(spec)
    text = json.dumps({"format": FORMAT, "boot": _boot_id(), "data": spec.model_dump(mode="json"),
                       "source": source, "validation": validation and _identity(validation)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def _identity(path: Path) -> dict:
    """What tells one version of a file from another."""
    found = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": found.st_size, "mtime_ns": found.st_mtime_ns,
            "inode": found.st_ino}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _private_folder(root: Path) -> Path:
    """`root`, made if missing; only this user may have written into it."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = os.lstat(root)
    if not os.path.isdir(root) or os.path.islink(root) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise PermissionError(errno.EACCES, "not a folder that only this user can write to", str(root))
    return root


def _use_lock(root: Path, key: str) -> int:
    """The descriptor of `key`'s use lock, held shared."""
    path = root / f"{key}{LOCK_SUFFIX}"
    while True:
        lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock, fcntl.LOCK_SH)
        if _is_current(lock, path):
            return lock
        os.close(lock)  # a sweep deleted the file while we waited for it: lock the new one


def _is_current(lock: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(lock).st_ino
    except FileNotFoundError:
        return False


def _mapped(entry: Path) -> Arrays | None:
    """The arrays of `entry`, memory-mapped copy-on-write, or None (and
    the entry deleted) when it is missing or does not read as arrays."""
    if not entry.is_dir():
        return None
    try:
        arrays = Arrays(**{name: np.load(entry / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                           if (entry / f"{name}.npy").exists() else None for name in NAMES})
        if (entry / SAME_AS_TEST).exists():
            arrays.x_val, arrays.y_val = arrays.x_test, arrays.y_test
    except (OSError, ValueError):
        arrays = None
    if arrays is None or not _complete(arrays):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return arrays


def _complete(arrays: Arrays) -> bool:
    pairs = [(arrays.x_train, arrays.y_train), (arrays.x_val, arrays.y_val), (arrays.x_test, arrays.y_test)]
    return arrays.x_train is not None and all((x is None) == (y is None) and (x is None or len(x) == len(y))
                                              for x, y in pairs)


def _write(entry: Path, arrays: Arrays) -> None:
    """Write the arrays beside `entry`, then rename them into place: a
    reader sees all of them or none."""
    for stale in entry.parent.glob(f".{entry.name}.*"):  # a maker that died: the make lock is ours now
        shutil.rmtree(stale, ignore_errors=True)
    staging = entry.with_name(f".{entry.name}.{os.getpid()}")
    staging.mkdir(mode=0o700)
    try:
        same = arrays.x_val is not None and arrays.x_val is arrays.x_test and arrays.y_val is arrays.y_test
        for name in NAMES:
            array = getattr(arrays, name)
            if array is not None and not (same and name in ("x_val", "y_val")):
                np.save(staging / f"{name}.npy", array, allow_pickle=False)
        if same:  # validation on the test arrays: one copy of them on disk and in the page cache
            (staging / SAME_AS_TEST).touch()
        os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sweep(root: Path, keep: str) -> None:
    """Delete every set of arrays under `root` but `keep` that no process holds."""
    keys = {path.name.lstrip(".").split(".")[0] for path in root.iterdir()}
    for key in sorted(keys - {keep}):
        if len(key) != KEY_LENGTH or key.strip("0123456789abcdef"):
            continue  # not ours
        path = root / f"{key}{LOCK_SUFFIX}"
        try:
            lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)  # in use
            continue
        try:
            if _is_current(lock, path):
                shutil.rmtree(root / key, ignore_errors=True)
                for staging in root.glob(f".{key}.*"):
                    shutil.rmtree(staging, ignore_errors=True)
                (root / f"{key}{MAKE_SUFFIX}").unlink(missing_ok=True)  # a maker holds the use lock first
                path.unlink()
        finally:
            os.close(lock)


# Shard files downloaded from a bucket.

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_shard_root() -> Path:
    """Beside the bucket mirrors: `$ORCHESTRA_S3_CACHE`, else the temporary
    folder. OSError when `$ORCHESTRA_S3_CACHE` is not an absolute path."""
    parent = Path(os.environ.get(MIRROR_ENV) or tempfile.gettempdir())
    if not parent.is_absolute():  # each process would have its own cache, below its working folder
        raise OSError(errno.EINVAL, f"{MIRROR_ENV} must be an absolute path", str(parent))
    return parent / f"orchestra-shards-{os.getuid()}"


class _Hashing:
    """A binary file that hashes and counts what is written to it, and
    refuses to take more than `limit` bytes (StorageError naming `name`)."""

    def __init__(self, out: BinaryIO, limit: int, name: str):
        self.out, self.digest, self.size, self.limit, self.name = out, hashlib.sha256(), 0, limit, name

    def write(self, data) -> int:
        self.size += len(data)
        if self.size > self.limit:  # stop now: an object grown in the bucket must not fill the node's disk
            raise StorageError(f"the shard {self.name[:200]} does not match the manifest (more than its "
                               f"{self.limit} bytes): it was changed or damaged")
        self.digest.update(data)
        return self.out.write(data)


class ShardCache:
    """This node's copy of the shard files of one manifest, each downloaded
    once, on first use, by whichever process of the node needs it first.

    A file is written beside its place, fsynced, checked against the size
    and SHA-256 the manifest gives, and renamed into place: a file in the
    cache is always whole and verified. Its name is its checksum, so no
    name from the manifest becomes a path. The folders must be this user's
    alone (else PermissionError); what is found at a file's place is used
    only when it is a regular file of this user of the manifest's size (a
    symlink, FIFO or folder there is replaced by a download), and a
    download stops at the first byte past the manifest's size. Opening a
    cache deletes the caches of other manifests that no process of the
    node still uses.

    Args:
        key: names the manifest (a hash of its place and bytes), 32 hex digits.
        root: the node's folder of caches (default `default_shard_root()`).

    Example:

        >>> cache = ShardCache("0" * 32)   # doctest: +SKIP
        >>> path, downloaded = cache.fetch(sha256, size, "train-00000.tfrecord",
        ...                                lambda out: bucket().copy_to(place, out))
    """

    def __init__(self, key: str, root: Path | None = None):
        if len(key) != KEY_LENGTH or key.strip("0123456789abcdef"):
            raise ValueError(f"not a cache key: {key!r}")
        self.root = _private_folder(root or default_shard_root())
        _sweep(self.root, keep=key)
        if key not in _held:
            _held[key] = _use_lock(self.root, key)
        self.folder = self.root / key
        self.folder.mkdir(mode=0o700, exist_ok=True)
        _private_folder(self.folder)

    def fetch(self, sha256: str, size: int, name: str, write: Callable[[BinaryIO], None]) -> tuple[Path, bool]:
        """(the local file holding `name`, whether this call downloaded it):
        `write(out)` writes its bytes when the node has no copy yet.
        StorageError naming `name` when what was written is not what the
        manifest says."""
        if not SHA256.fullmatch(sha256):
            raise StorageError(f"the shard {name[:200]} has no valid SHA-256 in the manifest")
        final = self.folder / sha256
        lock = os.open(self.folder / f"{sha256}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download a file on this node; the others wait for it
            if _verified(final, size):
                return final, False
            _remove(final)  # not a file this cache wrote (a symlink, a FIFO, a folder): replaced by one
            staging = self.folder / f".{sha256}.{os.getpid()}"
            _remove(staging)  # a download of a process (of this pid) that died
            try:
                with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600),
                               "wb") as out:
                    hashing = _Hashing(out, size, name)
                    write(hashing)
                    out.flush()
                    os.fsync(out.fileno())
                if hashing.size != size or hashing.digest.hexdigest() != sha256:
                    raise StorageError(f"the shard {name[:200]} does not match the manifest ({hashing.size} bytes, "
                                       f"{size} expected, or another SHA-256): it was changed or damaged")
                os.rename(staging, final)
            finally:
                staging.unlink(missing_ok=True)
            return final, True
        finally:
            os.close(lock)


def _verified(path: Path, size: int) -> bool:
    """Whether `path` is a file this cache renamed into place: a regular
    file of this user, not a symlink, of the manifest's size."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid() and found.st_size == size


def _remove(path: Path) -> None:
    """Whatever is at `path` gone (a folder with what it holds; a symlink, not what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
