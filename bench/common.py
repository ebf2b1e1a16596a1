"""What every way of training shares: the workload and how a run reports.

Each way runs in its own process (`python -m bench.<way> CONFIG_JSON`) and
prints one JSON line: per-epoch end times and durations, and peak memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROCESS_START = time.time()


@dataclass
class Workload:
    """Seed 000's MLP on MNIST: Flatten → Dense(100, relu) → Dense(10, softmax), adam."""

    mnist: str
    train: int = 48_000
    validation: int = 12_000
    batch_size: int = 32
    epochs: int = 3
    workers: int = 2
    seed: int = 42
    performance: dict = field(default_factory=dict)  # orchestra's `performance` section
    tuned: bool = False  # the recipe with orchestra's tuning written in by hand


@dataclass
class Result:
    way: str
    workers: int
    epoch_times: list[float] = field(default_factory=list)     # each epoch's duration on the (slowest) worker
    epoch_ends: list[float] = field(default_factory=list)      # Unix time each epoch was done
    started: float = PROCESS_START
    driver_peak_rss_mb: float = 0.0
    worker_peak_rss_mb: float = 0.0
    samples_per_epoch: int = 0
    final_val_loss: float | None = None
    workers_rss_mb: float = 0.0  # the workers' resident memory summed, at its peak (orchestra)
    workers_pss_mb: float = 0.0  # the same as PSS: a page shared by k processes counts 1/k in each


def read_workload() -> Workload:
    return Workload(**json.loads(sys.argv[1]))


def load_arrays(work: Workload):
    """80/20 split of the training arrays, as the Fashion-MNIST tutorial makes it."""
    import numpy as np

    with np.load(work.mnist) as npz:
        x, y = npz["x_train"], npz["y_train"]
    order = np.random.default_rng(work.seed).permutation(len(x))
    val, train = order[: work.validation], order[work.validation: work.validation + work.train]
    x = x.astype("float32") / 255.0
    return x[train], y[train], x[val], y[val]


def build_model(steps_per_execution: int = 1):
    import tf_keras as keras

    model = keras.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)
    return model


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: Result) -> None:
    result.driver_peak_rss_mb = peak_rss_mb()
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def timing_callback(path: str | None = None):
    """A Keras callback that notes each epoch's duration and end time, in
    memory or appended to a JSON-lines file (for Ray workers)."""
    import tf_keras as keras

    class Timing(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.ends = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.begun = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.begun)
            self.ends.append(time.time())
            if path:
                with open(path, "a") as handle:
                    handle.write(json.dumps({"epoch": epoch, "time": self.times[-1], "end": self.ends[-1],
                                             "rss": peak_rss_mb(), "val_loss": float(logs.get("val_loss", 0))}) + "\n")

    return Timing()


def scratch_dir() -> Path:
    path = Path(os.environ.get("BENCH_SCRATCH", "/tmp/orchestra-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class Sampler:
    """Calls `sample()` every `interval` seconds in a thread, while used as
    a context manager; `pids()` names the processes a sample looks at."""

    def __init__(self, pids, interval: float = 0.5):
        import threading

        self.pids, self.interval = pids, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-{type(self).__name__}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class WorkerMemory(Sampler):
    """Samples, in a thread, the summed memory of the processes `pids()` names;
    keeps the peak of the sums (RSS and PSS)."""

    def __init__(self, pids, interval: float = 0.5):
        super().__init__(pids, interval)
        self.rss_mb = self.pss_mb = 0.0

    def sample(self) -> None:
        import psutil

        rss = pss = 0.0
        for pid in list(self.pids()):
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.Error, OSError):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        self.rss_mb = max(self.rss_mb, rss / 2**20)
        self.pss_mb = max(self.pss_mb, pss / 2**20)
