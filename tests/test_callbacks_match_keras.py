"""Driver-side callbacks fed a metric history decide exactly as Keras's own
callbacks do on the same history."""

from __future__ import annotations

import numpy as np
import pytest

from orchestra.coordinator import Checkpoint, Decision, EarlyStopping, EpochResult
from orchestra.coordinator.protocol import CheckpointRef
from orchestra.keras_compat import keras


@pytest.fixture(scope="module")
def marker_model():
    """A one-weight model: its weight holds the epoch it was set at, so the
    weights Keras restores tell which epoch they came from."""
    k = keras()
    model = k.Sequential([k.Input(shape=(1,)), k.layers.Dense(1, use_bias=False)])
    return model


def run_keras_early_stopping(model, history: list[float], monitor: str, **kwargs):
    stopper = keras().callbacks.EarlyStopping(monitor=monitor, **kwargs)
    stopper.set_model(model)
    model.stop_training = False
    stopper.on_train_begin()
    epochs_run = 0
    for epoch, value in enumerate(history):
        model.set_weights([np.array([[float(epoch + 1)]], np.float32)])
        stopper.on_epoch_end(epoch, {monitor: value})
        epochs_run = epoch + 1
        if model.stop_training:
            break
    stopper.on_train_end()
    restored = int(model.get_weights()[0][0, 0])
    return stopper, epochs_run, restored


def run_orchestra_early_stopping(history: list[float], monitor: str, **kwargs):
    stopper = EarlyStopping(monitor=monitor, **kwargs)
    weights, snapshot, epochs_run = None, None, 0
    for epoch, value in enumerate(history, start=1):
        weights = epoch
        decision = Decision()
        stopper.on_epoch_end(EpochResult(epoch, {monitor: value}, 1.0, 1.0), decision)
        if decision.snapshot_best_weights:
            snapshot = weights
        epochs_run = epoch
        if decision.stop:
            break
    final = snapshot if snapshot is not None else weights
    return stopper, epochs_run, final


def histories():
    rng = np.random.default_rng(0)
    yield [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.7, 0.71, 0.72, 0.73]
    yield [0.5] * 8                                    # never improves after the first
    yield [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]               # rising
    yield [1.0, 0.99, 0.985, 0.984, 0.9835, 0.98, 0.5]  # tiny improvements (min_delta)
    for _ in range(40):
        walk = np.cumsum(rng.normal(0, 0.05, size=30)) + 1.0
        yield [float(v) for v in walk]


CONFIGS = [
    dict(monitor="val_loss"),
    dict(monitor="val_loss", patience=2),
    dict(monitor="val_loss", patience=3, min_delta=0.01),
    dict(monitor="val_loss", patience=2, restore_best_weights=True),
    dict(monitor="val_loss", patience=2, baseline=0.8),
    dict(monitor="val_loss", patience=1, baseline=0.8, restore_best_weights=True),
    dict(monitor="val_loss", patience=2, start_from_epoch=3),
    dict(monitor="val_loss", patience=2, start_from_epoch=3, restore_best_weights=True),
    dict(monitor="val_accuracy", patience=2),                 # auto -> max
    dict(monitor="val_loss", patience=2, mode="max"),
    dict(monitor="loss", patience=4, min_delta=0.02, mode="min", restore_best_weights=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_early_stopping_matches_keras(marker_model, config):
    monitor = config.pop("monitor")
    try:
        for history in histories():
            keras_cb, keras_epochs, keras_restored = run_keras_early_stopping(marker_model, history, monitor, **config)
            ours, our_epochs, our_final = run_orchestra_early_stopping(history, monitor, **config)
            assert our_epochs == keras_epochs, history
            assert ours.stopped_epoch == (keras_cb.stopped_epoch + 1 if keras_cb.stopped_epoch else 0), history
            assert ours.wait == keras_cb.wait
            if config.get("restore_best_weights"):
                assert our_final == keras_restored, history
            if np.isfinite(keras_cb.best) or config.get("restore_best_weights"):
                assert ours.best_epoch == keras_cb.best_epoch + 1, history
            else:  # nothing monitored improved
                assert ours.best_epoch == 0, history
            assert ours.best == pytest.approx(keras_cb.best)
    finally:
        config["monitor"] = monitor


@pytest.mark.parametrize("monitor,mode", [("val_loss", "auto"), ("val_acc", "auto"), ("val_loss", "max"),
                                          ("loss", "min")])
def test_checkpoint_save_best_only_matches_keras(tmp_path, marker_model, monitor, mode):
    for n, history in enumerate(histories()):
        keras_dir = tmp_path / f"keras{n}"
        keras_dir.mkdir()
        keras_cb = keras().callbacks.ModelCheckpoint(
            str(keras_dir / "e{epoch:03d}.weights.h5"), monitor=monitor, mode=mode,
            save_best_only=True, save_weights_only=True,
        )
        keras_cb.set_model(marker_model)
        ours = Checkpoint(lambda epoch: tmp_path / f"ours{n}" / f"e{epoch:03d}", monitor=monitor, mode=mode,
                          save_best_only=True, keep=100)
        ours_saved = []
        for epoch, value in enumerate(history, start=1):
            keras_cb.on_epoch_end(epoch - 1, {monitor: value})
            decision = Decision()
            ours.on_epoch_end(EpochResult(epoch, {monitor: value}, 1.0, 1.0), decision)
            if decision.checkpoint is not None:
                ours_saved.append(epoch)
        keras_saved = sorted(int(p.name[1:4]) for p in keras_dir.iterdir())
        assert ours_saved == keras_saved, history


def test_checkpoint_retention_keeps_newest_and_best(tmp_path):
    ckpt = Checkpoint(lambda epoch: tmp_path / f"epoch-{epoch}", monitor="val_loss", keep=2)
    values = [0.5, 0.2, 0.4, 0.6, 0.7, 0.3]
    for epoch, value in enumerate(values, start=1):
        decision = Decision()
        ckpt.on_epoch_end(EpochResult(epoch, {"val_loss": value}, 1.0, 1.0), decision)
        path = tmp_path / f"epoch-{epoch}"
        path.mkdir()
        ckpt.on_checkpoint_saved(CheckpointRef(epoch, str(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-2", "epoch-5", "epoch-6"]
    assert ckpt.record_fields()["best_checkpoint"] == str(tmp_path / "epoch-2")


def test_early_stopping_state_round_trip():
    history = [1.0, 0.8, 0.9, 0.95, 0.99, 1.2]
    whole, _, _ = run_orchestra_early_stopping(history, "val_loss", patience=3)
    first = EarlyStopping(patience=3)
    for epoch, value in enumerate(history[:3], start=1):
        first.on_epoch_end(EpochResult(epoch, {"val_loss": value}, 1.0, 1.0), Decision())
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(first.state_dict())
    for epoch, value in enumerate(history[3:], start=4):
        decision = Decision()
        resumed.on_epoch_end(EpochResult(epoch, {"val_loss": value}, 1.0, 1.0), decision)
        if decision.stop:
            break
    assert resumed.stopped_epoch == whole.stopped_epoch == 5
    assert resumed.best_epoch == whole.best_epoch == 2
