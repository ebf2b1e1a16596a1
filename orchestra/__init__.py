"""orchestra: distributed training jobs for tf.keras on Ray.

The package follows a job's flow, each layer importing only those below it:

    errors, net   the root of orchestra's errors; which addresses are this machine's own
    spec          the JobSpec (Pydantic): what to train, checked before anything starts
    build/        spec → Keras model, arrays and image pipelines, performance defaults
    storage/      job folders, the record and its state machine, heartbeats, status lines
    coordinator/  driver-side callbacks and the typed driver–worker protocol
    worker/       the loop each Ray Train worker runs under MultiWorkerMirroredStrategy
    driver/       pre-flight, the run, resume, signals: `python -m orchestra.driver`
    client/       the Python client: jobs here (background drivers) or on Ray Jobs, inference
    tools/        TensorBoard server, plots, sample data
    cli           `orchestra`: thin verbs over the client and the driver

This module is the public API; plugin callbacks subclass its
`CoordinatorCallback` (docs/plugins.md).
"""

from orchestra.client.client import Client
from orchestra.client.inference import evaluate, load_model, predict
from orchestra.coordinator import CoordinatorCallback, Decision, EpochResult
from orchestra.errors import OrchestraError, SpecError
from orchestra.spec import JobSpec, load_spec
from orchestra.storage.record import JobRecord, JobState, JobStatus

__all__ = ["Client", "CoordinatorCallback", "Decision", "EpochResult", "JobRecord", "JobSpec", "JobState", "JobStatus", "OrchestraError", "SpecError", "evaluate",
           "load_model", "load_spec", "predict"]
