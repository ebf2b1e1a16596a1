"""Saving a model from inside MultiWorkerMirroredStrategy: every worker
takes part, the chief alone publishes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestra.errors import StorageWriteError
from orchestra.storage.folders import (
    BEST_WEIGHTS_FILE,
    CHECKPOINT_STATE_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    publish_directory,
)


def save_model(model, directory: Path, weights_only: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if weights_only:
        model.save_weights(str(directory / WEIGHTS_FILE))
    else:
        # Named explicitly: tf-keras keeps "use the .keras format" in a
        # thread-local, and in any thread but the first (Ray Train runs this
        # loop in one) it silently writes HDF5 from the second save on.
        model.save(str(directory / MODEL_FILE), save_format="keras_v3")


def collective_save(model, final: Path, rank: int, weights_only: bool, state: dict[str, Any] | None = None,
                    best_weights: list | None = None) -> None:
    """Every worker takes part in a save under MultiWorkerMirroredStrategy, or
    the chief would wait in a collective forever: the chief writes to a
    staging folder beside `final` and publishes it by rename, the others
    write to scratch that is thrown away. `state` (the driver's callback
    state) and `best_weights` (the restore_best_weights snapshot) go into
    the same folder, so a job resumed from it has both as they were."""
    import numpy as np

    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix="orchestra-scratch-"))
        try:
            save_model(model, scratch, weights_only)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    staging = final.parent / f".staging-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model(model, staging, weights_only)
        if state is not None:
            (staging / CHECKPOINT_STATE_FILE).write_text(json.dumps(state))
        if best_weights is not None:
            np.savez(staging / BEST_WEIGHTS_FILE, *best_weights)
    except OSError as exc:  # a full disk: give its space back, name what could not be written
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageWriteError.of(final, exc) from exc
    publish_directory(staging, final)


def load_best_weights(checkpoint: Path) -> list | None:
    """The restore_best_weights snapshot saved with a checkpoint, or None."""
    import numpy as np

    path = checkpoint / BEST_WEIGHTS_FILE
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]
