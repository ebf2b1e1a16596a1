"""The `callbacks` list: Keras's class and argument names in Keras's
serialized form (and the short form), what each refuses and why, the old
object form refused with its equivalent list, plugins by registered name,
and the order the driver runs them in."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, small_spec, write_spec
from pydantic import ValidationError

from orchestra.coordinator import (
    Checkpoint,
    CoordinatorCallback,
    CSVLogger,
    EarlyStopping,
    EpochResult,
    LearningRateScheduler,
    ReduceLROnPlateau,
    TensorBoard,
    TerminateOnNaN,
)
from orchestra.coordinator.coordinator import Coordinator
from orchestra.coordinator.protocol import (
    Decision,
    EpochReports,
    WorkerReport,
    WorkerStarted,
)
from orchestra.driver import callbacks as driver_callbacks
from orchestra.driver.callbacks import make_callbacks
from orchestra.spec import (
    JobSpec,
    ModelCheckpointSpec,
    TensorBoardSpec,
    config_of,
    problems_of,
)
from orchestra.spec import callbacks as spec_callbacks
from orchestra.storage.folders import Storage
from orchestra.storage.record import JobRecord, JobState


def problems(callbacks, **overrides) -> dict[str, str]:
    try:
        JobSpec.model_validate(small_spec(callbacks=callbacks, **overrides))
    except ValidationError as exc:
        return dict(problems_of(exc, JobSpec))
    return {}


def spec_with(callbacks, **overrides) -> JobSpec:
    return JobSpec.model_validate(small_spec(callbacks=callbacks, **overrides))


def test_the_short_form_is_the_long_form():
    long = spec_with([{"class_name": "EarlyStopping", "config": {"patience": 3, "monitor": "val_accuracy"}},
                      {"class_name": "TerminateOnNaN"}])
    short = spec_with([{"type": "EarlyStopping", "patience": 3, "monitor": "val_accuracy"}, {"type": "TerminateOnNaN"}])
    assert long.callbacks == short.callbacks
    assert JobSpec.model_validate(long.model_dump(mode="json")).callbacks == long.callbacks  # a record's spec reads back


def test_without_callbacks_tensorboard_runs_and_a_list_is_exactly_what_runs(tmp_path):
    spec = JobSpec.model_validate({key: value for key, value in small_spec().items() if key != "callbacks"})
    assert [entry.class_name for entry in spec.callbacks] == ["TensorBoard"]
    assert [type(cb) for cb in built(spec, tmp_path)] == [TensorBoard]
    assert built(spec_with([{"class_name": "EarlyStopping"}]), tmp_path).__len__() == 1
    assert built(spec_with([]), tmp_path) == []


def built(spec: JobSpec, tmp_path) -> list[CoordinatorCallback]:
    return make_callbacks(spec, lambda epoch: tmp_path / "job" / "checkpoints" / f"epoch-{epoch:04d}",
                          tmp_path / "job" / "tensorboard", 2, "summary")


@pytest.mark.parametrize("old,listed", [
    ({"early_stopping": {"patience": 2}, "checkpoint": {"keep": 1}},
     [{"class_name": "EarlyStopping", "config": {"patience": 2}},
      {"class_name": "ModelCheckpoint", "config": {"keep": 1}}, {"class_name": "TensorBoard", "config": {}}]),
    ({"tensorboard": None}, []),
    ({"tensorboard": {"update_freq": "batch"}, "early_stopping": None},
     [{"class_name": "TensorBoard", "config": {"update_freq": "batch"}}]),
])
def test_the_old_object_form_is_refused_with_the_list_that_says_the_same(old, listed):
    found = problems(old)
    assert list(found) == ["callbacks"]
    assert "is a list of callbacks now" in found["callbacks"]
    shown = json.loads(found["callbacks"].split("reads as: ", 1)[1])
    assert shown == listed
    assert problems(shown) == {}  # the list it shows is a valid spec


@pytest.mark.parametrize("callbacks,field,expected", [
    ([{"class_name": "EarlyStoping"}], "callbacks.0.class_name", "did you mean 'EarlyStopping'"),
    ([{"class_name": "LambdaCallback", "config": {}}], "callbacks.0.class_name", "allowed: EarlyStopping, ModelCheckpoint"),
    ([{"type": "EarlyStopping", "patiense": 3}], "callbacks.0.config.patiense", "unknown field; allowed: monitor"),
    ([{"type": "EarlyStopping", "patience": -1}], "callbacks.0.config.patience", "greater than or equal to 0"),
    ([{"type": "EarlyStopping", "monitor": "val_acc"}], "callbacks.0.config.monitor",
     "allowed: loss, accuracy, val_loss, val_accuracy"),
    ([{"type": "ModelCheckpoint", "filepath": "../escape.keras"}], "callbacks.0.config.filepath", "leaves"),
    ([{"type": "ModelCheckpoint", "filepath": "/etc/model.keras"}], "callbacks.0.config.filepath", "no absolute path"),
    ([{"type": "ModelCheckpoint", "filepath": "~/model.keras"}], "callbacks.0.config.filepath", "no absolute path"),
    ([{"type": "ModelCheckpoint", "filepath": "a/../../x.keras"}], "callbacks.0.config.filepath", "leaves"),
    ([{"type": "ModelCheckpoint", "filepath": "epoch-0003/model.keras"}], "callbacks.0.config.filepath",
     "epoch-NNNN"),
    ([{"type": "ModelCheckpoint", "filepath": "m-{val_los:.2f}.keras"}], "callbacks.0.config.filepath",
     "{val_los} is not a placeholder this job fills; allowed: epoch, loss"),
    ([{"type": "ModelCheckpoint", "filepath": "m-{epoch:.2q}.keras"}], "callbacks.0.config.filepath",
     "cannot be formatted"),
    ([{"type": "ModelCheckpoint", "filepath": "model.h5"}], "callbacks.0.config.filepath", "must end in '.keras'"),
    ([{"type": "ModelCheckpoint", "filepath": "w.keras", "save_weights_only": True}], "callbacks.0.config.filepath",
     "must end in '.weights.h5'"),
    ([{"type": "ModelCheckpoint", "save_freq": 100}], "callbacks.0.config.save_freq",
     "a save every N batches has nothing to decide on"),
    ([{"type": "TensorBoard", "log_dir": "logs/fit"}], "callbacks.0.config.log_dir", "remove log_dir"),
    ([{"type": "TensorBoard", "update_freq": 0}], "callbacks.0.config.update_freq", "greater than or equal to 1"),
    ([{"type": "BackupAndRestore", "backup_dir": "/tmp/backup"}], "callbacks.0.config.backup_dir",
     "the job's own checkpoints"),
    ([{"type": "CSVLogger", "filename": "../../log.csv"}], "callbacks.0.config.filename", "leaves"),
    ([{"type": "CSVLogger", "filename": "/tmp/log.csv"}], "callbacks.0.config.filename", "no absolute path"),
    ([{"type": "ReduceLROnPlateau", "factor": 1.5}], "callbacks.0.config.factor", "less than 1"),
    ([{"type": "LearningRateScheduler", "schedule": {"class_name": "ExponentialDecai", "config": {}}}],
     "callbacks.0.config.schedule.class_name", "did you mean 'ExponentialDecay'"),
    ([{"type": "LearningRateScheduler", "schedule": {"class_name": "ExponentialDecay",
                                                      "config": {"initial_learning_rate": 0.1, "decay_steps": 2}}}],
     "callbacks.0.config.schedule.config.decay_rate", "required"),
    ([{"type": "LearningRateScheduler", "schedule": "lambda epoch, lr: lr * 0.9"}], "callbacks.0.config.schedule",
     "valid dictionary"),
    ([{"type": "TerminateOnNaN"}, {"type": "TerminateOnNaN"}], "callbacks.1.class_name", "listed twice"),
])
def test_a_bad_callback_is_named_with_what_is_allowed(callbacks, field, expected):
    found = problems(callbacks)
    assert field in found, found
    assert expected in found[field], found[field]


@pytest.mark.parametrize("callbacks,line", [
    ({"early_stopping": {"patience": 2}}, 'callbacks: is a list of callbacks now, as Keras takes them; this object '
                                          'reads as: [{"class_name": "EarlyStopping", "config": {"patience": 2}}, '
                                          '{"class_name": "TensorBoard", "config": {}}]'),
    ([{"type": "ModelCheckpoint", "filepath": "../../outside.keras"}], "callbacks.0.config.filepath: leaves"),
    ([{"class_name": "EarlyStopp"}], "callbacks.0.class_name: 'EarlyStopp' is not a callback orchestra knows"),
])
def test_the_cli_refuses_with_one_line_naming_the_field(tmp_path, callbacks, line):
    spec = write_spec(tmp_path / "bad.json", small_spec(callbacks=callbacks))
    result = run_cli("validate", spec, "--storage", tmp_path / "storage")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [text.strip() for text in result.stderr.splitlines() if text.strip()]
    assert [text for text in lines if text.startswith("callbacks")] == [next(t for t in lines if t.startswith(line))]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "storage").exists()


def test_a_registered_plugin_is_accepted_with_plain_arguments_and_built_by_the_plugin_module(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_callbacks, "registered_callbacks", lambda: {"epoch_logger": "pkg.mod:EpochLogger"})
    spec = spec_with([{"class_name": "epoch_logger", "config": {"every": 2, "tags": ["a", None], "nested": {"b": 1.5}}},
                      {"type": "EarlyStopping"}])
    assert spec.callbacks[0].is_plugin and spec.callbacks[0].config == {"every": 2, "tags": ["a", None],
                                                                       "nested": {"b": 1.5}}
    made = []

    def plugin_callback(name, config, field):
        made.append((name, config, field))
        return CoordinatorCallback()

    monkeypatch.setattr(driver_callbacks, "plugin_callback", plugin_callback)
    callbacks = built(spec, tmp_path)
    assert made == [("epoch_logger", {"every": 2, "tags": ["a", None], "nested": {"b": 1.5}}, "callbacks.0")]
    assert [type(cb) for cb in callbacks] == [CoordinatorCallback, EarlyStopping]


def test_an_unknown_name_lists_the_built_ins_and_the_registered_with_the_close_match(monkeypatch):
    monkeypatch.setattr(spec_callbacks, "registered_callbacks",
                        lambda: {"epoch_logger": "pkg.mod:EpochLogger", "train_summary": "pkg.mod:Summary"})
    found = problems([{"class_name": "epoch_loger"}])["callbacks.0.class_name"]
    assert "ModelCheckpoint" in found and "epoch_logger, train_summary" in found
    assert "did you mean 'epoch_logger'" in found


@pytest.mark.parametrize("config", [{"f": {"class_name": "x", "obj": object()}}, {"deep": [[[[[[[[[[1]]]]]]]]]]},
                                    {"inf": float("inf")}, "a string"])
def test_a_plugins_arguments_must_be_plain_values(monkeypatch, config):
    monkeypatch.setattr(spec_callbacks, "registered_callbacks", lambda: {"epoch_logger": "pkg.mod:EpochLogger"})
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(small_spec(callbacks=[{"class_name": "epoch_logger", "config": config}]))
    assert "callbacks.0.config" in dict(problems_of(info.value, JobSpec))


def test_the_driver_runs_the_list_in_order_schedulers_then_loggers_last(tmp_path):
    spec = spec_with([
        {"type": "TensorBoard"}, {"type": "CSVLogger"}, {"type": "EarlyStopping"},
        {"type": "LearningRateScheduler", "schedule": {"class_name": "PiecewiseConstantDecay",
                                                       "config": {"boundaries": [3], "values": [0.1, 0.01]}}},
        {"type": "ReduceLROnPlateau"}, {"type": "TerminateOnNaN"}, {"type": "ModelCheckpoint", "filepath": "b.keras"},
    ])
    callbacks = built(spec, tmp_path)
    assert [type(cb) for cb in callbacks] == [EarlyStopping, ReduceLROnPlateau, TerminateOnNaN, Checkpoint,
                                              LearningRateScheduler, TensorBoard, CSVLogger]
    assert callbacks[-1].path == tmp_path / "job" / "training.log"


@pytest.mark.parametrize("callbacks,max_failures,keep", [
    ([{"type": "EarlyStopping"}], 1, 1),                    # restartable: a checkpoint of every epoch, keeping 1
    ([{"type": "BackupAndRestore"}], 0, 1),                 # what BackupAndRestore maps to
    ([{"type": "ModelCheckpoint", "keep": 4}], 1, 4),      # the listed one, not a second
    ([{"type": "EarlyStopping"}], 0, None),
])
def test_a_restartable_job_gets_a_checkpoint_of_every_epoch(tmp_path, callbacks, max_failures, keep):
    spec = spec_with(callbacks, **{"scaling.max_failures": max_failures})
    checkpoints = [cb for cb in built(spec, tmp_path) if isinstance(cb, Checkpoint)]
    assert [cb.keep for cb in checkpoints] == ([keep] if keep else [])
    if keep == 1:
        assert not checkpoints[0].save_best_only and checkpoints[0].monitor.name == spec.default_monitor


def test_tensorboard_update_freq_takes_batch_or_every_n():
    for freq, every in (("epoch", None), ("batch", 1), (25, 25)):
        spec = spec_with([{"type": "TensorBoard", "update_freq": freq}])
        assert config_of(spec.callbacks, TensorBoardSpec).batch_every == every
    assert config_of(spec_with([]).callbacks, ModelCheckpointSpec) is None


@pytest.fixture()
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "storage")


def epoch(number: int, **logs: float) -> EpochReports:
    return EpochReports(0, number, tuple(WorkerReport(rank, number, dict(logs), 1.0, 10) for rank in (0, 1)))


def coordinator_with(storage: Storage, callbacks: list[CoordinatorCallback]) -> Coordinator:
    record = JobRecord(job_id="job-1", name="job", workers=2, spec={"fit": {"epochs": 10}})
    storage.create_job_dir("job-1")
    storage.write_record(record)
    coordinator = Coordinator(record, storage, callbacks)
    coordinator.handle(WorkerStarted(0, 1))
    coordinator.handle(WorkerStarted(1, 2))
    return coordinator


def test_terminate_on_nan_fails_the_job_naming_the_metric_and_the_epoch(storage):
    checkpoint = Checkpoint(lambda number: storage.checkpoint_dir("job-1", number), monitor="loss")
    coordinator = coordinator_with(storage, [TerminateOnNaN(), checkpoint])
    assert not coordinator.handle(epoch(1, loss=0.5)).stop
    decision = coordinator.handle(epoch(2, loss=float("nan")))
    assert decision.stop and not decision.finishes and decision.checkpoint is None  # nothing of it is kept
    record = storage.read_record("job-1")
    assert record.state is JobState.FAILED
    assert record.reason == "TerminateOnNaN: loss is nan at epoch 2"


def test_the_loggers_write_what_plugins_add(storage):
    class Adds(CoordinatorCallback):
        def on_epoch_end(self, result: EpochResult, decision) -> None:
            result.add_scalar("gap", result.metrics["val_loss"] - result.metrics["loss"])

    csv = CSVLogger(storage.job_dir("job-1") / "training.log")
    coordinator = coordinator_with(storage, [Adds(), csv])
    coordinator.handle(epoch(1, loss=0.5, val_loss=0.75))
    assert csv.path.read_text().splitlines() == ["epoch,gap,loss,val_loss", "0,0.25,0.5,0.75"]
    assert storage.read_history("job-1")[0]["gap"] == 0.25


def test_the_learning_rate_decided_travels_with_the_checkpoint(storage):
    checkpoint = Checkpoint(lambda number: storage.checkpoint_dir("job-1", number), monitor="val_loss")
    coordinator = coordinator_with(storage, [ReduceLROnPlateau(patience=0, factor=0.5), checkpoint])
    coordinator.handle(epoch(1, val_loss=0.5, learning_rate=0.1))
    decision = coordinator.handle(epoch(2, val_loss=0.6, learning_rate=0.1))
    assert decision.learning_rate == pytest.approx(0.05)
    assert decision.checkpoint.state["learning_rate"] == decision.learning_rate



@pytest.mark.parametrize("callback", [{"type": "ReduceLROnPlateau"}, {"type": "LearningRateScheduler", "schedule": {
    "class_name": "PiecewiseConstantDecay", "config": {"boundaries": [2], "values": [0.1, 0.01]}}}])
def test_a_rate_setting_callback_is_refused_when_the_optimizers_rate_is_a_schedule(callback):
    schedule = {"class_name": "ExponentialDecay",
                "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9}}
    found = problems([callback], **{"compile.optimizer": {"class_name": "SGD", "config": {"learning_rate": schedule}}})
    assert "compile.optimizer's learning_rate is a schedule" in found["callbacks.0.class_name"]
    assert problems([callback], **{"compile.optimizer": {"class_name": "SGD", "config": {"learning_rate": 0.1}}}) == {}


def test_tensorboard_writes_every_nth_batch_and_the_scalars_callbacks_add(tmp_path):
    from conftest import tensorboard_steps

    board = TensorBoard(tmp_path, update_freq=3)
    for number in (1, 2):
        result = EpochResult(number, {"loss": 0.5, "val_loss": 0.6}, 1.0, 10.0, batch_losses=[0.1] * 5, steps=5)
        result.add_scalar("gap", 0.1)
        board.on_epoch_end(result, Decision())
    board.on_train_end({})
    assert tensorboard_steps(tmp_path / "train", "batch_loss") == [3, 6, 9]
    assert tensorboard_steps(tmp_path / "train", "epoch_gap") == [1, 2]
