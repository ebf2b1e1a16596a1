"""Keras's `CSVLogger` for the whole job, written by the driver.

On the workers, Keras's own callback would write one file per worker, each
with its own share's numbers; the driver has the epoch's metrics
aggregated over all workers, and the scalars its other callbacks add, so
it writes the one file a single-process `fit` would.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.protocol import Decision
from orchestra.storage.bucket import own, pull_file, push_file


class CSVLogger(CoordinatorCallback):
    """One row per epoch in a CSV file, as Keras's `CSVLogger` writes it:
    an `epoch` column counted from 0 as Keras counts, then the keys of the
    first epoch's logs sorted (plus their `val_` twins if none is there
    yet), `NA` for a value an epoch lacks. The logs are the aggregated
    metrics and the scalars earlier callbacks added.

    Its writes are optional (a full disk does not fail the job). Rolled
    back to a checkpoint, it drops the rows of later epochs and goes on
    appending, so a restarted or resumed job has each epoch once.

    Args:
        path: the file, inside the job's folder.
        separator: the field delimiter.
        append: accepted as Keras takes it; the file is the job's own, in a
            fresh job folder, so there is nothing before to keep or drop.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "training.log"
        >>> logger = CSVLogger(path)
        >>> logger.on_epoch_end(EpochResult(1, {"loss": 0.5, "val_loss": 0.6}, 1.0, 10.0), Decision())
        >>> path.read_text().splitlines()
        ['epoch,loss,val_loss', '0,0.5,0.6']
    """

    optional = True

    def __init__(self, path: str | Path, separator: str = ",", append: bool = False):
        self.path = own(path)  # on a bucket: in this process's mirror
        self.separator = separator
        self.append = append
        self.keys: list[str] | None = None
        self.epochs = 0  # epochs written (Keras's epoch + 1 of the last row)

    def _dialect(self) -> type[csv.Dialect]:
        separator = self.separator

        class Dialect(csv.excel):
            delimiter = separator

        return Dialect

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        if self.keys is None:
            pull_file(self.path)  # on a bucket: the file a run before this one wrote there
        logs = {**result.metrics, **result.scalars}
        header = self.keys is None and not self._has_header()
        if self.keys is None:
            self.keys = self._header_keys() or sorted(logs)
            if not any(key.startswith("val_") for key in self.keys):
                self.keys += [f"val_{key}" for key in self.keys]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["epoch", *self.keys], dialect=self._dialect())
        if header:
            writer.writeheader()
        writer.writerow({"epoch": result.epoch - 1, **{key: logs.get(key, "NA") for key in self.keys}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as handle:
            handle.write(buffer.getvalue())
        push_file(self.path)  # on a bucket, the whole file again: it is one row an epoch
        self.epochs = result.epoch

    def _has_header(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def _header_keys(self) -> list[str] | None:
        """The columns of a file this job (or, with `append`, a run before) began."""
        if not self._has_header():
            return None
        with open(self.path, newline="") as handle:
            first = next(csv.reader(handle, dialect=self._dialect()), None)
        return list(first[1:]) if first and first[0] == "epoch" else None

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to `state`'s epoch: rows of later epochs are dropped."""
        self.epochs = int(state["epochs"])
        self.keys = None
        if not pull_file(self.path).is_file():
            return
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle, dialect=self._dialect()))
        kept = [row for i, row in enumerate(rows) if i == 0 or (row and _epoch(row[0]) < self.epochs)]
        buffer = io.StringIO()
        csv.writer(buffer, dialect=self._dialect()).writerows(kept if self.epochs else [])
        self.path.write_text(buffer.getvalue())
        push_file(self.path)


def _epoch(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1
