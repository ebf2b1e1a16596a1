"""Weight histograms for TensorBoard, written by the chief worker."""

from __future__ import annotations

from pathlib import Path


class WeightHistograms:
    """Weight histograms every `every` epochs, written by the chief: the
    weights live on the workers, so this one TensorBoard write happens there
    (into the job's `train` run, beside the driver's scalars).

    Args:
        logdir: the job's `train` run folder.
        every: epochs between histograms (the spec's `histogram_freq`).
    """

    def __init__(self, logdir: Path, every: int):
        from orchestra.keras_compat import tensorflow

        self.tf = tensorflow()
        self.every = every
        self.writer = self.tf.summary.create_file_writer(str(logdir), filename_suffix=".histograms")

    def write(self, model, epoch: int) -> None:
        if epoch % self.every:
            return
        with self.writer.as_default():
            for weight in model.weights:
                self.tf.summary.histogram(weight.name.replace(":", "_"), weight.numpy(), step=epoch)
        self.writer.flush()
