"""`python -m bench.sharded`: a sharded source's workers hold their share
of a batch, not the dataset: the same job on 60,000 and on 600,000
generated examples (784 float32 values each: 188 MB and 1.9 GB), per
shard format, with each worker's peak resident memory and the epoch time.

    python -m bench.sharded [--sizes 60000 600000] [--formats npy tfrecord]
                            [--batch 1000] [--epochs 1] [--shards 8]

The data is generated into a temporary folder under /tmp (`--scratch`)
a range at a time, written by the converter's own writer
(`orchestra.tools.convert.write_shards`), and deleted after its run; no
process holds the whole set. A worker's peak is the kernel's high-water
mark of its resident memory (`VmHWM`), read while the job runs; the job's
record gives the same figure for the largest worker (`worker_peak_rss_mb`,
from `getrusage`). Prints a markdown table, and the ratio of each format's
largest to smallest size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Sampler

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES, CLASSES = 784, 10


def generated(count: int, seed: int = 0):
    """A `Source` of `count` examples of 784 float32 values, made a range at
    a time (the same range, the same values); the label is the largest of
    the first ten values' position, so the job has something to learn."""
    from orchestra.tools.convert import Source, SourceSplit

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng([seed, start]).random((stop - start, FEATURES), dtype=np.float32)
        return x, x[:, :CLASSES].argmax(axis=1).astype(np.uint8)

    return Source({"train": SourceSplit(count, read)}, (FEATURES,), np.dtype(np.float32),
                  [str(c) for c in range(CLASSES)], f"generated-{count}")


def spec_for(folder: Path, fmt: str, batch: int, epochs: int) -> dict:
    return {
        "name": "bench_sharded", "seed": 0,
        "data": {"shards": {"path": str(folder), "format": fmt}, "labels": "sparse", "test": False},
        "model": {"layers": [{"type": "Dense", "units": 100, "activation": "relu"},
                             {"type": "Dense", "units": CLASSES, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": epochs, "batch_size": batch},
        "scaling": {"workers": 2},
    }


class PeakMemory(Sampler):
    """Each process's high-water mark of resident memory (`VmHWM`), read
    every `interval` seconds while the processes `pids()` names, as
    (rank, pid) pairs, live."""

    def __init__(self, pids, interval: float = 0.5):
        super().__init__(pids, interval)
        self.peaks: dict[str, float] = {}

    def sample(self) -> None:
        for rank, pid in list(self.pids()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            marks = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
            if marks:  # a process that has exited (a zombie) has none
                self.peaks[rank] = max(self.peaks.get(rank, 0.0), marks[0] / 1024)


def run_one(count: int, fmt: str, args) -> dict:
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job
    from orchestra.spec import JobSpec
    from orchestra.tools.convert import write_shards

    work = Path(tempfile.mkdtemp(prefix="orchestra-sharded-", dir=args.scratch))
    try:
        started = time.time()
        manifest = write_shards(generated(count), work / "data", fmt, args.shards)
        written = time.time() - started
        size_mb = sum(f.bytes for s in manifest.splits["train"].shards for f in s.files()) / 2**20
        prepared = preflight(JobSpec.model_validate(spec_for(work / "data", fmt, args.batch, args.epochs)),
                             storage=str(work / "storage"))
        record = create_job(prepared)
        with PeakMemory(lambda: record.worker_pids.items()) as memory:
            run_job(prepared, record)
        assert record.state.value == "SUCCEEDED", record.reason
        history = record.history
        return {"examples": count, "format": fmt, "data_mb": size_mb, "write_s": written,
                "workers_mb": [memory.peaks[rank] for rank in sorted(memory.peaks)],
                "record_mb": max(h["worker_peak_rss_mb"] for h in history),
                "epoch_s": [h["epoch_time"] for h in history], "loss": history[-1]["loss"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = ["| examples | format | data MB | worker peak RSS MB (each) | record's worker_peak_rss_mb | "
             "epoch time s | final loss |",
             "| ---: | --- | ---: | --- | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['examples']:,} | {r['format']} | {r['data_mb']:,.0f} | "
                     f"{' / '.join(f'{mb:,.0f}' for mb in r['workers_mb'])} | {r['record_mb']:,.0f} | "
                     f"{' / '.join(f'{s:.1f}' for s in r['epoch_s'])} | {r['loss']:.4f} |")
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = sorted((r for r in rows if r["format"] == fmt), key=lambda r: r["examples"])
        if len(mine) > 1:
            small, large = mine[0], mine[-1]
            lines.append(f"\n{fmt}: {large['examples']:,} vs {small['examples']:,} examples: the largest worker's "
                         f"peak is {max(large['workers_mb']) / max(small['workers_mb']):.3f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 600_000])
    parser.add_argument("--formats", nargs="+", default=["npy", "tfrecord"], choices=["npy", "tfrecord"])
    parser.add_argument("--batch", type=int, default=1000, help="global batch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--scratch", default="/tmp")
    args = parser.parse_args()
    rows = []
    for fmt in args.formats:
        for count in args.sizes:
            rows.append(run_one(count, fmt, args))
            print(f"done: {rows[-1]}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
