"""`python -m bench.bookkeeping`: do the driver's per-epoch bookkeeping and
`orchestra list` stay flat as jobs get longer and more numerous?

Two figures, each as a table:

- the driver's time per epoch spent in bookkeeping (the coordinator's
  `on_epoch`: aggregation, early stopping, the checkpoint decision, the
  history line, the record write) at epoch 10 and at epoch 3,000 of a job
  shaped like the MNIST over-fitting experiment (3,000 epochs, no early
  stop), fed synthetic worker reports in this process — no Ray, no
  TensorFlow, so only orchestra's own cost is measured; TensorBoard is off;
- `orchestra list` (its `Client.list`, in this process, and the CLI as a
  subprocess) over 100 and 1,000 generated finished jobs of 3,000 epochs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestra.client.client import Client
from orchestra.coordinator import Checkpoint, Coordinator, EarlyStopping
from orchestra.coordinator.protocol import CheckpointRef, WorkerReport
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord

EPOCHS = 3000
MARKS = (10, 100, 1000, 3000)


def run_job(storage: Storage, job_id: str, epochs: int = EPOCHS) -> dict[int, float]:
    """One synthetic job: seconds of `on_epoch` (plus the checkpoint
    bookkeeping it orders) at each epoch, median of the 5 epochs up to it."""
    storage.create_job_dir(job_id)
    record = JobRecord(job_id=job_id, name="overfit", workers=2, spec={"fit": {"epochs": epochs}})
    storage.write_record(record)
    callbacks = [EarlyStopping(monitor="val_loss", patience=epochs),
                 Checkpoint(lambda epoch: storage.checkpoint_dir(job_id, epoch), monitor="val_loss",
                            save_best_only=True, keep=1)]
    coordinator = Coordinator(record, storage, callbacks, fallback_monitor="val_loss")
    for rank in range(2):
        coordinator.on_worker_started(rank, 1000 + rank)
    took: dict[int, float] = {}
    for epoch in range(1, epochs + 1):
        val_loss = 1.0 / epoch if epoch < 200 else 0.005 + epoch * 1e-6  # improves, then over-fits
        reports = tuple(WorkerReport(rank, epoch, {"loss": 1.0 / epoch, "accuracy": 0.5, "val_loss": val_loss,
                                                    "val_accuracy": 0.5}, 0.5, 350) for rank in range(2))
        started = time.perf_counter()
        decision = coordinator.on_epoch(reports)
        if decision.checkpoint is not None:  # the workers' save, minus the files: the driver's part only
            folder = Path(decision.checkpoint.directory)
            folder.mkdir(parents=True)
            coordinator.on_checkpoint_saved(CheckpointRef(epoch, str(folder)))
        took[epoch] = time.perf_counter() - started
    return {mark: statistics.median(took[e] for e in range(max(1, mark - 4), mark + 1))
            for mark in MARKS if mark <= epochs}


def time_list(root: Path) -> tuple[float, float]:
    """(seconds of Client.list in this process, seconds of `orchestra list` as a command)."""
    started = time.perf_counter()
    listed = Client(storage=str(root)).list()
    in_process = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestra.cli", "list", "--storage", str(root)], check=True,
                   capture_output=True)
    command = time.perf_counter() - started
    assert listed
    return in_process, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000], help="job counts for `list`")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestra-bookkeeping-") as folder:
        storage = Storage(Path(folder) / "storage")
        marks = run_job(storage, "overfit-0", args.epochs)
        record_bytes = (storage.job_dir("overfit-0") / "job.json").stat().st_size
        history_bytes = (storage.job_dir("overfit-0") / "history.jsonl").stat().st_size
        print("| epoch | driver bookkeeping per epoch (ms) |\n|---:|---:|")
        for mark in (m for m in MARKS if m <= args.epochs):
            print(f"| {mark} | {marks[mark] * 1000:.2f} |")
        print(f"\nrecord file {record_bytes} bytes, history file {history_bytes} bytes after {args.epochs} epochs\n")

        print("| finished jobs | Client.list (s) | orchestra list (s) |\n|---:|---:|---:|")
        made = 1
        template = storage.read_record("overfit-0").model_dump_json()
        history = (storage.job_dir("overfit-0") / "history.jsonl").read_text()
        for count in sorted(args.jobs):
            for i in range(made, count):  # copies of the finished job: the record and its history
                job = storage.job_dir(f"overfit-{i}")
                job.mkdir()
                (job / "job.json").write_text(template.replace('"overfit-0"', f'"overfit-{i}"'))
                (job / "history.jsonl").write_text(history)
            made = count
            in_process, command = time_list(storage.root)
            print(f"| {count} | {in_process:.3f} | {command:.2f} |")


if __name__ == "__main__":
    main()
