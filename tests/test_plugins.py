"""The user's own callbacks: a package registers them under the entry-point
group `orchestra.callbacks`, a spec names them, the driver runs them.

The example package `examples/orchestra_seed_callbacks` (seed 004's two
custom callbacks) is installed with pip, from a copy (the build writes
into its source folder), without the network, into a folder of its own that
goes on this interpreter's path and the CLI processes' PYTHONPATH: the
shared environment is never changed, so a killed run leaves nothing
registered and runs side by side do not uninstall each other's. A second, test-only registration is a folder on
PYTHONPATH holding a module and its `.dist-info` (what pip would write): a
callback that raises, and a class that is not a callback.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_job, run_cli, small_spec, tensorboard_steps, write_spec

from orchestra.coordinator import Decision, EpochResult
from orchestra.coordinator.plugin import PluginCallback, PluginError
from orchestra.errors import FieldError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "orchestra_seed_callbacks"


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def seed_callbacks(tmp_path_factory):
    """The example plugin package, installed into a folder of its own on this
    interpreter's path (`site_of` names the folder, for the CLI processes)."""
    source = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)
    site = tmp_path_factory.mktemp("site")
    installed = pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(source))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("orchestra_seed_callbacks")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("orchestra_seed_callbacks", None)
        importlib.invalidate_caches()


def site_of(package) -> Path:
    """The folder a package installed with `pip install --target` is in."""
    return Path(package.__file__).resolve().parents[1]


BROKEN_MODULE = '''
from orchestra import CoordinatorCallback

class Raises(CoordinatorCallback):
    def __init__(self, at_epoch: int = 2):
        self.at_epoch = at_epoch

    def on_epoch_end(self, result, decision):
        if result.epoch == self.at_epoch:
            raise RuntimeError("the plugin's own bug")

class NotACallback:
    pass
'''


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory):
    """A folder to put on PYTHONPATH that registers `raises` and `not_a_callback`."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "broken_plugins.py").write_text(BROKEN_MODULE)
    info = folder / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[orchestra.callbacks]\nraises = broken_plugins:Raises\nnot_a_callback = broken_plugins:NotACallback\n")
    return folder


def with_path(*folders: Path) -> dict[str, str]:
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [*map(str, folders), os.environ.get("PYTHONPATH")]))}


def test_the_example_package_registers_seed_004s_callbacks(seed_callbacks):
    from orchestra.spec.plugins import registered_callbacks

    registered = registered_callbacks()
    assert registered["epoch_logger"] == "orchestra_seed_callbacks:EpochLogger"
    assert registered["train_summary"] == "orchestra_seed_callbacks:TrainSummary"
    failures, tried = doctest.testmod(seed_callbacks)
    assert tried >= 2 and failures == 0


def test_a_registered_callback_is_built_with_its_arguments_and_checked(seed_callbacks):
    from orchestra.driver.plugins import plugin_callback

    callback = plugin_callback("train_summary", {"monitor": "val_accuracy", "mode": "max"}, "callbacks.1")
    assert isinstance(callback, PluginCallback) and callback.inner.monitor == "val_accuracy"
    with pytest.raises(FieldError) as typo:
        plugin_callback("train_summary", {"monitr": "loss"}, "callbacks.1")
    assert typo.value.field == "callbacks.1.config.monitr"
    assert "it takes: monitor, mode" in str(typo.value) and "did you mean 'monitor'" in str(typo.value)
    with pytest.raises(FieldError) as refused:
        plugin_callback("train_summary", {"mode": "sideways"}, "callbacks.1")
    assert refused.value.field == "callbacks.1.config" and "mode must be 'min' or 'max'" in str(refused.value)
    with pytest.raises(FieldError) as unknown:
        plugin_callback("train_sumary", {}, "callbacks.0")
    assert "registered: " in str(unknown.value) and "did you mean 'train_summary'" in str(unknown.value)


def test_what_a_plugin_gives_the_record_must_be_plain_json():
    from orchestra.coordinator import CoordinatorCallback

    class Leaky(CoordinatorCallback):
        def record_fields(self):
            return {"model": object()}

    with pytest.raises(PluginError, match="'leaky' \\(callbacks.0\\): record_fields must return plain JSON"):
        PluginCallback("leaky", "callbacks.0", Leaky()).plugin_fields()

    class Raises(CoordinatorCallback):
        def on_epoch_end(self, result, decision):
            raise KeyError("val_f1")

    with pytest.raises(PluginError, match="'raises' \\(callbacks.3\\) raised in on_epoch_end: KeyError"):
        PluginCallback("raises", "callbacks.3", Raises()).on_epoch_end(EpochResult(1, {}, 1.0, 1.0), Decision())


def test_a_scalar_a_callback_adds_may_not_hide_a_logged_metric():
    result = EpochResult(1, {"loss": 0.5}, 1.0, 10.0)
    result.add_scalar("best_loss", 0.5)
    assert result.history_entry()["best_loss"] == 0.5
    with pytest.raises(ValueError, match="'loss' is already logged"):
        result.add_scalar("loss", 0.1)


def plugin_spec(*entries: dict, **overrides) -> dict:
    spec = small_spec(**{"fit.epochs": 4, **overrides})
    spec["callbacks"] = list(entries)
    return spec


def test_an_unregistered_or_broken_plugin_is_refused_before_dispatch(tmp_path, mnist_dir, seed_callbacks,
                                                                     broken_plugins):
    env = with_path(site_of(seed_callbacks), broken_plugins)
    for entry, field, words in [
        ({"class_name": "epoch_loger", "config": {}}, "callbacks.0.class_name",
         ["epoch_logger", "train_summary", "raises", "did you mean 'epoch_logger'"]),
        ({"class_name": "train_summary", "config": {"monitr": "loss"}}, "callbacks.0.config.monitr",
         ["it takes: monitor, mode"]),
        ({"class_name": "not_a_callback", "config": {}}, "callbacks.0",
         ["is not a subclass of orchestra.CoordinatorCallback"]),
    ]:
        spec = write_spec(tmp_path / "spec.json", plugin_spec(entry))
        result = run_cli("validate", spec, "--datasets", mnist_dir, "--storage", tmp_path / "storage", env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        header, *problems = result.stderr.strip().splitlines()
        assert header.endswith("invalid job spec") and len(problems) == 1, result.stderr
        line = problems[0].strip()
        assert line.startswith(f"{field}: ") and all(word in line for word in words), line
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").iterdir())


@pytest.mark.integration
def test_plugin_callbacks_run_on_the_driver_of_a_two_worker_job(tmp_path, mnist_dir, seed_callbacks):
    storage = tmp_path / "storage"
    spec = write_spec(tmp_path / "plugins.json", plugin_spec(
        {"class_name": "epoch_logger", "config": {}},
        {"class_name": "train_summary", "config": {"monitor": "val_accuracy", "mode": "max"}},
        {"class_name": "TensorBoard", "config": {}},
    ))
    result = run_cli("submit", spec, "--storage", storage, "--datasets", mnist_dir,
                     env=with_path(site_of(seed_callbacks)))
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    record = read_job(storage / job_id)
    assert record["state"] == "SUCCEEDED" and record["workers"] == 2, record["reason"]
    history = record["history"]
    accuracies = [entry["val_accuracy"] for entry in history]
    best_epoch = accuracies.index(max(accuracies)) + 1
    assert record["plugins"]["train_summary"] == {
        "monitor": "val_accuracy", "best_epoch": best_epoch, "best": max(accuracies), "epochs": 4}
    running = [max(accuracies[:n]) for n in range(1, 5)]
    assert [entry["best_val_accuracy"] for entry in history] == running
    assert tensorboard_steps(storage / job_id / "tensorboard" / "train", "epoch_best_val_accuracy") == [1, 2, 3, 4]
    logs = result.stdout  # a job submitted without --detach prints its driver's output
    for epoch in range(1, 5):
        assert f"epoch {epoch} ['accuracy', 'learning_rate', 'loss', 'val_accuracy', 'val_loss']" in logs, logs[-2000:]
    assert f"train summary: 4 epochs, best val_accuracy {max(accuracies)} at epoch {best_epoch}" in logs


@pytest.mark.integration
def test_a_plugin_that_raises_fails_the_job_naming_it(tmp_path, mnist_dir, broken_plugins):
    storage = tmp_path / "storage"
    spec = write_spec(tmp_path / "raises.json", plugin_spec({"class_name": "raises", "config": {"at_epoch": 2}}))
    result = run_cli("submit", spec, "--storage", storage, "--datasets", mnist_dir, env=with_path(broken_plugins))
    job_id = json.loads(run_cli("list", "--storage", storage, "--json").stdout)[0]["job_id"]
    record = read_job(storage / job_id)
    assert result.returncode == 1 and record["state"] == "FAILED", result.stdout + result.stderr
    assert "the callback 'raises' (callbacks.0) raised in on_epoch_end: RuntimeError: the plugin's own bug" in \
        record["reason"]
    assert record["epochs_completed"] == 1


def test_the_readmes_spec_with_a_plugin_callback_is_valid(tmp_path, mnist_dir, seed_callbacks):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "class_name: epoch_logger" in block
    spec = tmp_path / "readme.yaml"
    spec.write_text(block)
    result = run_cli("validate", spec, "--datasets", mnist_dir, "--storage", tmp_path / "storage",
                     env=with_path(site_of(seed_callbacks)))
    assert result.returncode == 0, result.stdout + result.stderr
