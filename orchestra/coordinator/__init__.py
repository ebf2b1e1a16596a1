"""Driver-side callbacks: one interface (`CoordinatorCallback`), one class
per job, run by the `Coordinator` on every whole-job epoch."""

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.checkpoint import Checkpoint
from orchestra.coordinator.coordinator import Coordinator
from orchestra.coordinator.early_stopping import EarlyStopping
from orchestra.coordinator.protocol import Decision, WorkerReport
from orchestra.coordinator.tensorboard import TensorBoard

__all__ = [
    "Checkpoint",
    "Coordinator",
    "CoordinatorCallback",
    "Decision",
    "EarlyStopping",
    "EpochResult",
    "TensorBoard",
    "WorkerReport",
]
