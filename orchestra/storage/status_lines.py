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

from orchestra.storage.record import JobRecord, JobStatus

PREFIX = "@orchestra-status "


def status_line(record: JobRecord) -> str:
    return PREFIX + record.status().model_dump_json()


def print_status_line(record: JobRecord) -> None:
    print(status_line(record), flush=True)


def is_status_line(line: str) -> bool:
    return line.startswith(PREFIX)


def parse_statuses(log: str) -> list[JobStatus]:
    """Every status line of a driver's log, oldest first."""
    return [JobStatus.model_validate_json(line[len(PREFIX):])
            for line in log.splitlines() if is_status_line(line)]


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
