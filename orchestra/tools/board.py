"""Serve jobs' TensorBoard runs with TensorBoard's own server.

Each job is one group of runs named after it: `<job>` (hyperparameters and
text summaries), `<job>/train` and `<job>/validation`.

Jobs on an S3 bucket are served from a local mirror of their TensorBoard
folders, which `BoardMirror` keeps in sync while TensorBoard runs (event
files grow in the bucket as the job's driver uploads them).
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from orchestra.errors import BoardError, OrchestraError
from orchestra.storage import bucket
from orchestra.storage.folders import Storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006


WHOLE_STORAGE = "*"  # the key of a storage root served whole, new jobs included


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def next_free_port(host: str, after: int) -> int:
    for port in range(after + 1, min(after + 200, 65535)):
        if port_is_free(host, port):
            return port
    raise BoardError(f"no free port near {after} on {host}")


def job_logdirs(storage: Storage, job_ids: list[str], watch: bool = False) -> dict[str, Path]:
    """Each named job's TensorBoard folder (every job in storage if none is
    named); with `watch`, the storage root itself, so that TensorBoard finds
    jobs started later too (a long-running TensorBoard service)."""
    if watch:
        if job_ids:
            raise BoardError("--watch serves every job in the storage: name no jobs with it")
        storage.root.mkdir(parents=True, exist_ok=True)
        return {WHOLE_STORAGE: storage.root}
    if not job_ids:
        job_ids = [record.job_id for record in storage.records()]
        if not job_ids:
            raise BoardError(f"no jobs in {storage.where}")
    logdirs = {}
    for job_id in job_ids:
        storage.read_record(job_id)  # StorageError names an unknown job
        logdirs[job_id] = storage.tensorboard_dir(job_id)
    return logdirs


class BoardMirror:
    """The TensorBoard folders of jobs on a bucket, copied here and kept in
    sync (new and grown event files) every `interval` seconds from a
    background thread, as `det tensorboard` does. Folders not on a bucket
    are left alone.

    Args:
        logdirs: as `job_logdirs` returns them (paths in this process's mirror).
        interval: seconds between two syncs.

    Example:

        >>> mirror = BoardMirror({"job-1": Path("/mnt/jobs/job-1/tensorboard")}, 5.0)
        >>> mirror.sync()  # nothing on a bucket: nothing to copy
        0
    """

    def __init__(self, logdirs: dict[str, Path], interval: float):
        self.logdirs = {name: path for name, path in logdirs.items() if bucket.locate(path) is not None}
        self.interval = interval
        self._syncs: dict[str, bucket.TreeSync] = {}
        self._stop = threading.Event()
        self._warned = False

    def sync(self) -> int:
        """Copy what is new in the bucket; returns how many files."""
        copied = 0
        for name, path in self.logdirs.items():
            folders = ([path / job_id / "tensorboard" for job_id in bucket.job_names(path)]
                       if name == WHOLE_STORAGE else [path])
            for folder in folders:
                sync = self._syncs.setdefault(str(folder), bucket.TreeSync.of(folder))
                copied += sync.pull()
        return copied

    def start(self) -> None:
        if self.logdirs:
            threading.Thread(target=self._run, name="orchestra-board-mirror", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except (OSError, OrchestraError) as exc:  # the bucket out of reach for a while: try again later
                if not self._warned:
                    print(f"warning: cannot sync TensorBoard files from the bucket ({exc}); retrying",
                          file=sys.stderr)
                    self._warned = True


def serve(logdirs: dict[str, Path], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          reload_interval: float = 5.0):
    """Start TensorBoard's server in a background thread; return its URL.
    Jobs on a bucket are mirrored here first, then kept in sync."""
    from orchestra.keras_compat import tensorflow

    mirror = BoardMirror(logdirs, reload_interval)
    mirror.sync()
    mirror.start()

    tensorflow()  # imported quietly here, before TensorBoard imports it noisily
    from tensorboard import program

    board = program.TensorBoard()
    if list(logdirs) == [WHOLE_STORAGE]:
        where = ["--logdir", str(logdirs[WHOLE_STORAGE])]
    else:
        where = ["--logdir_spec", ",".join(f"{name}:{path}" for name, path in logdirs.items())]
    board.configure(argv=[
        "tensorboard", *where, "--host", host, "--port", str(port),
        "--reload_interval", str(reload_interval), "--load_fast", "false",
    ])
    try:
        return board.launch()
    except program.TensorBoardPortInUseError:
        raise BoardError(
            f"port {port} on {host} is in use; try --port {next_free_port(host, port)}"
        ) from None
    except program.TensorBoardServerException as exc:
        raise BoardError(exc.msg) from None

