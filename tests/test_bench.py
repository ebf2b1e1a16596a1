"""The benchmark keeps working: its tiny configuration runs every way,
writes the JSON and the table between the markers it owns, and checks
issue 17's targets. No timing is asserted in CI; memory is (a regression
that copied the arrays into a graph showed first as gigabytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from bench.__main__ import TABLE_END, TABLE_START, WORKER_PEAK_MB, targets, write_table


@pytest.mark.integration
def test_quick_benchmark_runs_every_way(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    doc = tmp_path / "performance.md"
    doc.write_text(f"before\n{TABLE_START}\nstale table\n{TABLE_END}\nafter\n")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--mnist", str(mnist_dir / "mnist.npz"), "--json", str(out),
         "--table", str(doc)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "BENCH_SCRATCH": str(tmp_path / "scratch")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| way | workers |" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"orchestra_vs_ray", "orchestra_vs_plain"}
    assert set(report["ratios"]["orchestra_vs_ray"]) == {"1", "2"}
    ways = {(row["way"], row["workers"]) for row in report["results"]}
    assert ways == {("plain", 1), ("ray_recipe", 1), ("orchestra", 1), ("loader", 1),
                    ("ray_recipe", 2), ("orchestra", 2), ("loader", 2)}
    for row in report["results"]:
        assert row["epoch_s"] > 0 and row["samples_per_s"] > 0
        assert row["epoch_s_min"] <= row["epoch_s"] <= row["epoch_s_max"]
    # The same workload three ways learns the same thing, roughly.
    losses = [row["final_val_loss"] for row in report["results"] if row["way"] != "loader"]
    assert max(losses) < 1.0
    # The table went between the markers, with the commit, and nothing else changed.
    text = doc.read_text()
    assert text.startswith(f"before\n{TABLE_START}\nMeasured at commit ") and text.endswith(f"{TABLE_END}\nafter\n")
    assert "stale table" not in text and "| orchestra | 2 |" in text
    # Every target this run can judge is judged; memory is not a timing.
    names = {check["target"] for check in report["targets"]}
    assert {"1 worker(s): worker peak memory, MB", "2 worker(s): coordinator overhead, % of an epoch"} <= names
    by = {(row["way"], row["workers"]): row for row in report["results"]}
    for workers in (1, 2):
        assert by["orchestra", workers]["worker_peak_mb"] <= WORKER_PEAK_MB
    assert by["orchestra", 2]["workers_rss_mb"] > by["orchestra", 2]["worker_peak_mb"]  # both workers sampled


def _row(way, workers, epoch, overhead_pct=1.0, worker_mb=1000.0, first=10.0):
    return {"way": way, "workers": workers, "epoch_s": epoch, "overhead_pct": overhead_pct,
            "worker_peak_mb": worker_mb, "start_to_first_epoch_s": first}


def test_targets_are_judged_from_the_medians():
    by = {(r["way"], r["workers"]): r for r in [
        _row("plain", 1, 1.0), _row("ray_recipe", 1, 2.0), _row("ray_recipe_tuned", 1, 0.5),
        _row("orchestra", 1, 0.5, overhead_pct=2.5, first=9.0),
    ]}
    checks = {c["target"]: c for c in targets(by, [1])}
    assert checks["1 worker(s): orchestra / plain epoch"]["met"]              # 0.5 ≤ 0.5
    assert checks["1 worker(s): orchestra / ray_recipe_tuned epoch"]["met"]   # 1.0 ≤ 1.05
    assert not checks["1 worker(s): coordinator overhead, % of an epoch"]["met"]
    assert checks["1 worker(s): first epoch after, orchestra − recipe (s)"]["figure"] == -1.0


def test_the_table_goes_between_the_markers_or_nowhere(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("no markers yet\n")
    assert not write_table(doc, "| table |")
    assert doc.read_text() == "no markers yet\n"
    doc.write_text(f"a\n{TABLE_START}\nold\n{TABLE_END}\nb\n")
    assert write_table(doc, "| new |")
    assert doc.read_text() == f"a\n{TABLE_START}\n| new |\n{TABLE_END}\nb\n"
