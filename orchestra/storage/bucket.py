"""Storage in an S3 bucket, behind the same folders as a shared mount.

A job's code reads and writes files in folders (`storage.folders`); on a
bucket (`s3://bucket/prefix`) those folders are a *mirror*: a node-local
folder private to each process, `<tmp>/orchestra-s3-XXXX/s3@<bucket>/<prefix>`,
which the process fills from the bucket before it reads and publishes to
the bucket as it writes. Nothing is shared between processes but the
bucket: a worker on another node gets the driver's paths, sees by their
`s3@<bucket>` part where in the bucket they are, and works in a mirror of
its own.

What the bucket holds, and how each thing is published so that a reader
never sees half of it:

    <prefix>/<job>/job.json, history.jsonl,       small files, put whole (an S3 put is atomic)
        heartbeat.json, lease.json, stop.json
    <prefix>/<job>/checkpoints/epoch-0007/         a folder (checkpoint, final model):
        .v-<version>/model.keras, state.json, ...    its files, uploaded first under a fresh version
        manifest.json                                 then the manifest naming the version and its files
    <prefix>/<job>/tensorboard/...                  event files, uploaded as they grow
    <prefix>/<job>/ray/...                          Ray Train's own run storage (its pyarrow filesystem)

A reader trusts only manifests: a version without one (a publisher killed
mid-upload) is never downloaded, and the job's next owner deletes it.

Credentials and endpoint are found as the AWS tools find them: the
environment (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), `~/.aws`, an instance
role; `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for an S3-compatible store.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from orchestra.errors import StorageError, StorageWriteError

SCHEME = "s3://"
MARK = "s3@"  # the path component of a mirror that names its bucket
MANIFEST_FILE = "manifest.json"
VERSION_PREFIX = ".v-"
MIRROR_ENV = "ORCHESTRA_S3_CACHE"  # where the per-process mirrors go (default: the temporary folder)
MANIFEST_LIMIT = 1 << 20
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_uri(raw: str) -> bool:
    return raw.startswith(SCHEME)


@dataclass(frozen=True)
class Place:
    """A key in a bucket (or a prefix: the 'folder' of the keys below it).

    Example:

        >>> parse_uri("s3://team-bucket/runs").child("job-1", "job.json").key
        'runs/job-1/job.json'
    """

    bucket: str
    key: str = ""

    def child(self, *parts: str) -> Place:
        return Place(self.bucket, "/".join(part for part in (self.key, *parts) if part))

    @property
    def path(self) -> str:
        """As pyarrow's S3FileSystem names it."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.path}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def parse_uri(raw: str, what: str = "storage") -> Place:
    """`s3://bucket/prefix` as a Place; StorageError naming `what` (the
    setting that gave it) and what is wrong."""
    rest = raw[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise StorageError(f"{what} '{raw}': '{bucket}' is not an S3 bucket name (3-63 lower-case letters, "
                           "digits, '.', '-'); expected s3://<bucket>/<prefix>")
    parts = [part for part in prefix.split("/") if part]
    if any(part in (".", "..") or "\0" in part or part.startswith(MARK) for part in parts):
        raise StorageError(f"{what} '{raw}': the prefix may not hold '.', '..' or '{MARK}' parts")
    return Place(bucket, "/".join(parts))


# Mirrors: one node-local folder per process.

_mirror_base: Path | None = None
_mirror_lock = threading.RLock()


def mirror_base() -> Path:
    """This process's own mirror folder (made on first use, removed at its exit)."""
    global _mirror_base
    with _mirror_lock:
        if _mirror_base is None or not _mirror_base.is_dir():
            parent = Path(os.environ.get(MIRROR_ENV) or tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            _sweep_mirrors(parent)
            _mirror_base = Path(tempfile.mkdtemp(prefix=f"orchestra-s3-{os.getpid()}-", dir=parent))
            atexit.register(shutil.rmtree, _mirror_base, True)
        return _mirror_base


def _sweep_mirrors(parent: Path) -> None:
    """Remove the mirrors of this user's processes that have ended without
    removing theirs (Ray ends its workers without running exit handlers)."""
    for path in parent.glob("orchestra-s3-*-*"):
        pid = path.name.split("-")[2]
        if not pid.isdigit() or path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OSError, OverflowError):
            continue


def mirror_path(place: Place) -> Path:
    """Where `place` is in this process's mirror."""
    return mirror_base().joinpath(f"{MARK}{place.bucket}", *place.key.split("/") if place.key else ())


def locate(path: str | os.PathLike) -> Place | None:
    """The bucket place a mirror path (of any process) stands for; None for a path that is not in a mirror."""
    parts = Path(path).parts
    for index, part in enumerate(parts):
        if part.startswith(MARK) and _BUCKET_NAME.fullmatch(part[len(MARK):]):
            return Place(part[len(MARK):], "/".join(parts[index + 1:]))
    return None


def node_path(path: str | os.PathLike) -> Path:
    """For what must be one per machine rather than one per process (the
    lease's lock file, the pid files of drivers started here): `path` in a
    folder every process of this user on this node shares. A path not in a
    mirror is itself."""
    place = locate(path)
    if place is None:
        return Path(path)
    parent = Path(os.environ.get(MIRROR_ENV) or tempfile.gettempdir())
    return parent.joinpath(f"orchestra-s3-node-{os.getuid()}", f"{MARK}{place.bucket}",
                           *place.key.split("/") if place.key else ())


def own(path: str | os.PathLike) -> Path:
    """`path` in this process's mirror (a path not in a mirror is itself)."""
    place = locate(path)
    return Path(path) if place is None else mirror_path(place)


def _is_own(path: Path) -> bool:
    try:
        path.relative_to(mirror_base())
        return True
    except ValueError:
        return False


# The bucket itself, through pyarrow's S3 filesystem (installed with Ray).

class Bucket:
    """Whole-object reads and writes, listings and deletes, in any bucket
    the process's AWS credentials reach.

    Args:
        filesystem: a pyarrow S3FileSystem; by default one configured from
            the environment as the AWS tools are.

    Example (with credentials for a bucket `team-bucket`):

        >>> store = Bucket()  # doctest: +SKIP
        >>> note = parse_uri("s3://team-bucket/runs").child("note.txt")
        >>> store.put(note, b"hello")  # doctest: +SKIP
        >>> store.get(note, limit=100)  # doctest: +SKIP
        b'hello'
    """

    def __init__(self, filesystem=None):
        self.fs = filesystem if filesystem is not None else s3_filesystem()

    def put(self, place: Place, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(place.path) as out:
                out.write(data)
        except OSError as exc:
            raise _write_error(f"cannot write {place.uri}: {_first_line(exc)}", place) from None

    def get(self, place: Place, limit: int) -> bytes:
        """The object's bytes; FileNotFoundError if there is none; StorageError past `limit` bytes."""
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(place.path)
        except OSError as exc:
            raise StorageError(f"cannot read {place.uri}: {_first_line(exc)}") from None
        if info.type != fs.FileType.File:
            raise FileNotFoundError(place.uri)
        if info.size > limit:
            raise StorageError(f"{place.uri} is {info.size} bytes, more than the {limit} allowed")
        try:
            with self.fs.open_input_stream(place.path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "does not exist" in str(exc) or "NoSuchKey" in str(exc):
                raise FileNotFoundError(place.uri) from None
            raise StorageError(f"cannot read {place.uri}: {_first_line(exc)}") from None

    def listing(self, place: Place) -> dict[str, int]:
        """Every object below `place`: its key relative to `place`, and its size."""
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(place.path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"cannot list {place.uri}: {_first_line(exc)}") from None
        start = len(place.path) + 1
        return {info.path[start:]: info.size for info in infos if info.type == fs.FileType.File}

    def upload(self, local: Path, place: Place) -> None:
        try:
            with open(local, "rb") as source, self.fs.open_output_stream(place.path) as out:
                shutil.copyfileobj(source, out, 8 << 20)
        except OSError as exc:
            raise _write_error(f"cannot upload {local} to {place.uri}: {_first_line(exc)}", place) from None

    def download(self, place: Place, local: Path) -> None:
        """The object into `local`, whole or not at all (FileNotFoundError if it is gone)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                self.copy_to(place, out)
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def copy_to(self, place: Place, out) -> None:
        """The object's bytes written to the open binary file `out`, streamed
        (FileNotFoundError if it is gone; StorageError if it cannot be read)."""
        try:
            with self.fs.open_input_stream(place.path) as stream:
                shutil.copyfileobj(stream, out, 8 << 20)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or "does not exist" in str(exc) or "NoSuchKey" in str(exc):
                raise FileNotFoundError(place.uri) from None
            raise StorageError(f"cannot download {place.uri}: {_first_line(exc)}") from None

    def delete_tree(self, place: Place) -> None:
        """Every object below `place` (one call: no empty 'folder' marker is left for each)."""
        self._delete(self.fs.delete_dir, place)

    def delete(self, place: Place) -> None:
        self._delete(self.fs.delete_file, place)

    @staticmethod
    def _delete(how, place: Place) -> None:
        """`how(place.path)`; what is already gone is no error."""
        try:
            how(place.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "does not exist" not in str(exc):
                raise _write_error(f"cannot delete {place.uri}: {_first_line(exc)}", place) from None


def s3_filesystem():
    """pyarrow's S3FileSystem with the endpoint and region of the
    environment (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
    `AWS_REGION` / `AWS_DEFAULT_REGION`); credentials come from the AWS
    SDK's own chain (environment, `AWS_PROFILE` and ~/.aws, instance role)."""
    from pyarrow import fs

    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)


_bucket: Bucket | None = None


def bucket() -> Bucket:
    """This process's client of S3 (made on first use)."""
    global _bucket
    with _mirror_lock:
        if _bucket is None:
            _bucket = Bucket()
        return _bucket


def _write_error(message: str, place: Place) -> StorageWriteError:
    return StorageWriteError(errno.EIO, message, place.uri)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# Conditional writes (the lease's generation): S3's If-None-Match / If-Match.
# pyarrow's filesystem cannot send them; boto3 can (`pip install orchestra[s3]`).

class WriteConflict(Exception):
    """A conditional write lost: the object changed since it was read. Never
    shown to a user: the lease turns it into LeaseHeld."""


def conditional_writes() -> bool:
    """Whether this process can make conditional writes (boto3 is installed)."""
    import importlib.util

    return importlib.util.find_spec("boto3") is not None


_s3_client = None


def _client():
    global _s3_client
    with _mirror_lock:
        if _s3_client is None:
            import boto3  # reads AWS_ENDPOINT_URL(_S3), the region, the profile and the keys as the AWS CLI does

            _s3_client = boto3.client("s3")
        return _s3_client


def get_tagged(place: Place, limit: int) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None if there is none."""
    from botocore.exceptions import ClientError

    try:
        answer = _client().get_object(Bucket=place.bucket, Key=place.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise StorageError(f"cannot read {place.uri}: {_first_line(exc)}") from None
    if answer["ContentLength"] > limit:
        raise StorageError(f"{place.uri} is {answer['ContentLength']} bytes, more than the {limit} allowed")
    return answer["Body"].read(), answer["ETag"]


def put_if(place: Place, data: bytes, etag: str | None) -> str:
    """Put the object only if it is still as read: `etag` None means it
    must not exist yet (If-None-Match: *), else its ETag must be `etag`
    (If-Match). Returns the new ETag; WriteConflict if another writer came
    first."""
    from botocore.exceptions import ClientError

    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        return _client().put_object(Bucket=place.bucket, Key=place.key, Body=data, **condition)["ETag"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            raise WriteConflict(f"{place.uri} was changed by another writer") from None
        raise _write_error(f"cannot write {place.uri}: {_first_line(exc)}", place) from None


# Files: put whole, read whole.

def push_file(path: Path) -> None:
    """Publish a file just written in a mirror (no-op for a path outside one)."""
    place = locate(path)
    if place is not None:
        bucket().upload(path, place)


def pull_file(path: Path) -> Path:
    """`path`'s object into this process's mirror, or the local copy
    removed if the bucket has none. Returns the local path."""
    place = locate(path)
    if place is None:
        return Path(path)
    local = mirror_path(place)
    try:
        bucket().download(place, local)
    except FileNotFoundError:
        local.unlink(missing_ok=True)
    return local


def remove_file(path: Path) -> None:
    place = locate(path)
    if place is not None:
        bucket().delete(place)


# Folders: a version of files, then the manifest naming it.

def publish_folder(staging: Path, final: Path) -> None:
    """Upload the fully written local folder `staging` as the new content
    of `final`'s place: its files under a fresh version, then the manifest
    (the moment readers see it), then the older versions are deleted. The
    manifest is left in `staging` too: the local copy knows its version."""
    place = locate(final)
    if place is None:
        return
    version = f"{time.time_ns():x}-{secrets.token_hex(4)}"
    files = {}
    for file in sorted(staging.rglob("*")):
        if file.is_file() and not file.is_symlink():
            name = file.relative_to(staging).as_posix()
            if name == MANIFEST_FILE:
                continue
            bucket().upload(file, place.child(f"{VERSION_PREFIX}{version}", name))
            files[name] = file.stat().st_size
    manifest = {"version": version, "files": files, "published_at": time.time()}
    bucket().put(place.child(MANIFEST_FILE), json.dumps(manifest).encode())
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
    delete_versions(place, keep=version)


def delete_versions(place: Place, keep: str | None) -> list[str]:
    """Delete every version of the folder at `place` but `keep` (None: all).
    Returns the versions deleted."""
    gone = sorted({name.split("/", 1)[0] for name in bucket().listing(place)
                   if name.startswith(VERSION_PREFIX) and name.split("/", 1)[0][len(VERSION_PREFIX):] != keep})
    for head in gone:
        bucket().delete_tree(place.child(head))
    return gone


def read_manifest(place: Place) -> dict | None:
    """The folder's manifest, or None if it has none (not published, or
    half published). StorageError for one that is not a manifest."""
    try:
        raw = bucket().get(place.child(MANIFEST_FILE), MANIFEST_LIMIT)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
        version, files = manifest["version"], manifest["files"]
        if not (isinstance(version, str) and re.fullmatch(r"[0-9a-f-]{1,64}", version)
                and isinstance(files, dict)
                and all(isinstance(size, int) and _safe_name(name) for name, size in files.items())):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{place.child(MANIFEST_FILE).uri} is not a manifest: expected "
                           '{"version": <hex>, "files": {<relative name>: <size>}}') from None
    return manifest


def _safe_name(name: object) -> bool:
    """A file name a manifest may hold: relative, inside its folder, no hidden tricks."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and all(part not in (".", "..") for part in parts)


def pull_folder(path: str | os.PathLike, attempts: int = 3) -> Path:
    """The published folder at `path` (a mirror path of any process) in this
    process's mirror, as its manifest names it; a folder the bucket has no
    manifest for is absent locally. Returns the local path. A path not in a
    mirror is returned unchanged."""
    place = locate(path)
    if place is None:
        return Path(path)
    local = mirror_path(place)
    for attempt in range(attempts):
        manifest = read_manifest(place)
        if manifest is None:
            if (local / MANIFEST_FILE).is_file():  # deleted in the bucket since it was pulled
                shutil.rmtree(local, ignore_errors=True)
            return local
        if _local_manifest(local) == manifest["version"]:
            return local
        staging = local.parent / f".staging-pull-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            for name, size in manifest["files"].items():
                target = staging.joinpath(*PurePosixPath(name).parts)
                bucket().download(place.child(f"{VERSION_PREFIX}{manifest['version']}", name), target)
                if target.stat().st_size != size:
                    raise FileNotFoundError(name)  # replaced under us: read the new manifest
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
            old = local.parent / f".old-pull-{os.getpid()}-{secrets.token_hex(3)}"
            if local.exists():
                os.replace(local, old)
            os.replace(staging, local)
            shutil.rmtree(old, ignore_errors=True)
            return local
        except FileNotFoundError:
            shutil.rmtree(staging, ignore_errors=True)
            if attempt == attempts - 1:
                raise StorageError(f"{place.uri} kept changing while it was read; try again") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return local


def _local_manifest(local: Path) -> str | None:
    try:
        return json.loads((local / MANIFEST_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_folder(path: str | os.PathLike) -> None:
    """Unpublish a folder: its manifest first (readers stop seeing it), then its files."""
    place = locate(path)
    if place is None:
        return
    bucket().delete(place.child(MANIFEST_FILE))
    bucket().delete_tree(place)
    shutil.rmtree(mirror_path(place), ignore_errors=True)


def sweep_folders(parent: Path) -> list[str]:
    """For the job's next owner: delete the versions no manifest names in
    each folder below `parent` (what publishers killed mid-upload left).
    Returns what was deleted, as `<folder>/<version>`."""
    place = locate(parent)
    if place is None:
        return []
    folders: dict[str, set[str]] = {}
    for name in bucket().listing(place):
        head, _, rest = name.partition("/")
        if rest:
            folders.setdefault(head, set()).add(rest.split("/", 1)[0])
    swept = []
    for folder, entries in sorted(folders.items()):
        if not any(entry.startswith(VERSION_PREFIX) for entry in entries):
            continue
        manifest = read_manifest(place.child(folder))
        swept += [f"{folder}/{version}"
                  for version in delete_versions(place.child(folder), manifest["version"] if manifest else None)]
    return swept


# Trees that grow file by file (TensorBoard's event files).

class TreeSync:
    """Keeps a local folder and its place in the bucket alike, one way,
    copying only files whose size changed (event files only grow).

    Args:
        local: the folder in this process's mirror.
        place: its place in the bucket.

    Example (a job's TensorBoard folder, as `orchestra tensorboard` follows it):

        >>> sync = TreeSync.of(mirror_path(parse_uri("s3://team-bucket/runs/job-1/tensorboard")))
        >>> sync.pull()  # doctest: +SKIP
        3
    """

    def __init__(self, local: Path, place: Place):
        self.local = local
        self.place = place
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, path: str | os.PathLike) -> TreeSync | None:
        place = locate(path)
        return None if place is None else cls(mirror_path(place), place)

    def push(self) -> int:
        """Upload what grew locally; returns how many files."""
        with self._lock:
            count = 0
            for file in sorted(self.local.rglob("*")) if self.local.is_dir() else ():
                if not file.is_file() or file.is_symlink() or file.name.startswith("."):
                    continue
                name = file.relative_to(self.local).as_posix()
                size = file.stat().st_size
                if self._sizes.get(name) != size:
                    bucket().upload(file, self.place.child(name))
                    self._sizes[name] = size
                    count += 1
            return count

    def pull(self) -> int:
        """Download what grew in the bucket; returns how many files."""
        with self._lock:
            count = 0
            for name, size in bucket().listing(self.place).items():
                if not _safe_name(name) or any(part.startswith(".") for part in PurePosixPath(name).parts):
                    continue
                target = self.local.joinpath(*PurePosixPath(name).parts)
                if self._sizes.get(name) != size or not target.is_file():
                    try:
                        bucket().download(self.place.child(name), target)
                    except FileNotFoundError:
                        continue
                    self._sizes[name] = size
                    count += 1
            return count


_pushers: dict[str, TreeSync] = {}


def push_tree(path: Path) -> None:
    """Upload what grew in a mirror folder since the last push from this process."""
    place = locate(path)
    if place is None:
        return
    with _mirror_lock:
        sync = _pushers.setdefault(place.uri, TreeSync(mirror_path(place), place))
    sync.push()


# Jobs.

def job_names(root: Path) -> list[str]:
    """The folders under a mirrored storage root that hold a record in the
    bucket (keys are input: `.`, `..` and hidden names are no job's)."""
    place = locate(root)
    if place is None:
        return []
    return sorted({name.split("/", 1)[0] for name in bucket().listing(place)
                   if name.count("/") == 1 and name.endswith("/job.json") and not name.startswith(".")})


def ray_storage(job_dir: Path) -> dict:
    """Ray Train's RunConfig arguments for the job's run storage: in the
    bucket (with its filesystem) for a mirrored job, else the folder."""
    place = locate(job_dir)
    if place is None:
        return {"storage_path": str(job_dir / "ray")}
    return {"storage_path": place.child("ray").path, "storage_filesystem": bucket().fs}
