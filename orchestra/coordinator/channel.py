"""The channel between workers and the driver: a small Ray actor.

Ray Train V2 gives the driver no way to answer a worker, so orchestra owns
this one. Each worker calls `report` at the end of every epoch and waits;
when every rank has reported, the driver reads the whole epoch with
`next_event`, decides, and `decide` releases all the workers at once with
the same answer, so none is left waiting in a collective.

A worker group that Ray Train restarts (`max_failures`) is a new attempt,
known by its cluster addresses (each group gets fresh ports): its first
`start` call discards the unfinished epoch of the old one and tells the
driver where training resumes.

The bookkeeping is `ChannelState`, plain Python that the tests drive
directly; `Channel` is that state behind a Ray actor, and `LocalChannel`
the in-process run's direct line to the coordinator.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import ray

from orchestra.coordinator.protocol import (
    CheckpointRef,
    CheckpointSaved,
    Decision,
    EpochReports,
    Event,
    FinalResult,
    Finished,
    Restarted,
    StartReply,
    StepProgress,
    WorkerReport,
    WorkerStarted,
)

if TYPE_CHECKING:
    from orchestra.coordinator.coordinator import Coordinator


class ChannelState:
    """Who has reported which epoch, the decisions made, the events not yet read.

    Args:
        world_size: workers per group.
        resume_from: the checkpoint the first group starts from (a resumed job), or None.

    Example:

        >>> state = ChannelState(world_size=2)
        >>> state.start(0, 101, "group-a").attempt
        0
        >>> from orchestra.coordinator.protocol import WorkerReport
        >>> state.report(0, WorkerReport(0, 1, {"loss": 0.5}, 1.0, 10)) is None
        True
        >>> state.report(0, WorkerReport(1, 1, {"loss": 0.5}, 1.0, 10)) is None
        True
        >>> [type(event).__name__ for event in state.drain()]
        ['WorkerStarted', 'EpochReports']
    """

    def __init__(self, world_size: int, resume_from: CheckpointRef | None = None):
        self.world_size = world_size
        self.attempt = 0
        self.group: str | None = None
        self.latest_checkpoint = resume_from
        self.events: deque[Event] = deque()
        self.reports: dict[int, dict[int, WorkerReport]] = {}
        self.decisions: dict[tuple[int, int], Decision] = {}

    def start(self, rank: int, pid: int, group: str) -> StartReply:
        """A worker of `group` starts; a group not seen before is a new attempt."""
        if group != self.group:
            if self.group is not None:
                self.attempt += 1
                self.reports.clear()
                self.events.append(Restarted(self.attempt, self.latest_checkpoint))
            self.group = group
        self.events.append(WorkerStarted(rank, pid))
        return StartReply(self.attempt, self.latest_checkpoint)

    def report(self, attempt: int, report: WorkerReport) -> Decision | None:
        """Take one worker's epoch. Returns a Decision at once for a worker of
        a replaced attempt (it must stop), else None: wait for `decide`."""
        if attempt != self.attempt:
            return Decision(stop=True, superseded=True)
        reports = self.reports.setdefault(report.epoch, {})
        reports[report.rank] = report
        if len(reports) == self.world_size:
            del self.reports[report.epoch]
            self.events.append(EpochReports(attempt, report.epoch, tuple(reports[r] for r in sorted(reports))))
        return None

    def decide(self, attempt: int, epoch: int, decision: Decision) -> None:
        self.decisions[(attempt, epoch)] = decision
        self.decisions.pop((attempt, epoch - 2), None)  # every worker has read it by now

    def checkpoint_saved(self, attempt: int, checkpoint: CheckpointRef) -> None:
        """A checkpoint was published; one of a replaced attempt's chief (still
        finishing its last write) is not the job's, and is ignored."""
        if attempt != self.attempt:
            return
        self.latest_checkpoint = checkpoint
        self.events.append(CheckpointSaved(checkpoint))

    def finished(self, result: FinalResult) -> None:
        self.events.append(Finished(result))

    def progress(self, progress: StepProgress) -> None:
        """The chief's position; an unread older one is replaced, not queued."""
        if self.events and isinstance(self.events[-1], StepProgress):
            self.events.pop()
        self.events.append(progress)

    def drain(self) -> list[Event]:
        events = list(self.events)
        self.events.clear()
        return events


@ray.remote(num_cpus=0, max_concurrency=1000)
class Channel:
    """`ChannelState` as a Ray actor: workers block in `report` until the
    driver's `decide`; the driver blocks in `next_event` until there is one."""

    def __init__(self, world_size: int, resume_from: CheckpointRef | None = None):
        self.state = ChannelState(world_size, resume_from)
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def start(self, rank: int, pid: int, group: str) -> StartReply:
        reply = self.state.start(rank, pid, group)
        await self._notify()
        return reply

    async def report(self, attempt: int, report: WorkerReport) -> Decision:
        """Hand in one worker's epoch; wait for the job's decision."""
        early = self.state.report(attempt, report)
        if early is not None:
            return early
        key = (attempt, report.epoch)
        async with self.changed:
            self.changed.notify_all()
            await self.changed.wait_for(lambda: key in self.state.decisions)
        return self.state.decisions[key]

    async def decide(self, attempt: int, epoch: int, decision: Decision) -> None:
        self.state.decide(attempt, epoch, decision)
        await self._notify()

    async def checkpoint_saved(self, attempt: int, checkpoint: CheckpointRef) -> None:
        self.state.checkpoint_saved(attempt, checkpoint)
        await self._notify()

    async def finished(self, result: FinalResult) -> None:
        self.state.finished(result)
        await self._notify()

    async def progress(self, progress: StepProgress) -> None:
        self.state.progress(progress)
        await self._notify()

    async def next_events(self, timeout: float) -> list[Event]:
        """The events since the last call, waiting up to `timeout` s for one."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: bool(self.state.events)), timeout)
            except asyncio.TimeoutError:
                pass
            return self.state.drain()


class LocalChannel:
    """The channel for the in-process reference run: one worker, the
    coordinator in the same process, every call answered at once."""

    def __init__(self, coordinator: Coordinator, resume_from: CheckpointRef | None = None):
        self.coordinator = coordinator
        self.resume_from = resume_from

    def start(self, rank: int, pid: int, group: str) -> StartReply:
        self.coordinator.on_worker_started(rank, pid)
        return StartReply(0, self.resume_from)

    def report(self, attempt: int, report: WorkerReport) -> Decision:
        return self.coordinator.on_epoch((report,))

    def checkpoint_saved(self, attempt: int, checkpoint: CheckpointRef) -> None:
        self.coordinator.on_checkpoint_saved(checkpoint)

    def finished(self, result: FinalResult) -> None:
        self.coordinator.on_finished(result)

    def progress(self, progress: StepProgress) -> None:
        self.coordinator.on_progress(progress)
