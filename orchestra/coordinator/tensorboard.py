"""TensorBoard event files for the whole job, written by the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.protocol import Decision
from orchestra.keras_compat import tensorflow


class TensorBoard(CoordinatorCallback):
    """One `train` and one `validation` run under `logdir`, as Keras's
    TensorBoard callback lays them out: `epoch_loss`, `epoch_<metric>`
    (validation values without their `val_` prefix), `epoch_learning_rate`,
    plus `epoch_time_seconds` and `epoch_samples_per_second` and the scalars
    callbacks add (`EpochResult.add_scalar`; so TensorBoard runs after
    them); one point per epoch at step = epoch (counted from 1), flushed
    every epoch so a running job's curves grow. With `update_freq="batch"`,
    `batch_loss` at the global step of every batch too; with an integer N,
    of every Nth global step. The job's own run (the folder itself) holds its
    hyperparameters for TensorBoard's HParams dashboard, the model summary,
    and at the end a summary of the outcome, as text.

    Its writes are optional: if they fail (a full disk), the job goes on
    without them. Its state is the last epoch written: rolled back to a
    checkpoint (a restart, `orchestra resume`), it drops the events of later
    epochs, so the runs continue without duplicate or missing steps.

    Args:
        logdir: the job's TensorBoard folder.
        update_freq: `epoch`, `batch` or an integer N (every Nth batch).
        hparams: hyperparameters to compare jobs by (str, int, float, bool).
        model_summary: the model's summary, shown as text.

    Example:

        >>> import tempfile
        >>> from orchestra.coordinator.base import EpochResult
        >>> from orchestra.coordinator.protocol import Decision
        >>> board = TensorBoard(tempfile.mkdtemp())
        >>> board.on_epoch_end(EpochResult(1, {"loss": 0.5, "val_loss": 0.6}, 1.0, 10.0), Decision())
        >>> board.on_train_end({})
    """

    optional = True

    def __init__(self, logdir: str | Path, update_freq: str | int = "epoch",
                 hparams: dict[str, Any] | None = None, model_summary: str | None = None):
        self.logdir = Path(logdir)
        self.update_freq = update_freq
        self.hparams = hparams or {}
        self.model_summary = model_summary
        self._writers: dict[str, Any] = {}
        self.epoch = 0
        self.steps = 0  # per epoch, the step unit of `batch_loss`

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = tensorflow().summary.create_file_writer(str(self.logdir / run))
        return self._writers[run]

    def on_train_begin(self, job_id: str) -> None:
        from tensorboard.plugins.hparams import api as hp

        if any(self.logdir.glob("events.out.tfevents.*")):
            return  # a resumed job: its hyperparameters and model are there
        tf = tensorflow()
        with self._writer("").as_default():
            if self.hparams:
                hp.hparams(self.hparams, trial_id=job_id)
            if self.model_summary:
                tf.summary.text("model", _preformatted(self.model_summary), step=0)
        self._writers[""].flush()

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        tf = tensorflow()
        self.epoch, self.steps = result.epoch, result.steps or self.steps
        logs = {**result.metrics, **result.scalars}
        train = {k: v for k, v in logs.items() if not k.startswith("val_")}
        train["time_seconds"] = result.epoch_time
        train["samples_per_second"] = result.samples_per_second
        validation = {k[4:]: v for k, v in logs.items() if k.startswith("val_")}
        for run, scalars in (("train", train), ("validation", validation)):
            if not scalars:
                continue
            with self._writer(run).as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(f"epoch_{name}", value, step=result.epoch)
                if run == "train" and self.update_freq != "epoch":
                    every = 1 if self.update_freq == "batch" else int(self.update_freq)
                    first = (result.epoch - 1) * result.steps
                    for i, loss in enumerate(result.batch_losses, start=1):
                        if (first + i) % every == 0:
                            tf.summary.scalar("batch_loss", loss, step=first + i)
            self._writers[run].flush()

    def on_train_end(self, final: dict[str, Any]) -> None:
        rows = [("epochs completed", final.get("epochs_completed")),
                ("stopped epoch", final.get("stopped_epoch")),
                ("best epoch", final.get("best_epoch")),
                (f"best {final.get('monitor')}", final.get("best_value"))]
        rows += [(f"test {name}", value) for name, value in (final.get("test_metrics") or {}).items()]
        table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
        with self._writer("").as_default():
            tensorflow().summary.text("summary", table, step=final.get("epochs_completed") or 0)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to `state`'s epoch: later events of the train and validation
        runs (scalars, batch losses, the workers' histograms) are dropped."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self.epoch, self.steps = state["epoch"], state["steps"]
        for run in ("train", "validation"):
            for path in sorted((self.logdir / run).glob("events.out.tfevents.*")):
                drop_events_after(path, self.epoch, self.epoch * self.steps)

    def record_fields(self) -> dict[str, Any]:
        return {"tensorboard_logdir": str(self.logdir)}


def drop_events_after(path: Path, epoch: int, batch_step: int) -> None:
    """Rewrite an event file without the events past `epoch` (`batch_loss`:
    past the global step `batch_step`), and without a record cut short by a
    killed driver; atomically, and only if needed."""
    from tensorboard.compat.proto.event_pb2 import Event

    tf = tensorflow()
    records, complete = [], True
    try:
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            records.append(bytes(raw))
    except tf.errors.DataLossError:
        complete = False
    kept = []
    for raw in records:
        event = Event.FromString(raw)
        tags = {value.tag for value in event.summary.value}
        limit = batch_step if "batch_loss" in tags else epoch
        if not tags or event.step <= limit:
            kept.append(raw)
    if complete and len(kept) == len(records):
        return
    staging = path.with_name(f".{path.name}.rollback")
    with tf.io.TFRecordWriter(str(staging)) as writer:
        for raw in kept:
            writer.write(raw)
    staging.replace(path)


def _preformatted(text: str) -> str:
    """Markdown that keeps a fixed-width summary's layout."""
    return "\n".join("    " + line for line in text.splitlines())
