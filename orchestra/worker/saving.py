"""Saving a model from inside MultiWorkerMirroredStrategy: every worker
takes part, the chief alone publishes.

Two ways: `collective_save` saves the live model there and then (the final
model); `CheckpointWriter` takes the per-epoch checkpoints off the critical
path: every worker reads a snapshot of the weights and optimizer state on
its training thread (the reads of variables synchronised on read are
collectives, so all take them, in the same order), and the chief writes and
publishes it from a background thread while the next epoch trains.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestra.errors import StorageWriteError
from orchestra.storage import bucket
from orchestra.storage.folders import (
    BEST_WEIGHTS_FILE,
    CHECKPOINT_STATE_FILE,
    MODEL_FILE,
    STAGING_PREFIX,
    WEIGHTS_FILE,
    publish_directory,
)
from orchestra.storage.lease import Fence


def save_model(model, directory: Path, weights_only: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if weights_only:
        model.save_weights(str(directory / WEIGHTS_FILE))
    else:
        # Named explicitly: tf-keras keeps "use the .keras format" in a
        # thread-local, and in any thread but the first (Ray Train runs this
        # loop in one) it silently writes HDF5 from the second save on.
        model.save(str(directory / MODEL_FILE), save_format="keras_v3")


def _write_published(final: Path, write: Callable[[Path], None], state: dict[str, Any] | None,
                     best_weights: list | None, fence: Fence | None = None) -> None:
    """`write(staging)` the model, add the state and best weights, publish by
    rename, if the job's lease is still `fence`'s generation (LeaseLost if not).
    On a bucket `final` may be a path of the driver's mirror: the folder is
    written in this process's own mirror and published to the bucket."""
    import numpy as np

    local = bucket.own(final)
    staging = local.parent / f"{STAGING_PREFIX}{local.name}-{os.getpid()}"
    try:
        if local.parent.is_symlink():  # storage is input: a planted symlink would take the write elsewhere
            raise OSError(errno.ELOOP, f"{local.parent} is a symlink")
        if staging.is_symlink() or staging.is_file():
            staging.unlink()
        else:
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        if state is not None:
            (staging / CHECKPOINT_STATE_FILE).write_text(json.dumps(state))
        if best_weights is not None:
            np.savez(staging / BEST_WEIGHTS_FILE, *best_weights)
        if fence is not None:
            fence.check()  # a driver that has been taken over: its chief publishes nothing more
    except OSError as exc:  # a full disk: give its space back, name what could not be written
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageWriteError.of(final, exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)


def collective_save(model, final: Path, rank: int, weights_only: bool, state: dict[str, Any] | None = None,
                    best_weights: list | None = None, fence: Fence | None = None) -> None:
    """Every worker takes part in a save under MultiWorkerMirroredStrategy, or
    the chief would wait in a collective forever: the chief writes to a
    staging folder beside `final` and publishes it by rename, the others
    write to scratch that is thrown away. `state` (the driver's callback
    state) and `best_weights` (the restore_best_weights snapshot) go into
    the same folder, so a job resumed from it has both as they were."""
    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix="orchestra-scratch-"))
        try:
            save_model(model, scratch, weights_only)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    _write_published(final, lambda staging: save_model(model, staging, weights_only), state, best_weights, fence)


def _optimizer_variables(optimizer) -> list:
    variables = getattr(optimizer, "variables", None)
    if variables is None:
        return []
    return list(variables() if callable(variables) else variables)


@dataclass
class Snapshot:
    """The model's state at one epoch end, as numpy: what a checkpoint holds."""

    weights: list
    optimizer: list
    learning_rate: float | None


def snapshot(model) -> Snapshot:
    """Read the model's weights and optimizer state. Every worker calls it at
    the same point: reading a variable synchronised on read (BatchNormalization's
    moving statistics, under MultiWorkerMirroredStrategy) is an all-reduce."""
    from orchestra.keras_compat import keras

    optimizer = getattr(model, "optimizer", None)
    values = keras().backend.batch_get_value(_optimizer_variables(optimizer)) if optimizer is not None else []
    # A schedule's rate follows the restored `iterations`; it is not settable.
    scheduled = isinstance(getattr(optimizer, "_learning_rate", None), keras().optimizers.schedules.LearningRateSchedule)
    return Snapshot(model.get_weights(), list(values), None if scheduled else learning_rate_of(optimizer))


def learning_rate_of(optimizer) -> float | None:
    """The optimizer's learning rate now, or None for a schedule (a callable) or no optimizer."""
    learning_rate = getattr(optimizer, "learning_rate", None)
    if learning_rate is None or callable(learning_rate) or not hasattr(learning_rate, "numpy"):
        return None
    return float(learning_rate.numpy())


class CheckpointWriter:
    """Checkpoints written in the background, one at a time.

    `save` is called by every worker at the same point of the same epoch; it
    first waits for the previous checkpoint (never two at once; its failure
    is raised here), then takes the snapshot (all workers), and on the chief
    hands it to a writer thread. That thread builds, once, a shadow of the
    model outside the distribution strategy (the same architecture and
    compile configuration, its optimizer built), loads the snapshot into it,
    saves it into a staging folder with the driver's state and the best
    weights, publishes it by rename and only then calls `published(ref)`
    (from the writer thread if `notify_in_background`, else from the training
    thread at the next `wait`). `wait` (at the next epoch end and at the end
    of training) raises a failed write as the job's error.

    Args:
        rank: this worker's rank; only rank 0 writes.
        published: told each checkpoint once it is published.
        notify_in_background: `published` may be called from the writer thread.
        fence: the driver's lease generation, checked before each publication.
    """

    def __init__(self, rank: int, published: Callable[[Any], None], notify_in_background: bool = False,
                 fence: Fence | None = None):
        self.fence = fence
        self.rank = rank
        self.published = published
        self.notify_in_background = notify_in_background
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._shadow = None

    def save(self, model, final: Path, weights_only: bool, state: dict[str, Any] | None, best_weights: list | None,
             ref) -> None:
        self.wait()
        taken = snapshot(model)
        if self.rank != 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestra-checkpoint")
        self._pending = self._pool.submit(self._write, model, taken, final, weights_only,
                                          None if state is None else dict(state), best_weights, ref)

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is published; raise its error."""
        if self._pending is None:
            return
        try:
            ref = self._pending.result()  # a Ctrl-C here leaves it pending: the next wait still reports it
        except Exception:
            self._pending = None
            raise
        self._pending = None
        if not self.notify_in_background:
            self.published(ref)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the last checkpoint and stop the writer thread."""
        try:
            if raise_errors:
                self.wait()
            else:
                try:
                    self.wait()
                except Exception:  # noqa: BLE001 - an error is already on its way up
                    pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # The writer thread: TensorFlow's distribution strategy is per thread, so
    # the shadow built here lives under the default strategy, outside the
    # collectives of the live model.
    def _write(self, model, taken: Snapshot, final: Path, weights_only: bool, state, best_weights, ref):
        shadow = self._shadow_of(model)
        shadow.set_weights(taken.weights)
        if taken.optimizer:
            variables = _optimizer_variables(shadow.optimizer)
            if [tuple(v.shape) for v in variables] != [tuple(np_value.shape) for np_value in taken.optimizer]:
                raise RuntimeError(
                    f"checkpoint {final}: the optimizer's {len(taken.optimizer)} variables do not match "
                    f"its shadow's {len(variables)}")
            for variable, value in zip(variables, taken.optimizer):
                variable.assign(value)
        if taken.learning_rate is not None:
            shadow.optimizer.learning_rate = taken.learning_rate
        _write_published(final, lambda staging: save_model(shadow, staging, weights_only), state, best_weights,
                         self.fence)
        if self.notify_in_background:
            self.published(ref)
        return ref

    def _shadow_of(self, model):
        if self._shadow is None:
            from orchestra.keras_compat import keras

            k = keras()
            shadow = k.models.clone_model(model)
            if not shadow.built:
                shadow.build(model.input_shape)
            compile_config = model.get_compile_config() if getattr(model, "compiled", True) else None
            if compile_config:
                shadow.compile_from_config(compile_config)
            optimizer = getattr(shadow, "optimizer", None)
            if optimizer is not None and hasattr(optimizer, "build"):
                optimizer.build(shadow.trainable_variables)
            self._shadow = shadow
        return self._shadow


def load_best_weights(checkpoint: Path) -> list | None:
    """The restore_best_weights snapshot saved with a checkpoint, or None."""
    import numpy as np

    path = bucket.pull_folder(checkpoint) / BEST_WEIGHTS_FILE
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]
