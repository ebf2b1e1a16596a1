"""The seeds' figure, from job records: loss on the left axis, accuracy on
the right, train and validation, the best and the early-stop epoch marked."""

from __future__ import annotations

import os
from pathlib import Path

from orchestra.errors import FieldError
from orchestra.storage.record import JobRecord


def accuracy_key(history: list[dict[str, float]]) -> str | None:
    """The first accuracy-like metric the job logged (`accuracy`, `acc`, …)."""
    keys = history[0].keys() if history else ()
    return next((k for k in keys if not k.startswith("val_") and ("acc" in k)), None)


def plot_jobs(records: list[JobRecord], output: str | os.PathLike) -> Path:
    """One panel per job, side by side; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(records), figsize=(7 * len(records), 4.5), squeeze=False)
    for axis, record in zip(panels[0], records):
        _panel(axis, record)
    figure.tight_layout()
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=100)
    except OSError as exc:
        raise FieldError("--output", f"cannot write {output}: {exc.strerror or exc}") from None
    plt.close(figure)
    return output


def _panel(loss_axis, record: JobRecord) -> None:
    history = record.history
    epochs = [h["epoch"] for h in history]
    loss_axis.set_title(f"{record.job_id} ({record.state.value})", fontsize=9)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    lines = []
    for key, style, label in (("loss", "-", "train loss"), ("val_loss", "--", "validation loss")):
        points = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
        if points:
            lines += loss_axis.plot(*zip(*points), style, color="tab:blue", label=label)
    metric = accuracy_key(history)
    if metric:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.set_ylabel(metric)
        for key, style, label in ((metric, "-", f"train {metric}"), (f"val_{metric}", "--", f"validation {metric}")):
            points = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
            if points:
                lines += accuracy_axis.plot(*zip(*points), style, color="tab:orange", label=label)
    if record.best_epoch:
        lines.append(loss_axis.axvline(record.best_epoch, color="tab:green", linestyle=":",
                                       label=f"best epoch {record.best_epoch} ({record.monitor})"))
    if record.stopped_epoch:
        lines.append(loss_axis.axvline(record.stopped_epoch, color="tab:red", linestyle="-.",
                                       label=f"early stop, epoch {record.stopped_epoch}"))
    if lines:
        loss_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
