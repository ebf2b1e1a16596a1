"""Status lines: how a Ray job's driver tells a remote client about its job.

Ray Jobs gives a client the job's state and its driver's output, nothing
more. So a driver started by `orchestra submit --address` prints one line
per record it writes:

    @orchestra-status {"job_id": "...", "state": "RUNNING", "epochs_completed": 3, ...}

and the client reads the job back from the log: the last line is the
status, the lines' `metrics` are the history. Nothing else is needed on the
laptop: no shared storage, no Ray connection, only the job server.
"""

from __future__ import annotations

from orchestra.storage.record import JobProgress, JobRecord, JobStatus

PREFIX = "@orchestra-status "
PROGRESS_PREFIX = "@orchestra-progress "


def status_line(record: JobRecord) -> str:
    return PREFIX + record.status().model_dump_json()


def print_status_line(record: JobRecord) -> None:
    print(status_line(record), flush=True)


def progress_line(progress: JobProgress) -> str:
    """Where the running epoch is (about once a second): for clients that draw a progress bar."""
    return PROGRESS_PREFIX + progress.model_dump_json()


def is_status_line(line: str) -> bool:
    """A line for clients (a status or a progress line), not for people."""
    return line.startswith((PREFIX, PROGRESS_PREFIX))


def parse_progress(line: str) -> JobProgress | None:
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return JobProgress.model_validate_json(line[len(PROGRESS_PREFIX):])
    except ValueError:
        return None


def latest_progress(log: str) -> JobProgress | None:
    """The progress line after the last status line, if any: the running epoch's."""
    for line in reversed(log.splitlines()):
        if line.startswith(PREFIX):
            return None
        progress = parse_progress(line)
        if progress is not None:
            return progress
    return None


def parse_statuses(log: str) -> list[JobStatus]:
    """Every status line of a driver's log, oldest first."""
    statuses = []
    for line in log.splitlines():
        if line.startswith(PREFIX):
            try:
                statuses.append(JobStatus.model_validate_json(line[len(PREFIX):]))
            except ValueError:
                continue  # a line another process's output cut into: the next one says as much
    return statuses


def history_from(statuses: list[JobStatus]) -> list[dict[str, int | float]]:
    """The per-epoch history, rebuilt from the statuses' last-epoch entries.
    A restart from a checkpoint rolls `epochs_completed` back; the epochs
    after it are then dropped and written again, as in the record."""
    by_epoch: dict[int, dict[str, int | float]] = {}
    for status in statuses:
        by_epoch = {epoch: entry for epoch, entry in by_epoch.items() if epoch <= status.epochs_completed}
        if status.metrics and status.epochs_completed:
            by_epoch[status.epochs_completed] = status.metrics
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]
