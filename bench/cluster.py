"""`python -m bench.cluster [--epochs N] [SPEC]`: one job on the embedded
default and on a real two-node Ray cluster on this machine (a head and a
second node joined to it, 1 CPU each, through the job server), as a table:

    submit → first epoch   from the submitting command's start to the end of epoch 1
    epoch (median)         epoch-end to epoch-end over epochs 3+, with min-max
    total                  from the submitting command's start to its exit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.ray_cluster import LoopbackCluster

ROOT = Path(__file__).resolve().parent.parent


def run(spec: Path, storage: Path, env: dict[str, str], *extra: str) -> dict:
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "orchestra.cli", "submit", str(spec), "--storage", str(storage),
                             *extra], env=env, capture_output=True, text=True, timeout=3600)
    ended = time.time()
    if result.returncode:
        raise SystemExit(f"submit failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    (record,) = [json.loads(path.read_text()) for path in storage.glob("*/job.json")]
    ends = [entry["time"] for entry in record["history"]]
    periods = [b - a for a, b in zip(ends[2:], ends[3:])]
    return {"first_epoch": ends[0] - started, "epoch": statistics.median(periods),
            "epoch_min": min(periods), "epoch_max": max(periods), "total": ended - started,
            "epochs": record["epochs_completed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(ROOT / "jobs" / "mnist_overfit.json"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="orchestra-bench-cluster-"))
    spec = json.loads(Path(args.spec).read_text())
    spec["fit"]["epochs"] = args.epochs
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    datasets = os.environ.get("ORCHESTRA_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    env = {**os.environ, "ORCHESTRA_DATASETS": datasets}

    rows = {"embedded": run(spec_path, folder / "embedded", env)}
    cluster = LoopbackCluster(folder, env={"ORCHESTRA_DATASETS": datasets}).start()
    try:
        rows["cluster (Ray Jobs)"] = run(spec_path, folder / "cluster", cluster.client_env())
    finally:
        cluster.stop()

    print(f"\n{Path(args.spec).name}, {args.epochs} epochs, 2 workers\n")
    print("| where | submit → first epoch | epoch (median, min–max) | total |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['first_epoch']:.1f} s | {r['epoch']:.3f} s ({r['epoch_min']:.3f}–{r['epoch_max']:.3f}) "
              f"| {r['total']:.1f} s |")


if __name__ == "__main__":
    main()
