"""The benchmark keeps working: its tiny configuration runs every way and
writes the JSON the README describes. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration


def test_quick_benchmark_runs_every_way(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--mnist", str(mnist_dir / "mnist.npz"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env={**__import__("os").environ, "BENCH_SCRATCH": str(tmp_path / "scratch")},
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
    # The same workload three ways learns the same thing, roughly.
    losses = [row["final_val_loss"] for row in report["results"] if row["way"] != "loader"]
    assert max(losses) < 1.0
