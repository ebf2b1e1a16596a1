"""One owner per job: the driver's lease on its job folder.

    <job>/lease.lock   an OS lock held by the job's driver for its life (never replaced, never removed)
    <job>/lease.json   the owner: generation, host, machine, pid, process start (replaced atomically)
    <job>/stop.json    a stop request for one generation (`orchestra cancel`), which its driver polls

A driver takes the lock without waiting or does not run (`LeaseHeld`:
"job X is owned by a live driver on HOST, pid N"), and then bumps the
generation in `lease.json`. The lock is an open file description lock
(Linux's `F_OFD_SETLK`): a POSIX byte-range lock, so NFS (v4 in its
protocol, v3 through NLM) enforces it between hosts, owned by the open file
rather than the process, so a probe of the lease from inside the driver's
own process (a status read) neither releases nor misses it; the kernel
releases it when the driver's process ends, however it ends.

If a storage ever breaks the lock (an NFS client cut off past its lease
time, a lock file removed by hand), the generation still fences the old
owner: every record write, checkpoint publication and deletion first checks
that `lease.json` still names its generation (`Fence.check`), and the
driver's heartbeat stops it when it does not.

Liveness from anywhere: a held lock is a live driver (`probe`), whichever
host it runs on and whatever its clock says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import struct
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from orchestra.errors import JobStateError, StorageError
from orchestra.storage import bucket
from orchestra.storage.folders import atomic_write_text
from orchestra.storage.paths import read_stored_text

LOCK_FILE = "lease.lock"
OWNER_FILE = "lease.json"
STOP_FILE = "stop.json"
RETRY_SECONDS = 0.2  # before a second read of an unreadable lease.json
OWNER_WAIT_SECONDS = 2.0  # how long a refusal waits for a holder that has just locked to write its name
EXIT_LEASE_LOST = 1  # the driver's "failed or stopped": its job goes on under the new owner
SMALL_FILE_LIMIT = 1 << 20  # lease.json, stop.json and heartbeat.json are a few hundred bytes

_HELD: dict[str, Lease] = {}  # this process's leases by job folder, open until released
_OFD = hasattr(fcntl, "F_OFD_SETLK")  # Linux 3.15+; elsewhere a process-wide lockf, and no probe
_NOT_SUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class LeaseHeld(JobStateError):
    """Another live driver owns the job."""


class LeaseLost(JobStateError):
    """This driver's lease was taken over: it must stop without writing."""

    exit_code = EXIT_LEASE_LOST


class Liveness(Enum):
    HELD = "held"  # a live process holds the lock
    FREE = "free"  # nobody does: the last owner has ended
    UNKNOWN = "unknown"  # no lock file (a job from before leases), or this mount cannot tell


def this_machine() -> str:
    """This kernel's boot and pid namespace: two hosts (or containers) sharing a hostname differ here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{boot}/{namespace}"


def start_ticks(pid: int | str = "self") -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux's /proc),
    or None: a pid with a start time names one process, never a reused id."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Process:
    """One process on one machine: with its start time, a pid that the
    system has since given to another process is told apart."""

    host: str
    pid: int
    machine: str = ""  # `this_machine` where it ran ("" unknown)
    started: int | None = None  # `start_ticks` of the process

    @classmethod
    def this_process(cls) -> Process:
        return cls(socket.gethostname(), os.getpid(), this_machine(), start_ticks())

    @classmethod
    def from_json(cls, text: str) -> Process:
        """As `to_json` wrote it; ValueError (or TypeError, KeyError) if it is not."""
        data = json.loads(text)
        started = data.get("started")
        return cls(host=str(data["host"]), pid=int(data["pid"]), machine=str(data.get("machine", "")),
                   started=None if started is None else int(started))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def runs_here(self) -> bool:
        """Whether this very process runs on this machine now: host, machine and start time all agree."""
        return (self.host == socket.gethostname() and self.machine == this_machine()
                and self.started is not None and start_ticks(self.pid) == self.started)


@dataclass(frozen=True)
class Owner(Process):
    """Who holds (or last held) a job's lease, and its generation."""

    generation: int = 0

    @classmethod
    def taking(cls, generation: int) -> Owner:
        return cls(**asdict(Process.this_process()), generation=generation)


def read_owner(job_dir: Path) -> Owner | None:
    """The lease's owner as `lease.json` says (None: none yet, or unreadable, which counts as no owner)."""
    try:
        text = read_stored_text(bucket.pull_file(job_dir / OWNER_FILE), SMALL_FILE_LIMIT,
                                "the lease's owner")  # never a FIFO
        return Owner(**asdict(Process.from_json(text)), generation=int(json.loads(text)["generation"]))
    except (OSError, StorageError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _flock(lock_type: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len (0: the whole file), l_pid (0, as OFD locks require)
    return struct.pack("hhqqi", lock_type, os.SEEK_SET, 0, 0, 0).ljust(32, b"\0")


def probe(job_dir: Path) -> Liveness:
    """Whether a live process holds the job's lease, asked of the storage's
    lock manager without taking the lock (so a probe never gets in an
    owner's way). Never a clock."""
    if not _OFD:
        return Liveness.UNKNOWN
    try:
        fd = os.open(bucket.node_path(job_dir / LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO: not waited on
    except OSError:
        return Liveness.UNKNOWN
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # not a lock file any driver made
            return Liveness.UNKNOWN
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    except OSError:
        return Liveness.UNKNOWN
    finally:
        os.close(fd)
    return Liveness.FREE if struct.unpack_from("h", answer)[0] == fcntl.F_UNLCK else Liveness.HELD


@dataclass(frozen=True)
class Fence:
    """A generation of a job's lease, checked before a write that only its
    owner may make: the driver's record writes and deletions, the chief
    worker's checkpoint publications (it cannot hold the driver's lock, and
    is given this instead, in `WorkerConfig`).

    Example:

        >>> import tempfile
        >>> job = Path(tempfile.mkdtemp())
        >>> lease = Lease.acquire(job, "job-1")
        >>> lease.fence.check()  # still the owner
        >>> lease.release()
    """

    job_dir: str
    job_id: str
    generation: int

    def check(self) -> None:
        """LeaseLost unless `lease.json` still names this generation. A file
        that cannot be read is read once more: one transient error of a
        network mount (EIO, ESTALE) must not stop a healthy job."""
        owner = read_owner(Path(self.job_dir))
        if owner is None:
            time.sleep(RETRY_SECONDS)
            owner = read_owner(Path(self.job_dir))
        if owner is None or owner.generation != self.generation:
            taker = (f"generation {owner.generation}, a driver on {owner.host}, pid {owner.pid}" if owner
                     else "its lease file is gone or unreadable")
            raise LeaseLost(f"job {self.job_id} was taken over ({taker}): this driver (generation "
                            f"{self.generation}) stops without writing more")


class Lease:
    """The exclusive lock on a job folder, held by its driver for its life
    (`acquire`, then `release` or the process's end).

    Args:
        job_dir: the job's folder.
        job_id: the job's id, for messages.
        fd: the open lock file, locked.
        owner: this process as the lease's owner, with its generation.
    """

    def __init__(self, job_dir: Path, job_id: str, fd: int, owner: Owner):
        self.job_dir = job_dir
        self.job_id = job_id
        self.owner = owner
        self.fence = Fence(str(job_dir), job_id, owner.generation)
        self._fd: int | None = fd

    @property
    def generation(self) -> int:
        return self.owner.generation

    @classmethod
    def acquire(cls, job_dir: Path, job_id: str, generation_at_least: int = 0) -> Lease:
        """Lock the job's lease without waiting and become its owner with the
        next generation (above the last owner's and `generation_at_least`,
        the record's). LeaseHeld if a live driver holds it; StorageError if
        the storage has no locks to give."""
        path = bucket.node_path(job_dir / LOCK_FILE)  # on a bucket: one lock per node (see storage.bucket)
        before = read_owner(job_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            raise StorageError(f"cannot open the lease of job {job_id} ({path}): {exc.strerror or exc}") from None
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise owned_elsewhere(job_dir, job_id, before) from None
            if exc.errno in _NOT_SUPPORTED:
                raise StorageError(f"the storage of job {job_id} ({job_dir}) does not support POSIX locks "
                                   f"({exc.strerror}), which orchestra needs to keep one driver per job: "
                                   "mount it with locking (NFS: not 'nolock')") from None
            raise StorageError(f"cannot lock the lease of job {job_id} ({path}): {exc.strerror or exc}") from None
        try:
            owner = _next_owner(job_dir, job_id, generation_at_least)
        except BaseException:
            os.close(fd)
            raise
        lease = _HELD[str(job_dir)] = cls(job_dir, job_id, fd, owner)
        return lease

    def check(self) -> None:
        """LeaseLost if another driver has taken the job over (a newer generation)."""
        self.fence.check()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the lease go (the process's end does it too)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the locked file description releases its lock
            self._fd = None
        if _HELD.get(str(self.job_dir)) is self:
            del _HELD[str(self.job_dir)]


def _next_owner(job_dir: Path, job_id: str, generation_at_least: int) -> Owner:
    """Write this process into `lease.json` with the next generation. On a
    bucket, with conditional writes, only if `lease.json` is still what was
    read (If-Match its ETag; If-None-Match for the first owner): two drivers
    that locked on different nodes cannot both take the same generation;
    the one that loses is refused (LeaseHeld)."""
    place = bucket.locate(job_dir / OWNER_FILE)
    if place is None or not bucket.conditional_writes():
        last = read_owner(job_dir)
        owner = Owner.taking(max(last.generation if last else 0, generation_at_least) + 1)
        atomic_write_text(job_dir / OWNER_FILE, owner.to_json())
        return owner
    tagged = bucket.get_tagged(place, SMALL_FILE_LIMIT)
    try:
        last = int(json.loads(tagged[0])["generation"]) if tagged else 0
    except (ValueError, TypeError, KeyError):
        last = 0  # an unreadable lease.json counts as no owner, as read_owner has it
    owner = Owner.taking(max(last, generation_at_least) + 1)
    try:
        bucket.put_if(place, owner.to_json().encode(), tagged[1] if tagged else None)
    except bucket.WriteConflict:
        raise LeaseHeld(f"job {job_id}: another driver took its lease at the same moment "
                        f"(generation {owner.generation})") from None
    bucket.pull_file(job_dir / OWNER_FILE)
    return owner


def held(job_dir: Path) -> Lease | None:
    """The lease this process holds on the job folder, if any."""
    return _HELD.get(str(job_dir))


def owned_elsewhere(job_dir: Path, job_id: str, before: Owner | None = None) -> LeaseHeld:
    """The refusal for a job whose lease a live driver holds, naming it.
    `before`: the owner `lease.json` named before this process tried the
    lock; a holder that has just locked writes its name a moment later, so
    unless that one provably runs here, the new name is waited for (briefly)."""
    owner = read_owner(job_dir)
    deadline = time.monotonic() + OWNER_WAIT_SECONDS
    while (owner is None or owner == before) and time.monotonic() < deadline:
        if owner is not None and owner.runs_here():
            break
        time.sleep(0.02)
        owner = read_owner(job_dir)
    where = f"on {owner.host}, pid {owner.pid}" if owner else "(its lease is held)"
    return LeaseHeld(f"job {job_id} is owned by a live driver {where}")


def _lock(fd: int) -> None:
    if _OFD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def request_stop(job_dir: Path, generation: int) -> None:
    """Ask the job's driver of `generation` to stop, as Ctrl-C would (`orchestra cancel`)."""
    atomic_write_text(job_dir / STOP_FILE, json.dumps({
        "generation": generation, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}))


def stop_requested(job_dir: Path, generation: int) -> bool:
    """Whether a stop was asked of this generation of the job's driver."""
    try:
        text = read_stored_text(bucket.pull_file(job_dir / STOP_FILE), SMALL_FILE_LIMIT, "a stop request")
        return json.loads(text).get("generation") == generation
    except (OSError, StorageError, ValueError, AttributeError):
        return False


def clear_stop_request(job_dir: Path) -> None:
    """A new owner starts with no stop request (an old one was its predecessor's)."""
    try:
        (job_dir / STOP_FILE).unlink(missing_ok=True)
        bucket.remove_file(job_dir / STOP_FILE)
    except (OSError, StorageError):
        pass
