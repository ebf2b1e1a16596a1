"""Checkpoints to shared storage, decided on the driver with Keras's rules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.monitor import Monitor, checkpoint_mode
from orchestra.coordinator.protocol import CheckpointOrder, CheckpointRef, Decision
from orchestra.errors import StorageError
from orchestra.spec.callbacks import check_job_file, format_filepath
from orchestra.storage.bucket import pull_folder, push_file
from orchestra.storage.folders import model_file, remove_published


class Checkpoint(CoordinatorCallback):
    """Keras's `ModelCheckpoint` for a whole job, plus retention.

    Every epoch (or, with `save_best_only`, every epoch whose `monitor`
    beats the best so far, exactly as `ModelCheckpoint` decides) the
    workers are told to save into a fresh folder, which the chief publishes
    by rename: a crash mid-write never leaves a checkpoint that loads wrong.
    After each save only the newest `keep` checkpoints and the best one
    remain. The best is the saved checkpoint with the best `monitor` value
    (the earliest of equals, as Keras only counts strict improvements).

    Args:
        directory_for_epoch: where the checkpoint of an epoch goes.
        monitor: metric name, e.g. `val_loss`.
        mode: `auto`, `min` or `max`; `auto` is max when the name contains
            `acc`, as in Keras's ModelCheckpoint.
        save_best_only: save only when `monitor` improves.
        save_weights_only: save weights (`model.weights.h5`) rather than the
            whole model (`model.keras`).
        keep: how many of the newest checkpoints to keep.
        filepath: Keras's file name template (`{epoch}` and the epoch's
            metrics): each saved checkpoint's model file is also published
            under that name inside the checkpoints folder, as Keras would
            write it (and, as in Keras, retention never deletes it).
        initial_value_threshold: with `save_best_only`, the value the first
            save must beat.

    Example:

        >>> ckpt = Checkpoint(lambda epoch: Path(f"/tmp/ck/epoch-{epoch}"), save_best_only=True)
        >>> from orchestra.coordinator.base import EpochResult
        >>> from orchestra.coordinator.protocol import Decision
        >>> decision = Decision()
        >>> ckpt.on_epoch_end(EpochResult(1, {"val_loss": 0.3}, 1.0, 1.0), decision)
        >>> decision.checkpoint.directory
        '/tmp/ck/epoch-1'
    """

    def __init__(
        self,
        directory_for_epoch: Callable[[int], Path],
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        save_weights_only: bool = False,
        keep: int = 3,
        filepath: str | None = None,
        initial_value_threshold: float | None = None,
    ):
        self.directory_for_epoch = directory_for_epoch
        self.monitor = Monitor(monitor, checkpoint_mode(monitor, mode))
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.keep = keep
        self.filepath = filepath
        self.best = self.monitor.worst if initial_value_threshold is None else initial_value_threshold
        self._names: dict[int, str] = {}  # epoch → its filepath, resolved, until saved
        self.saved: list[dict[str, Any]] = []  # {"epoch", "path", "value"}, oldest first
        self._pending: dict[int, float | None] = {}
        self.before_delete: Callable[[], None] = lambda: None  # the driver's lease check (storage.lease)

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        current = result.metrics.get(self.monitor.name)
        improved = current is not None and self.monitor.is_improvement(current, self.best)
        if improved:
            self.best = current
        if self.save_best_only and not improved:
            return
        # The coordinator adds every callback's state once all have decided.
        decision.checkpoint = CheckpointOrder(str(self.directory_for_epoch(result.epoch)), self.save_weights_only, {})
        self._pending[result.epoch] = current
        if self.filepath is not None:
            self._names[result.epoch] = format_filepath(self.filepath, result.epoch, result.metrics)

    def on_checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        value = self._pending.pop(checkpoint.epoch, None)
        name = self._names.pop(checkpoint.epoch, None)
        if name is not None:
            self._publish_as(Path(checkpoint.path), name)
        self.saved = [entry for entry in self.saved if entry["epoch"] != checkpoint.epoch]
        self.saved.append({"epoch": checkpoint.epoch, "path": checkpoint.path, "value": value})
        best = self.best_entry
        keep = self.saved[-self.keep:] + ([best] if best else [])
        for entry in self.saved:
            if entry not in keep:
                self.before_delete()
                remove_published(entry["path"])  # in a bucket too
        self.saved = [entry for entry in self.saved if entry in keep]

    def _publish_as(self, folder: Path, name: str) -> None:
        """The checkpoint's model file, also under Keras's name `name` inside
        the checkpoints folder: linked (or copied), then renamed into place."""
        root = folder.parent
        try:
            check_job_file(name, "the job's checkpoints/ folder")
        except ValueError as exc:
            raise StorageError(f"ModelCheckpoint's filepath formats to {name!r}, which {exc}") from None
        target = root / name
        if not target.resolve().is_relative_to(root.resolve()):
            raise StorageError(f"ModelCheckpoint's filepath {name!r} leaves the checkpoints folder {root}")
        source = model_file(pull_folder(folder))  # in a bucket, the driver reads it from there
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
        staging.unlink(missing_ok=True)
        try:
            os.link(source, staging)
        except OSError:
            shutil.copyfile(source, staging)
        os.replace(staging, target)
        push_file(target)

    @property
    def best_entry(self) -> dict[str, Any] | None:
        best = None
        for entry in self.saved:
            if entry["value"] is None:
                continue
            if best is None or self.monitor.is_improvement(entry["value"], best["value"]):
                best = entry
        return best or (self.saved[-1] if self.saved else None)

    def state_dict(self) -> dict[str, Any]:
        """The state saved with each checkpoint. Its folders are named as the
        job folder holds them (`checkpoints/epoch-0007`), never by a path."""
        return {
            "best": self.best,
            "saved": [{**entry, "path": _name_in_job(entry["path"])} for entry in self.saved],
            "pending": [[epoch, value] for epoch, value in self._pending.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a saved state. The state comes from a file in storage, so
        it is data: a listed checkpoint counts only as this job's own folder
        for its epoch (retention deletes what is listed, so nothing else may
        be), and values of the wrong kind are a StorageError."""
        best, saved, pending = state.get("best"), state.get("saved"), state.get("pending")
        if (not _is_number(best) or not isinstance(saved, list) or not isinstance(pending, list)
                or not all(isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                           and (pair[1] is None or _is_number(pair[1])) for pair in pending)):
            raise StorageError('a checkpoint\'s state for Checkpoint is not {"best": <number>, "saved": [...], '
                               '"pending": [[<epoch>, <number or null>], ...]}')
        self.best = float(best)
        self.saved = [own for own in map(self._own, saved) if own is not None]
        self._pending = {epoch: value for epoch, value in pending}

    def _own(self, entry: Any) -> dict[str, Any] | None:
        """`entry` with its path as this job's checkpoint folder of its epoch, or None."""
        try:
            epoch, value = int(entry["epoch"]), entry.get("value")
            folder = Path(self.directory_for_epoch(epoch))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if Path(str(entry["path"])).name != folder.name or folder.is_symlink() or not folder.is_dir():
            return None
        return {"epoch": epoch, "path": str(folder), "value": value if _is_number(value) else None}

    def record_fields(self) -> dict[str, Any]:
        best = self.best_entry
        return {"checkpoints": list(self.saved), "best_checkpoint": best["path"] if best else None}


def _name_in_job(path: str) -> str:
    """A checkpoint folder by its name inside the job folder: `checkpoints/epoch-0007`."""
    folder = Path(path)
    return f"{folder.parent.name}/{folder.name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
