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
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import ray


@ray.remote(num_cpus=0, max_concurrency=1000)
class Channel:
    def __init__(self, world_size: int, resume_from: dict[str, Any] | None = None):
        self.world_size = world_size
        self.attempt = 0
        self.group: str | None = None
        # Where the first workers start: a resumed job's checkpoint.
        self.latest_checkpoint: dict[str, Any] | None = resume_from
        self.events: asyncio.Queue = asyncio.Queue()
        self.reports: dict[int, dict[int, Any]] = {}
        self.decisions: dict[tuple[int, int], Any] = {}
        self.decided: dict[tuple[int, int], asyncio.Event] = {}

    async def start(self, rank: int, pid: int, group: str) -> dict[str, Any]:
        """A worker of `group` starts; returns the attempt and where to resume."""
        if group != self.group:
            if self.group is not None:
                self.attempt += 1
                self.reports.clear()
                await self.events.put({
                    "kind": "restart", "attempt": self.attempt, "checkpoint": self.latest_checkpoint,
                })
            self.group = group
        await self.events.put({"kind": "started", "rank": rank, "pid": pid})
        return {"attempt": self.attempt, "checkpoint": self.latest_checkpoint}

    async def report(self, attempt: int, rank: int, epoch: int, payload: Any) -> Any:
        """Hand in one worker's epoch; wait for the job's decision."""
        if attempt != self.attempt:
            return {"stop": True, "stale": True}
        reports = self.reports.setdefault(epoch, {})
        reports[rank] = payload
        key = (attempt, epoch)
        event = self.decided.setdefault(key, asyncio.Event())
        if len(reports) == self.world_size:
            del self.reports[epoch]
            await self.events.put({
                "kind": "epoch", "attempt": attempt, "epoch": epoch,
                "reports": [reports[r] for r in sorted(reports)],
            })
        await event.wait()
        return self.decisions[key]

    def decide(self, attempt: int, epoch: int, decision: Any) -> None:
        key = (attempt, epoch)
        self.decisions[key] = decision
        self.decided.setdefault(key, asyncio.Event()).set()
        self.decisions.pop((attempt, epoch - 2), None)
        self.decided.pop((attempt, epoch - 2), None)

    async def checkpoint_saved(self, epoch: int, path: str) -> None:
        self.latest_checkpoint = {"epoch": epoch, "path": path}
        await self.events.put({"kind": "saved", "epoch": epoch, "path": path})

    async def finished(self, payload: Any) -> None:
        await self.events.put({"kind": "finished", **payload})

    async def next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None


class LocalChannel:
    """The channel for the in-process reference run: one worker, the
    coordinator in the same process, every call answered at once."""

    def __init__(self, coordinator, resume_from: dict[str, Any] | None = None):
        self.coordinator = coordinator
        self.resume_from = resume_from

    def start(self, rank: int, pid: int, group: str) -> dict[str, Any]:
        self.coordinator.on_worker_started(rank, pid)
        return {"attempt": 0, "checkpoint": self.resume_from}

    def report(self, attempt: int, rank: int, epoch: int, payload: dict[str, Any]) -> dict[str, Any]:
        return dataclasses.asdict(self.coordinator.on_epoch([payload]))

    def checkpoint_saved(self, epoch: int, path: str) -> None:
        self.coordinator.on_checkpoint_saved(epoch, path)

    def finished(self, payload: dict[str, Any]) -> None:
        self.coordinator.on_finished(payload)
