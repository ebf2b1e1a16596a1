"""`python -m bench [--quick] [--workers 1 2] [--repeat N] [--check] [--json OUT]`:
the same workload run every way below, side by side, as a markdown table
(and JSON); a full run writes the table into docs/performance.md between
its bench:table markers, with the commit and date it was measured at.

    plain       single-process tf-keras `fit`, TensorFlow's defaults
    ray_recipe  Ray Train's documented TensorflowTrainer recipe
    ray_recipe_tuned  the recipe with orchestra's tuning written in by hand
    orchestra   orchestra's embedded default, full coordinator
    loader      orchestra's input pipeline alone, no model

Figures of one run: start-to-first-epoch (process start to the end of epoch
1), the median steady-state epoch (epoch-end to epoch-end, epochs 2+),
samples per second, per-epoch overhead outside Keras's epoch (the period
minus the time from epoch begin to epoch end: reporting, coordination,
checkpoints), peak memory of the driver and of the largest worker, and for
orchestra the workers' summed resident memory (RSS, and PSS, which counts a
page shared by k processes as 1/k in each). Each way runs `--repeat` times,
interleaved with the others; each figure is reported as the median over the
runs with its min–max, and every ratio is taken between medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
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


def figures(r: dict) -> dict:
    """One run's figures: latency to the first epoch, the median epoch
    (epoch-end to epoch-end, epochs 2+), the median overhead outside Keras's
    epoch, peak memory."""
    ends, times = r["epoch_ends"], r["epoch_times"]
    periods = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    overheads = [max(0.0, ends[i] - ends[i - 1] - times[i]) for i in range(1, len(ends))]
    epoch = statistics.median(periods or times)  # one timed pass (the loader): its duration
    overhead = statistics.median(overheads) if overheads else 0.0
    return {
        "start_to_first_epoch_s": ends[0] - r["started"],
        "epoch_s": epoch,
        "overhead_s": overhead,
        "overhead_pct": 100 * overhead / epoch,
        "driver_peak_mb": r["driver_peak_rss_mb"],
        "worker_peak_mb": r["worker_peak_rss_mb"] or None,
        "workers_rss_mb": r.get("workers_rss_mb") or None,
        "workers_pss_mb": r.get("workers_pss_mb") or None,
    }


FIGURES = ("start_to_first_epoch_s", "epoch_s", "overhead_s", "overhead_pct", "driver_peak_mb", "worker_peak_mb",
           "workers_rss_mb", "workers_pss_mb")


def summarize(results: list[dict]) -> dict:
    """Figures of one way at one worker count over its repeats: each figure's
    median (under its own name) and spread (`<name>_min`, `<name>_max`)."""
    runs = [figures(r) for r in results]
    first = results[0]
    row = {"way": first["way"], "workers": first["workers"], "runs": len(runs)}
    for name in FIGURES:
        values = [run[name] for run in runs if run[name] is not None]
        row[name] = statistics.median(values) if values else None
        row[f"{name}_min"] = min(values) if values else None
        row[f"{name}_max"] = max(values) if values else None
    # Kept under their former names: the spread of the epoch over the repeats' medians.
    row["epoch_min_s"], row["epoch_max_s"] = row["epoch_s_min"], row["epoch_s_max"]
    row["samples_per_s"] = first["samples_per_epoch"] / row["epoch_s"]
    row["final_val_loss"] = statistics.median(r["final_val_loss"] for r in results) \
        if all(r["final_val_loss"] is not None for r in results) else None
    return row


def _spread(row: dict, name: str, fmt: str) -> str:
    if row[name] is None:
        return "–"
    text = format(row[name], fmt)
    if row["runs"] > 1:
        text += f" [{format(row[name + '_min'], fmt)}–{format(row[name + '_max'], fmt)}]"
    return text


def table(rows: list[dict]) -> str:
    lines = ["| way | workers | first epoch after (s) | epoch (s) | samples/s | overhead/epoch (%) "
             "| driver MB | worker MB | workers' summed MB (RSS / PSS) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["way"] == "loader":
            continue
        summed = "–"
        if r["workers_rss_mb"]:
            summed = f"{_spread(r, 'workers_rss_mb', '.0f')} / {_spread(r, 'workers_pss_mb', '.0f')}"
        lines.append(
            f"| {r['way']} | {r['workers']} | {_spread(r, 'start_to_first_epoch_s', '.1f')} | "
            f"{_spread(r, 'epoch_s', '.2f')} | {r['samples_per_s']:.0f} | {_spread(r, 'overhead_pct', '.1f')} | "
            f"{_spread(r, 'driver_peak_mb', '.0f')} | {_spread(r, 'worker_peak_mb', '.0f')} | {summed} |"
        )
    return "\n".join(lines)


WORKER_PEAK_MB = 1536  # 1.5 GiB, as ru_maxrss counts


def targets(by: dict, workers: list[int]) -> list[dict]:
    """Issue 17's targets with the figures of this run (medians). A target
    whose rows were not run (`--quick` has no tuned recipe) is left out."""
    checks = []

    def add(name, figure, limit, unit=""):
        if figure is not None:
            checks.append({"target": name, "figure": figure, "limit": limit, "unit": unit, "met": figure <= limit})

    def epoch(way, w):
        row = by.get((way, w))
        return row["epoch_s"] if row else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    plain = epoch("plain", 1)
    limits = {1: {"ray_recipe": None, "plain": 0.5, "ray_recipe_tuned": 1.05},
              2: {"ray_recipe": 0.35, "plain": 8.0, "ray_recipe_tuned": 1.03}}
    for w in workers:
        mine = epoch("orchestra", w)
        for way, limit in limits.get(w, {}).items():
            if limit is not None:
                other = plain if way == "plain" else epoch(way, w)
                add(f"{w} worker(s): orchestra / {way} epoch", ratio(mine, other), limit, "×")
        row = by.get(("orchestra", w))
        if row is None:
            continue
        add(f"{w} worker(s): coordinator overhead, % of an epoch", row["overhead_pct"], 2.0, " %")
        add(f"{w} worker(s): worker peak memory, MB", row["worker_peak_mb"], WORKER_PEAK_MB, " MB")
        recipe = by.get(("ray_recipe", w))
        if recipe is not None:
            add(f"{w} worker(s): first epoch after, orchestra − recipe (s)",
                row["start_to_first_epoch_s"] - recipe["start_to_first_epoch_s"], 0.0, " s")
    return checks


def check_text(checks: list[dict]) -> str:
    lines = ["| target | figure | limit | |", "| --- | ---: | ---: | --- |"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['figure']:.3g}{c['unit']} | ≤ {c['limit']:g}{c['unit']} | "
                     f"{'met' if c['met'] else 'MISSED'} |")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"


def measured_at() -> str:
    """The commit the figures were measured at, and whether the tree differed from it."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if git("status", "--porcelain").strip():
        commit += " + uncommitted changes"
    return commit


def write_table(path: Path, text: str) -> bool:
    """Replace what lies between the markers of `path` with `text`; touch
    nothing else. False (and nothing written) when the markers are missing."""
    try:
        document = path.read_text()
    except OSError:
        return False
    start, end = document.find(TABLE_START), document.find(TABLE_END)
    if start < 0 or end < start:
        return False
    path.write_text(document[: start + len(TABLE_START)] + "\n" + text.rstrip("\n") + "\n" + document[end:])
    return True


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
    parser.add_argument("--repeat", "--repeats", dest="repeat", type=int,
                        help="runs of each way, interleaved (default: 3, with --quick 1)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--mnist", default=os.path.join(os.environ.get("ORCHESTRA_DATASETS", "../shared/datasets"),
                                                        "mnist.npz"))
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--table", metavar="MD", help="write the table between the bench:table markers of this file "
                        "(default: docs/performance.md for a full run, none with --quick)")
    parser.add_argument("--no-table", action="store_true", help="write no table")
    parser.add_argument("--check", action="store_true",
                        help="print issue 17's targets beside the figures; exit 1 when one is missed")
    parser.add_argument("--ablation", action="store_true",
                        help="instead: orchestra on 2 workers with each performance default turned off in turn")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    if args.ablation:
        args.repeats = repeat
        return ablation(args)

    base = Workload(mnist=str(Path(args.mnist).resolve()), **(QUICK if args.quick else {}))
    if args.epochs:
        base.epochs = args.epochs
    plan = [("plain", base)]
    for workers in args.workers:
        work = Workload(**{**asdict(base), "workers": workers})
        plan.append(("recipe", work))
        if not args.quick:
            plan.append(("recipe", Workload(**{**asdict(work), "tuned": True})))
        plan.append(("orchestra_way", work))
    runs: dict[tuple, list[dict]] = {}
    for k in range(repeat):  # interleaved: a slow spell of the machine spreads over every way
        for module, work in plan:
            result = run_way(module, work, k)
            runs.setdefault((result["way"], result["workers"]), []).append(result)
    for workers in args.workers:
        result = run_way("loader", Workload(**{**asdict(base), "workers": workers}), 0)
        runs[(result["way"], result["workers"])] = [result]
    rows = [summarize(results) for results in runs.values()]

    by = {(r["way"], r["workers"]): r for r in rows}
    plain = by["plain", 1]["epoch_s"]
    ratios = {
        "orchestra_vs_ray": {str(w): by["orchestra", w]["epoch_s"] / by["ray_recipe", w]["epoch_s"] for w in args.workers},
        "orchestra_vs_plain": {str(w): by["orchestra", w]["epoch_s"] / plain for w in args.workers},
    }
    if not args.quick:
        ratios["orchestra_vs_ray_tuned"] = {
            str(w): by["orchestra", w]["epoch_s"] / by["ray_recipe_tuned", w]["epoch_s"] for w in args.workers}
    loader = {str(w): {"delivers_samples_per_s": by["loader", w]["samples_per_s"],
                       "consumes_samples_per_s": by["orchestra", w]["samples_per_s"] / w} for w in args.workers}
    checks = targets(by, args.workers)

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = [f"Measured at commit {measured_at()} on {when}: the Fashion-MNIST MLP (Dense(100) → Dense(10)) on MNIST, {base.train} train / "
              f"{base.validation} validation, global batch {base.batch_size}, {base.epochs} epochs, "
              f"{os.cpu_count()} cores; each way run {repeat}× interleaved, figures as median [min–max] over "
              f"the runs, ratios from the medians (`python -m bench{' --quick' if args.quick else ''} "
              f"--workers {' '.join(map(str, args.workers))} --repeat {repeat}`).", "", table(rows), ""]
    for w in args.workers:
        tuned = (f", orchestra / tuned recipe = {ratios['orchestra_vs_ray_tuned'][str(w)]:.2f}"
                 if "orchestra_vs_ray_tuned" in ratios else "")
        report.append(f"- {w} worker(s): orchestra / recipe = {ratios['orchestra_vs_ray'][str(w)]:.2f}{tuned}, "
                      f"orchestra / plain = {ratios['orchestra_vs_plain'][str(w)]:.2f}; the input pipeline "
                      f"delivers {loader[str(w)]['delivers_samples_per_s']:.0f} samples/s per worker against "
                      f"{loader[str(w)]['consumes_samples_per_s']:.0f} consumed")
    if checks:
        report += ["", "Issue 17's targets:", "", check_text(checks)]
    text = "\n".join(report)
    print(text)

    table_path = None if args.no_table else (Path(args.table) if args.table else
                                             None if args.quick else ROOT / "docs" / "performance.md")
    if table_path is not None:
        if write_table(table_path, text):
            print(f"\nwritten between the bench:table markers of {table_path}")
        else:
            print(f"\n{table_path} has no {TABLE_START} … {TABLE_END} markers: nothing written", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"workload": asdict(base), "repeat": repeat, "results": rows, "ratios": ratios, "loader": loader,
             "targets": checks}, indent=1))
    if args.check and not all(c["met"] for c in checks):
        missed = ", ".join(c["target"] for c in checks if not c["met"])
        print(f"\nmissed: {missed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
