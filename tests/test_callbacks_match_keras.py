"""Driver-side callbacks fed a metric history decide exactly as Keras's own
callbacks do on the same history: the same stop epoch, the same learning
rates, the same checkpoint files, the same CSV rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestra.coordinator import (
    Checkpoint,
    CSVLogger,
    Decision,
    EarlyStopping,
    EpochResult,
    LearningRateScheduler,
    ReduceLROnPlateau,
    TerminateOnNaN,
)
from orchestra.coordinator.learning_rate import scheduled_learning_rate
from orchestra.coordinator.protocol import CheckpointRef
from orchestra.keras_compat import keras
from orchestra.spec.callbacks import ScheduleSpec


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


def float32(value: float) -> float:
    """A rate as the optimizer's float32 variable holds it, read back as Python's float."""
    return float(np.float32(value))


@pytest.fixture()
def compiled_model():
    k = keras()
    model = k.Sequential([k.Input(shape=(1,)), k.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=k.optimizers.SGD(learning_rate=0.1), loss="mse")
    return model


REDUCE_CONFIGS = [
    dict(monitor="val_loss", factor=0.5, patience=2),
    dict(monitor="val_loss", factor=0.1, patience=0),
    dict(monitor="val_loss", factor=0.5, patience=1, cooldown=2),
    dict(monitor="val_loss", factor=0.2, patience=1, min_lr=0.01),
    dict(monitor="val_loss", factor=0.5, patience=2, min_delta=0.02),
    dict(monitor="val_acc", factor=0.5, patience=1),                  # auto -> max
    dict(monitor="val_loss", factor=0.5, patience=1, mode="max", cooldown=1),
]


@pytest.mark.parametrize("config", REDUCE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_reduce_lr_on_plateau_matches_keras(compiled_model, config):
    """Every epoch's rate, as the driver decides it and the workers set it,
    is the one Keras's callback sets on the same history."""
    k = keras()
    for history in histories():
        k.backend.set_value(compiled_model.optimizer.learning_rate, 0.1)
        theirs = k.callbacks.ReduceLROnPlateau(**config)
        theirs.set_model(compiled_model)
        theirs.on_train_begin()
        ours = ReduceLROnPlateau(**config)
        rate = float32(0.1)  # what the workers report: their optimizer's float32 rate
        for epoch, value in enumerate(history, start=1):
            theirs.on_epoch_end(epoch - 1, {config["monitor"]: value})
            decision = Decision()
            ours.on_epoch_end(EpochResult(epoch, {config["monitor"]: value, "learning_rate": rate}, 1.0, 1.0), decision)
            if decision.learning_rate is not None:
                rate = float32(decision.learning_rate)  # every worker sets it
            assert rate == float(k.backend.get_value(compiled_model.optimizer.learning_rate)), (history, epoch)
        assert (ours.wait, ours.cooldown_counter) == (theirs.wait, theirs.cooldown_counter)


def test_reduce_lr_on_plateau_state_round_trip():
    history = [1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6]
    whole, first = ReduceLROnPlateau(patience=1, cooldown=1), ReduceLROnPlateau(patience=1, cooldown=1)
    resumed = ReduceLROnPlateau(patience=1, cooldown=1)
    rates = {}
    for name, callback, epochs in (("whole", whole, range(1, 8)), ("first", first, range(1, 4))):
        rate = 0.1
        for epoch in epochs:
            decision = Decision()
            callback.on_epoch_end(EpochResult(epoch, {"val_loss": history[epoch - 1], "learning_rate": rate}, 1, 1),
                                  decision)
            rate = decision.learning_rate or rate
        rates[name] = rate
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rate = rates["first"]
    for epoch in range(4, 8):
        decision = Decision()
        resumed.on_epoch_end(EpochResult(epoch, {"val_loss": history[epoch - 1], "learning_rate": rate}, 1, 1), decision)
        rate = decision.learning_rate or rate
    assert rate == rates["whole"] < 0.1
    assert resumed.state_dict() == whole.state_dict()


SCHEDULES = [
    {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5}},
    {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5,
                                                  "staircase": True}},
    {"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [2, 5], "values": [0.1, 0.01, 0.001]}},
    {"class_name": "PolynomialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 6, "power": 2.0}},
    {"class_name": "InverseTimeDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 0.5}},
    {"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 8, "alpha": 0.1}},
    {"class_name": "CosineDecayRestarts", "config": {"initial_learning_rate": 0.1, "first_decay_steps": 3}},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["class_name"])
def test_learning_rate_scheduler_matches_keras(compiled_model, schedule):
    """A named schedule gives each epoch the rate Keras's LearningRateScheduler
    gives it with the schedule as its function: the first epoch's set by the
    workers, each later one decided by the driver when the epoch before ends."""
    k = keras()
    function = k.optimizers.schedules.deserialize(schedule)
    theirs = k.callbacks.LearningRateScheduler(lambda epoch, rate: float(function(epoch)))
    theirs.set_model(compiled_model)
    spec = ScheduleSpec.model_validate(schedule)
    ours = LearningRateScheduler(spec)
    rate = scheduled_learning_rate(spec, 0)  # the workers', before the first epoch
    for epoch in range(1, 11):
        theirs.on_epoch_begin(epoch - 1)
        assert float32(rate) == float(k.backend.get_value(compiled_model.optimizer.learning_rate)), epoch
        decision = Decision()
        ours.on_epoch_end(EpochResult(epoch, {"loss": 1.0, "learning_rate": rate}, 1.0, 1.0), decision)
        rate = decision.learning_rate


@pytest.mark.parametrize("template,weights_only,save_best_only", [
    ("m-{epoch:02d}-{val_loss:.3f}.weights.h5", True, True),
    ("m-{epoch:03d}.weights.h5", True, False),
    ("best.weights.h5", True, True),                              # one file, overwritten, as in Keras
    ("sub/e{epoch}-{loss:.2f}.weights.h5", True, True),
])
def test_checkpoint_filepath_names_the_files_keras_names(tmp_path, marker_model, template, weights_only,
                                                         save_best_only):
    """The files a `filepath` template publishes are those Keras's
    ModelCheckpoint writes on the same history, holding the same epoch."""
    k = keras()
    for n, history in enumerate(list(histories())[:12]):
        keras_dir, ours_dir = tmp_path / f"keras{n}", tmp_path / f"ours{n}" / "checkpoints"
        theirs = k.callbacks.ModelCheckpoint(str(keras_dir / template), monitor="val_loss",
                                             save_best_only=save_best_only, save_weights_only=weights_only)
        theirs.set_model(marker_model)
        ours = Checkpoint(lambda epoch: ours_dir / f"epoch-{epoch:04d}", monitor="val_loss",
                          save_best_only=save_best_only, save_weights_only=weights_only, keep=1, filepath=template)
        for epoch, value in enumerate(history, start=1):
            logs = {"loss": value + 0.1, "val_loss": value}
            marker_model.set_weights([np.array([[float(epoch)]], np.float32)])
            theirs.on_epoch_end(epoch - 1, logs)
            decision = Decision()
            ours.on_epoch_end(EpochResult(epoch, logs, 1.0, 1.0), decision)
            if decision.checkpoint is not None:  # what the chief does: save, publish, tell the driver
                folder = Path(decision.checkpoint.directory)
                folder.mkdir(parents=True)
                marker_model.save_weights(str(folder / "model.weights.h5"))
                ours.on_checkpoint_saved(CheckpointRef(epoch, str(folder)))
        keras_files = sorted(str(p.relative_to(keras_dir)) for p in keras_dir.rglob("*.h5"))
        our_files = sorted(str(p.relative_to(ours_dir)) for p in ours_dir.rglob("*.h5")
                           if not p.relative_to(ours_dir).parts[0].startswith("epoch-"))
        assert our_files == keras_files, history
        for name in keras_files:
            marker_model.load_weights(str(keras_dir / name))
            keras_epoch = marker_model.get_weights()[0][0, 0]
            marker_model.load_weights(str(ours_dir / name))
            assert marker_model.get_weights()[0][0, 0] == keras_epoch, name


def test_checkpoint_initial_value_threshold_matches_keras(tmp_path, marker_model):
    for n, history in enumerate(list(histories())[:12]):
        keras_dir = tmp_path / f"keras{n}"
        theirs = keras().callbacks.ModelCheckpoint(str(keras_dir / "e{epoch:03d}.weights.h5"), save_best_only=True,
                                                   save_weights_only=True, initial_value_threshold=0.9)
        theirs.set_model(marker_model)
        ours = Checkpoint(lambda epoch: tmp_path / f"ours{n}" / f"e{epoch:03d}", save_best_only=True,
                          initial_value_threshold=0.9)
        saved = []
        for epoch, value in enumerate(history, start=1):
            theirs.on_epoch_end(epoch - 1, {"val_loss": value})
            decision = Decision()
            ours.on_epoch_end(EpochResult(epoch, {"val_loss": value}, 1.0, 1.0), decision)
            saved += [epoch] if decision.checkpoint is not None else []
        assert saved == sorted(int(p.name[1:4]) for p in keras_dir.glob("*.h5")) if keras_dir.exists() else not saved


def csv_histories():
    yield [{"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7},
           {"loss": 0.4, "accuracy": 0.85, "val_loss": 0.55, "val_accuracy": 0.75}]
    # validation every 2nd epoch: the first row has no val_ keys (Keras adds their columns)
    yield [{"loss": 0.5, "accuracy": 0.8}, {"loss": 0.4, "accuracy": 0.85, "val_loss": 0.6, "val_accuracy": 0.7},
           {"loss": 0.3, "accuracy": 0.9}]
    yield [{"loss": 1 / 3, "learning_rate": 0.1, "my_scalar": 2.5e-7}, {"loss": float("nan"), "learning_rate": 0.05,
                                                                        "my_scalar": 1e20}]


@pytest.mark.parametrize("separator", [",", ";"])
def test_csv_logger_writes_the_rows_keras_writes(tmp_path, separator):
    for n, history in enumerate(csv_histories()):
        keras_path, our_path = tmp_path / f"keras{n}.csv", tmp_path / f"ours{n}" / "training.log"
        theirs = keras().callbacks.CSVLogger(str(keras_path), separator=separator)
        theirs.on_train_begin()
        ours = CSVLogger(our_path, separator=separator)
        for epoch, logs in enumerate(history, start=1):
            theirs.on_epoch_end(epoch - 1, dict(logs))
            metrics = {k: v for k, v in logs.items() if k != "my_scalar"}
            result = EpochResult(epoch, metrics, 1.0, 1.0)
            if "my_scalar" in logs:
                result.add_scalar("my_scalar", logs["my_scalar"])  # a plugin's: the logger writes it too
            ours.on_epoch_end(result, Decision())
        theirs.on_train_end()
        assert our_path.read_bytes() == keras_path.read_bytes()


def test_csv_logger_rolled_back_keeps_each_epoch_once(tmp_path):
    path = tmp_path / "training.log"
    logger = CSVLogger(path)
    for epoch in range(1, 5):
        logger.on_epoch_end(EpochResult(epoch, {"loss": 1.0 / epoch}, 1.0, 1.0), Decision())
        if epoch == 2:
            state = json.loads(json.dumps(logger.state_dict()))
    resumed = CSVLogger(path)  # a new driver (orchestra resume) from the checkpoint of epoch 2
    resumed.load_state_dict(state)
    for epoch in range(3, 6):
        resumed.on_epoch_end(EpochResult(epoch, {"loss": 1.0 / epoch}, 1.0, 1.0), Decision())
    rows = path.read_text().splitlines()
    assert rows[0] == "epoch,loss,val_loss"
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2", "3", "4"]


def test_terminate_on_nan_stops_where_keras_does_on_an_epochs_last_batch(marker_model):
    """Keras stops at the first NaN batch loss; when that is an epoch's last
    batch (the loss the epoch ends with), both end after the same epoch."""
    for history in ([1.0, 0.5, float("nan"), 0.3], [1.0, float("inf")], [0.5, 0.4]):
        theirs = keras().callbacks.TerminateOnNaN()
        theirs.set_model(marker_model)
        marker_model.stop_training = False
        keras_epochs = 0
        for epoch, loss in enumerate(history):
            theirs.on_batch_end(0, {"loss": loss})
            keras_epochs = epoch + 1
            if marker_model.stop_training:
                break
        ours, our_epochs, failure = TerminateOnNaN(), 0, None
        for epoch, loss in enumerate(history, start=1):
            decision = Decision()
            ours.on_epoch_end(EpochResult(epoch, {"loss": loss, "val_loss": 0.1}, 1.0, 1.0), decision)
            our_epochs, failure = epoch, decision.failure
            if decision.stop:
                break
        assert our_epochs == keras_epochs
        assert (failure is not None) == (keras_epochs < len(history) or not np.isfinite(history[-1]))
