"""`python -m bench [--quick] [--workers 1 2] [--json OUT]`: the same
workload run every way below, side by side, as a markdown table (and JSON).

    plain       single-process tf-keras `fit`, TensorFlow's defaults
    ray_recipe  Ray Train's documented TensorflowTrainer recipe
    ray_recipe_tuned  the recipe with orchestra's tuning written in by hand
    orchestra   orchestra's embedded default, full coordinator
    loader      orchestra's input pipeline alone, no model

Figures: start-to-first-epoch (process start to the end of epoch 1), the
median steady-state epoch (epoch-end to epoch-end, epochs 2+, with min-max),
samples per second, per-epoch overhead outside Keras's epoch (the period
minus the time from epoch begin to epoch end: reporting, coordination,
checkpoints), peak memory of the driver and of one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from bench.common import Workload

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"train": 4800, "validation": 1200, "epochs": 3}


def run_way(module: str, work: Workload, repeat: int) -> dict:
    """Run one way in a fresh process and return its RESULT line."""
    process = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", json.dumps(asdict(work))],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise SystemExit(f"bench.{module} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["repeat"] = repeat
    return result


def summarize(results: list[dict]) -> dict:
    """Figures of one way at one worker count, over its repeats."""
    periods, overheads, latencies = [], [], []
    for r in results:
        ends, times = r["epoch_ends"], r["epoch_times"]
        latencies.append(ends[0] - r["started"])
        for i in range(1, len(ends)):
            periods.append(ends[i] - ends[i - 1])
            overheads.append(max(0.0, ends[i] - ends[i - 1] - times[i]))
    if not periods:  # one timed pass (the loader)
        periods = [t for r in results for t in r["epoch_times"]]
    median = statistics.median(periods)
    first = results[0]
    return {
        "way": first["way"], "workers": first["workers"],
        "start_to_first_epoch_s": statistics.median(latencies),
        "epoch_s": median, "epoch_min_s": min(periods), "epoch_max_s": max(periods),
        "samples_per_s": first["samples_per_epoch"] / median,
        "overhead_s": statistics.median(overheads) if overheads else 0.0,
        "overhead_pct": 100 * statistics.median(overheads) / median if overheads else 0.0,
        "driver_peak_mb": max(r["driver_peak_rss_mb"] for r in results),
        "worker_peak_mb": max(r["worker_peak_rss_mb"] for r in results) or None,
        "final_val_loss": first["final_val_loss"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| way | workers | first epoch after (s) | epoch (s), median [min–max] | samples/s "
             "| overhead/epoch | driver MB | worker MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["way"] == "loader":
            continue
        worker = f"{r['worker_peak_mb']:.0f}" if r["worker_peak_mb"] else "–"
        lines.append(
            f"| {r['way']} | {r['workers']} | {r['start_to_first_epoch_s']:.1f} | "
            f"{r['epoch_s']:.2f} [{r['epoch_min_s']:.2f}–{r['epoch_max_s']:.2f}] | {r['samples_per_s']:.0f} | "
            f"{r['overhead_s']:.3f} s ({r['overhead_pct']:.1f} %) | {r['driver_peak_mb']:.0f} | {worker} |"
        )
    return "\n".join(lines)


# Each default's "off" value, against which its gain is measured.
DEFAULTS_OFF = {
    "steps_per_execution 1 (auto: up to 50)": {"steps_per_execution": 1},
    "end-of-data vote every step (auto: skipped)": {"skip_end_of_data_vote": False},
    "evaluation batch = fit batch (auto: 1024)": {"evaluation_batch_size": Workload.batch_size},
    "TensorFlow's default threads (auto: 1 per CPU)": {"threads_per_worker": os.cpu_count() or 2},
    "gradients packed in one all-reduce (auto: TF default)": {"gradient_pack_bytes": 1 << 30},
}


def ablation(args) -> int:
    base = Workload(mnist=str(Path(args.mnist).resolve()), workers=2, **(QUICK if args.quick else {}))
    if args.epochs:
        base.epochs = args.epochs
    rows = [("all defaults", summarize([run_way("orchestra_way", base, k) for k in range(args.repeats)]))]
    for label, off in DEFAULTS_OFF.items():
        work = Workload(**{**asdict(base), "performance": off})
        rows.append((label, summarize([run_way("orchestra_way", work, k) for k in range(args.repeats)])))
    fast = rows[0][1]["epoch_s"]
    print("| orchestra, 2 workers | epoch (s), median [min–max] | vs all defaults |")
    print("| --- | ---: | ---: |")
    for label, row in rows:
        print(f"| {label} | {row['epoch_s']:.2f} [{row['epoch_min_s']:.2f}–{row['epoch_max_s']:.2f}] | "
              f"{row['epoch_s'] / fast:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({label: row for label, row in rows}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (seconds per way)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--mnist", default=os.path.join(os.environ.get("ORCHESTRA_DATASETS", "../shared/datasets"),
                                                        "mnist.npz"))
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--ablation", action="store_true",
                        help="instead: orchestra on 2 workers with each performance default turned off in turn")
    args = parser.parse_args(argv)
    if args.ablation:
        return ablation(args)

    base = Workload(mnist=str(Path(args.mnist).resolve()), **(QUICK if args.quick else {}))
    if args.epochs:
        base.epochs = args.epochs
    rows = [summarize([run_way("plain", base, k) for k in range(args.repeats)])]
    for workers in args.workers:
        work = Workload(**{**asdict(base), "workers": workers})
        rows.append(summarize([run_way("recipe", work, k) for k in range(args.repeats)]))
        if not args.quick:
            tuned = Workload(**{**asdict(work), "tuned": True})
            rows.append(summarize([run_way("recipe", tuned, k) for k in range(args.repeats)]))
        rows.append(summarize([run_way("orchestra_way", work, k) for k in range(args.repeats)]))
        rows.append(summarize([run_way("loader", work, 0)]))

    plain = rows[0]["epoch_s"]
    by = {(r["way"], r["workers"]): r for r in rows}
    ratios = {
        "orchestra_vs_ray": {str(w): by["orchestra", w]["epoch_s"] / by["ray_recipe", w]["epoch_s"] for w in args.workers},
        "orchestra_vs_plain": {str(w): by["orchestra", w]["epoch_s"] / plain for w in args.workers},
    }
    if not args.quick:
        ratios["orchestra_vs_ray_tuned"] = {
            str(w): by["orchestra", w]["epoch_s"] / by["ray_recipe_tuned", w]["epoch_s"] for w in args.workers}
    loader = {str(w): {"delivers_samples_per_s": by["loader", w]["samples_per_s"],
                       "consumes_samples_per_s": by["orchestra", w]["samples_per_s"] / w} for w in args.workers}
    print(f"workload: seed 000's MLP on MNIST, {base.train} train / {base.validation} validation, "
          f"global batch {base.batch_size}, {base.epochs} epochs, {os.cpu_count()} cores\n")
    print(table(rows))
    print()
    for w in args.workers:
        tuned = (f", orchestra / tuned recipe = {ratios['orchestra_vs_ray_tuned'][str(w)]:.2f}"
                 if "orchestra_vs_ray_tuned" in ratios else "")
        print(f"{w} worker(s): orchestra / recipe = {ratios['orchestra_vs_ray'][str(w)]:.2f}{tuned}, "
              f"orchestra / plain = {ratios['orchestra_vs_plain'][str(w)]:.2f}, input pipeline delivers "
              f"{loader[str(w)]['delivers_samples_per_s']:.0f} samples/s per worker against "
              f"{loader[str(w)]['consumes_samples_per_s']:.0f} consumed")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"workload": asdict(base), "results": rows, "ratios": ratios, "loader": loader}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
