"""Serve jobs' TensorBoard runs with TensorBoard's own server.

Each job is one group of runs named after it: `<job>` (hyperparameters and
text summaries), `<job>/train` and `<job>/validation`.
"""

from __future__ import annotations

import socket
from pathlib import Path

from orchestra.errors import BoardError
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
            raise BoardError(f"no jobs in {storage.root}")
    logdirs = {}
    for job_id in job_ids:
        storage.read_record(job_id)  # StorageError names an unknown job
        logdirs[job_id] = storage.tensorboard_dir(job_id)
    return logdirs


def serve(logdirs: dict[str, Path], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          reload_interval: float = 5.0):
    """Start TensorBoard's server in a background thread; return its URL."""
    from orchestra.keras_compat import tensorflow

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

