"""Shared fixtures. Integration tests start a real embedded Ray once per
session and real TensorFlow workers under MultiWorkerMirroredStrategy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def datasets_dir() -> Path:
    """ORCHESTRA_DATASETS (CI sets it), else ../shared/datasets beside the repo."""
    return Path(os.environ.get("ORCHESTRA_DATASETS") or SHARED_DATASETS).resolve()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    directory = datasets_dir()
    if not (directory / "mnist.npz").is_file():
        pytest.fail(f"mnist.npz not found in {directory}: set ORCHESTRA_DATASETS")
    return directory


def small_spec(**overrides) -> dict:
    """A small MNIST job: 2 workers, a few dozen steps per epoch."""
    spec = {
        "name": "small",
        "seed": 1,
        "data": {
            "source": "mnist", "rescale": "1/255", "flatten": True, "labels": "one_hot",
            "train_size": 400, "validation_size": 200, "test_size": 500, "seed": 7,
        },
        "model": {"layers": [
            {"type": "Dense", "units": 32, "activation": "relu"},
            {"type": "Dense", "units": 10, "activation": "softmax"},
        ]},
        "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01},
                    "loss": "categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 30, "batch_size": 20},
        "callbacks": [
            {"class_name": "EarlyStopping", "config": {"monitor": "val_loss", "patience": 2}},
            {"class_name": "ModelCheckpoint", "config": {"monitor": "val_loss", "save_best_only": True, "keep": 2}},
            {"class_name": "TensorBoard", "config": {"update_freq": "epoch", "histogram_freq": 2}},
        ],
        "scaling": {"workers": 2},
    }
    for dotted, value in overrides.items():
        if dotted.startswith("callbacks.") and isinstance(spec.get("callbacks"), list):
            _override_callback(spec["callbacks"], dotted.removeprefix("callbacks."), value)
            continue
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def _override_callback(callbacks: list[dict], dotted: str, value) -> None:
    """`small_spec`'s "callbacks.<ClassName>[.<argument>]" overrides: None
    drops the callback, a dict is its whole config (added at the end if not
    listed), an argument sets that one argument."""
    name, _, argument = dotted.partition(".")
    if not name[:1].isupper():
        raise KeyError(f"callbacks.{name}: small_spec names callbacks by Keras class now, e.g. "
                       "callbacks.EarlyStopping, callbacks.ModelCheckpoint, callbacks.TensorBoard")
    entry = next((entry for entry in callbacks if entry["class_name"] == name), None)
    if argument and entry is None:
        raise KeyError(f"callbacks.{dotted}: {name} is not listed; give its whole config as callbacks.{name}")
    if argument:
        entry["config"][argument] = value
    elif value is None:
        if entry is not None:
            callbacks.remove(entry)
    elif entry is not None:
        entry["config"] = value
    else:
        callbacks.append({"class_name": name, "config": value})


def read_job(job_dir: Path) -> dict:
    """A job's record as JSON, with its per-epoch history (`history.jsonl`) under "history"."""
    record = json.loads((job_dir / "job.json").read_text())
    history = job_dir / "history.jsonl"
    record["history"] = [json.loads(line) for line in history.read_text().splitlines()] if history.is_file() else []
    return record


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory) -> Path:
    """A folder with tiny.npz: 60 training and 10 test examples of 4x4
    pixels in 3 classes, so the checks before dispatch take no time."""
    import numpy as np

    directory = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    np.savez(directory / "tiny.npz", x_train=rng.integers(0, 255, (60, 4, 4), dtype=np.uint8),
             y_train=rng.integers(0, 3, 60), x_test=rng.integers(0, 255, (10, 4, 4), dtype=np.uint8),
             y_test=rng.integers(0, 3, 10))
    return directory


def get_json(url: str, data: dict | None = None, timeout: float = 60):
    """The JSON a local server answers at `url` (POSTing `data` if given),
    asked again every 0.5 s for up to `timeout` s while it does not answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "orchestra.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory, mnist_dir):
    """One early-stopping job submitted through the CLI, run to its end."""
    root = tmp_path_factory.mktemp("cli")
    spec_path = write_spec(root / "small.json", small_spec(**{"callbacks.EarlyStopping.restore_best_weights": True}))
    result = run_cli("submit", spec_path, "--storage", root / "storage", "--datasets", mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    status = run_cli("status", job_id, "--storage", root / "storage", "--json")
    assert status.returncode == 0, status.stderr
    record = read_job(root / "storage" / job_id)
    return {"stdout": result.stdout, "status": json.loads(status.stdout), "record": record,
            "storage": root / "storage", "job_id": job_id, "mnist_dir": mnist_dir}


def tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    """Every step at which a run's event files hold `tag`, sorted (repeats kept)."""
    from tensorboard.compat.proto.event_pb2 import Event

    from orchestra.keras_compat import tensorflow

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for raw in tensorflow().data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = Event.FromString(raw)
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
