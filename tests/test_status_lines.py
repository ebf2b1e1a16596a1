"""What a remote client makes of a driver's status lines and Ray's job state."""

from __future__ import annotations

from types import SimpleNamespace

from orchestra.client.ray_jobs import _combined_status
from orchestra.storage import status_lines
from orchestra.storage.record import JobRecord, JobState


def record_at(epochs: int, state: JobState = JobState.RUNNING) -> JobRecord:
    record = JobRecord(job_id="j-1", name="j", workers=2, spec={}, state=JobState.PENDING)
    if state is not JobState.PENDING:
        record.start()
    record.metrics = {"epoch": epochs, "loss": 1.0 / epochs} if epochs else {}
    record.epochs_completed = epochs
    if state is JobState.SUCCEEDED:
        record.finish()
    elif state is JobState.FAILED:
        record.fail("why")
    elif state is JobState.STOPPED:
        record.stop("why")
    return record


def ray_job(status: str, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(status=status, message=message, submission_id="j-1", start_time=1_000_000,
                           end_time=2_000_000, metadata={"orchestra": "1", "name": "j", "workers": "2"})


def log_of(*records: JobRecord) -> str:
    return "\n".join(["some driver output", *(status_lines.status_line(r) for r in records), "more output"])


def test_history_is_rebuilt_from_the_status_lines_and_rolled_back_on_restart():
    lines = [record_at(1), record_at(2), record_at(3), record_at(2), record_at(3), record_at(4)]
    lines[3].metrics = {"epoch": 2, "loss": 0.25}  # epoch 2 again, after a restart from epoch 1
    history = status_lines.history_from(status_lines.parse_statuses(log_of(*lines)))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[1]["loss"] == 0.25


def test_the_drivers_last_word_stands_while_ray_agrees():
    statuses = status_lines.parse_statuses(log_of(record_at(1), record_at(3)))
    assert _combined_status(ray_job("RUNNING"), statuses).epochs_completed == 3
    final = status_lines.parse_statuses(log_of(record_at(3, JobState.FAILED)))
    assert _combined_status(ray_job("FAILED", "exit 1"), final).reason == "why"


def test_a_driver_ray_lost_or_stopped_is_not_left_running():
    statuses = status_lines.parse_statuses(log_of(record_at(5)))
    lost = _combined_status(ray_job("FAILED", "Job entrypoint command failed with exit code -9"), statuses)
    assert lost.state is JobState.FAILED
    assert lost.reason == "driver lost: Job entrypoint command failed with exit code -9"
    assert lost.epochs_completed == 5 and lost.ended_at == 2000.0
    stopped = _combined_status(ray_job("STOPPED"), statuses)
    assert (stopped.state, stopped.reason) == (JobState.STOPPED, "cancelled after epoch 5")


def test_before_the_first_status_line_the_job_is_pending_or_failed_with_rays_message():
    assert _combined_status(ray_job("PENDING"), []).state is JobState.PENDING
    early = _combined_status(ray_job("FAILED", "runtime env setup failed"), [])
    assert (early.state, early.reason, early.workers) == (JobState.FAILED, "runtime env setup failed", 2)
