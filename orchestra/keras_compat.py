"""Which Keras orchestra trains with, and why it must be the Keras 2 line.

With TensorFlow 2.21, Keras 3's `fit` under MultiWorkerMirroredStrategy fails
on the first batch ("Attempt to convert a value (PerReplica...)"); the
tf-keras package (Keras 2) trains correctly. Everything in orchestra (driver,
workers, tests, loading a checkpoint) imports Keras through `keras()` here.
"""

from __future__ import annotations

import os
from types import ModuleType

from orchestra.errors import KerasVersionError

# TensorFlow reads these when it is first imported: set here for this
# process, and passed to every process orchestra starts (Ray workers, Ray
# jobs' drivers), where they must be set before TensorFlow is imported.
TENSORFLOW_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
for _name, _value in TENSORFLOW_ENV.items():
    os.environ.setdefault(_name, _value)


def _import_quietly(name: str) -> ModuleType:
    """Import a module with file descriptor 2 silenced: TensorFlow's C++
    start-up lines (oneDNN, CUDA stubs) ignore TF_CPP_MIN_LOG_LEVEL. Python
    errors still propagate as exceptions."""
    import importlib
    import sys

    if name in sys.modules:
        return sys.modules[name]
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        module = importlib.import_module(name)
        if name == "tensorflow":
            module.config.list_physical_devices()  # CUDA's probe prints here, once
        return module
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def keras() -> ModuleType:
    """Return tf-keras (Keras 2), failing clearly if only Keras 3 is there."""
    _import_quietly("tensorflow")
    try:
        tf_keras = _import_quietly("tf_keras")
    except ImportError:
        raise KerasVersionError(
            "orchestra needs the tf-keras package (Keras 2) at TensorFlow's version: "
            "Keras 3's fit fails under MultiWorkerMirroredStrategy. "
            "Install it with: pip install 'tf-keras==<your tensorflow version>'"
        ) from None
    if not tf_keras.__version__.startswith("2."):
        raise KerasVersionError(f"tf_keras {tf_keras.__version__} is not the Keras 2 line")
    return tf_keras


def tensorflow() -> ModuleType:
    keras()
    tf = _import_quietly("tensorflow")
    if not tf.keras.__name__.startswith("tf_keras"):
        raise KerasVersionError(
            f"tf.keras resolves to {tf.keras.__name__} (Keras 3), not tf-keras: "
            "set TF_USE_LEGACY_KERAS=1 before TensorFlow is imported"
        )
    return tf
