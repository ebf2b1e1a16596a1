"""The job spec: one Pydantic model that is the single source of truth.

The JSON a user writes, the JSON Schema (`orchestra schema`), the error
messages (`orchestra validate`) and the defaults all come from the classes
below. Validation here is structural and needs no TensorFlow; names of Keras
layers, optimizers, losses and metrics are checked against Keras itself by
`orchestra.model.check_keras_names` before anything is dispatched.

Example:

    >>> spec = JobSpec.model_validate({
    ...     "data": {"source": "mnist", "rescale": "1/255", "flatten": True,
    ...              "labels": "one_hot", "train_size": 700,
    ...              "validation_size": 300},
    ...     "model": {"layers": [{"type": "Dense", "units": 2, "activation": "relu"},
    ...                          {"type": "Dense", "units": 10, "activation": "softmax"}]},
    ...     "compile": {"optimizer": "sgd", "loss": "categorical_crossentropy",
    ...                 "metrics": ["accuracy"]},
    ...     "fit": {"epochs": 3000, "batch_size": 10},
    ...     "callbacks": [{"class_name": "EarlyStopping", "config": {"patience": 30}}],
    ... })
    >>> spec.scaling.workers
    2
"""

from orchestra.spec._base import Mode, StrictModel
from orchestra.spec.callbacks import (
    BackupAndRestoreSpec,
    CallbackSpec,
    CSVLoggerSpec,
    EarlyStoppingSpec,
    LearningRateSchedulerSpec,
    ModelCheckpointSpec,
    ReduceLROnPlateauSpec,
    TensorBoardSpec,
    TerminateOnNaNSpec,
    config_of,
)
from orchestra.spec.data import (
    MAX_CLASSES,
    AugmentationSpec,
    DataLoaderSpec,
    DataSpec,
    ImageFolderSpec,
)
from orchestra.spec.job import JobSpec
from orchestra.spec.keras_objects import SCHEDULES, KerasObjectSpec
from orchestra.spec.model import (
    MAX_LAYERS,
    MAX_UNITS,
    BackboneSpec,
    LayerSpec,
    ModelSpec,
)
from orchestra.spec.problems import problems_of
from orchestra.spec.reading import (
    MAX_SPEC_BYTES,
    json_schema,
    load_spec,
    parse_spec,
    read_spec_text,
)
from orchestra.spec.scaling import (
    MAX_WORKERS,
    MIN_CPUS_PER_WORKER,
    PerformanceSpec,
    ScalingSpec,
)
from orchestra.spec.training import (
    BINARY_LOSSES,
    ONE_HOT_LOSSES,
    ONE_HOT_METRICS,
    SPARSE_LOSSES,
    SPARSE_METRICS,
    CompileSpec,
    FitSpec,
    OptimizerSpec,
)

__all__ = [
    "BINARY_LOSSES", "MAX_CLASSES", "MAX_LAYERS", "MAX_SPEC_BYTES", "MAX_UNITS", "MAX_WORKERS",
    "MIN_CPUS_PER_WORKER", "ONE_HOT_LOSSES", "ONE_HOT_METRICS", "SPARSE_LOSSES", "SPARSE_METRICS",
    "SCHEDULES", "AugmentationSpec", "BackboneSpec", "BackupAndRestoreSpec", "CallbackSpec", "CSVLoggerSpec", "LearningRateSchedulerSpec",
    "ModelCheckpointSpec", "ReduceLROnPlateauSpec", "TerminateOnNaNSpec", "config_of", "CompileSpec", "DataLoaderSpec",
    "DataSpec", "EarlyStoppingSpec", "FitSpec", "ImageFolderSpec", "JobSpec", "KerasObjectSpec", "LayerSpec", "Mode", "ModelSpec",
    "OptimizerSpec", "PerformanceSpec", "ScalingSpec", "StrictModel", "TensorBoardSpec",
    "json_schema", "load_spec", "parse_spec", "problems_of", "read_spec_text",
]
