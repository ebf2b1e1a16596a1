"""orchestra: distributed training jobs for tf.keras on Ray.

    spec (JobSpec) → preflight → dispatch (Ray Train workers under
    MultiWorkerMirroredStrategy, worker.py) → coordinator (driver-side
    callbacks) → storage / TensorBoard → client and CLI
"""

from orchestra.client import Client, load_model
from orchestra.inference import evaluate, predict
from orchestra.record import JobRecord, JobState, JobStatus
from orchestra.spec import JobSpec, SpecError, load_spec

__all__ = ["Client", "JobRecord", "JobSpec", "JobState", "JobStatus", "SpecError", "evaluate", "load_model", "load_spec",
           "predict"]
