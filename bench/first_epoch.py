"""`python -m bench.first_epoch`: where the time to the first epoch goes.

Runs `orchestra submit` (embedded Ray, the foreground driver) on a small
MNIST job with 1 and 2 workers and reads the job record's start-up marks
(`startup`: Unix times written by the driver, the coordinator and the
chief worker), then prints each step's share:

    driver process start → checked   Python and orchestra's imports, the spec's checks
                                      (the data read once, the model built for its summary)
    → ray                             the embedded Ray's start
    → workers                         Ray Train's controller and worker processes,
                                      TensorFlow's import and MultiWorkerMirroredStrategy
    → worker data                     the chief reads and prepares the arrays
    → worker model                    the chief builds and compiles the model
    → first epoch                     the first epoch itself (tf.function tracing included)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = [("checked", "imports and checks"), ("ray", "Ray start"), ("workers", "workers, TensorFlow, strategy"),
         ("worker_data", "chief: data"), ("worker_model", "chief: model"), ("first_epoch", "first epoch")]


def spec(workers: int) -> dict:
    return {
        "name": f"first-epoch-{workers}",
        "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "one_hot",
                 "train_size": 4800, "validation_size": 1200, "test": False},
        "model": {"layers": [{"type": "Dense", "units": 100, "activation": "relu"},
                             {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 1, "batch_size": 32},
        "scaling": {"workers": workers},
    }


def measure(workers: int, datasets: str, folder: Path) -> dict[str, float]:
    path = folder / f"spec-{workers}.json"
    path.write_text(json.dumps(spec(workers)))
    storage = folder / f"storage-{workers}"
    subprocess.run([sys.executable, "-m", "orchestra.cli", "submit", str(path), "--storage", str(storage),
                    "--datasets", datasets], check=True, capture_output=True, cwd=ROOT)
    (record_file,) = storage.glob("*/job.json")
    startup = json.loads(record_file.read_text())["startup"]
    marks, previous, steps = startup["process"], startup["process"], {}
    for key, _ in STEPS:
        if key in startup:
            steps[key] = startup[key] - previous
            previous = startup[key]
    steps["total"] = previous - marks
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestra-first-epoch-") as folder:
        results = {workers: measure(workers, args.datasets, Path(folder)) for workers in args.workers}
    print("| step (s) | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in results) + " |")
    print("|---|" + "---:|" * len(results))
    for key, label in [*STEPS, ("total", "process start to first epoch")]:
        print(f"| {label} | " + " | ".join(f"{r.get(key, float('nan')):.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
