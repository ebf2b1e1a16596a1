"""The chief's position inside an epoch, sent to the driver about once a
second for progress bars and ETAs: from rank 0 only, fire-and-forget,
never through a collective, so it costs the workers nothing they wait on."""

from __future__ import annotations

import time

from orchestra.coordinator.protocol import StepProgress

INTERVAL_SECONDS = 1.0


def progress_callback(channel, steps: int, samples_per_step: int, interval: float = INTERVAL_SECONDS):
    """A Keras callback that tells `channel` where the epoch is, at most
    once per `interval` seconds (Keras calls it every `steps_per_execution`
    steps)."""
    from orchestra.keras_compat import keras

    class ProgressCallback(keras().callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1
            self.started = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if now - self.last < interval:
                return
            self.last = now
            done = batch + 1
            loss = float(logs["loss"]) if logs and "loss" in logs else None
            channel.progress(StepProgress(self.epoch, done, steps, now - self.started, done * samples_per_step, loss))

    return ProgressCallback()
