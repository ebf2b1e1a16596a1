"""bfloat16 against float32: the same orchestra job in each precision, its
epoch time and final validation accuracy.

    python -m bench.precision [--workers 1 2] [--repeat 1] [--epochs 4] [--units 512]

Each job runs in its own process (the embedded Ray, the foreground driver),
the precisions interleaved; the epoch is the median of epochs 2 to the last
(epoch 1 includes tracing). This machine's CPU computes bfloat16 natively
(AVX512_BF16); on one without it TensorFlow emulates it, slowly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import scratch_dir

POLICIES = (None, "mixed_bfloat16")


def spec_for(policy: str | None, workers: int, epochs: int, units: int) -> dict:
    return {
        "name": "precision", "seed": 0,
        "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "sparse", "test": False,
                 "train_size": 12_000, "validation_size": 3_000, "seed": 42},
        "model": {"layers": [{"type": "Dense", "units": units, "activation": "relu"},
                             {"type": "Dense", "units": units, "activation": "relu"},
                             {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": epochs, "batch_size": 128},
        "callbacks": [],
        "scaling": {"workers": workers},
        "performance": {"mixed_precision": policy},
    }


def run_one(spec: dict, datasets: str) -> dict:
    """Train one job in this process; its epoch times and last validation accuracy."""
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job
    from orchestra.spec import JobSpec

    storage = tempfile.mkdtemp(dir=scratch_dir())
    prepared = preflight(JobSpec.model_validate(spec), storage=storage, datasets=datasets)
    record = run_job(prepared, create_job(prepared))
    assert record.state.value == "SUCCEEDED", record.reason
    return {"epoch_times": [h["epoch_time"] for h in record.history],
            "val_accuracy": record.history[-1]["val_accuracy"]}


def measure(policy: str | None, workers: int, epochs: int, units: int, datasets: str) -> dict:
    spec = spec_for(policy, workers, epochs, units)
    result = subprocess.run([sys.executable, "-m", "bench.precision", "--one", json.dumps(spec),
                             "--datasets", datasets], capture_output=True, text=True, check=False)
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the {policy or 'float32'} job on {workers} workers failed:\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def table(runs: dict, units: int, epochs: int) -> str:
    rows = [f"MNIST 12,000 train / 3,000 validation, Dense({units}) → Dense({units}) → Dense(10), global batch "
            f"128, {epochs} epochs; epoch: median of epochs 2–{epochs} over the runs [min–max]",
            "",
            "| workers | float32 epoch (s) | bfloat16 epoch (s) | bfloat16 / float32 | "
            "val_accuracy float32 | val_accuracy bfloat16 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for workers, by_policy in sorted(runs.items()):
        epoch = {p: [statistics.median(r["epoch_times"][1:]) for r in by_policy[p]] for p in POLICIES}
        accuracy = {p: statistics.median(r["val_accuracy"] for r in by_policy[p]) for p in POLICIES}
        cells = [f"{statistics.median(epoch[p]):.2f} [{min(epoch[p]):.2f}–{max(epoch[p]):.2f}]" for p in POLICIES]
        ratio = statistics.median(epoch["mixed_bfloat16"]) / statistics.median(epoch[None])
        rows.append(f"| {workers} | {cells[0]} | {cells[1]} | {ratio:.2f}× | {accuracy[None]:.4f} | "
                    f"{accuracy['mixed_bfloat16']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--datasets", default=os.environ.get("ORCHESTRA_DATASETS", "../shared/datasets"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    datasets = str(Path(args.datasets).resolve())
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one), datasets)), flush=True)
        return
    runs: dict[int, dict] = {w: {p: [] for p in POLICIES} for w in args.workers}
    for _ in range(args.repeat):
        for workers in args.workers:
            for policy in POLICIES:
                runs[workers][policy].append(measure(policy, workers, args.epochs, args.units, datasets))
    print(table(runs, args.units, args.epochs))


if __name__ == "__main__":
    main()
