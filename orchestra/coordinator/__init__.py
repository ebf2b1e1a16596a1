"""Driver-side callbacks: one interface (`CoordinatorCallback`), one class
per job, run by the `Coordinator` on every whole-job epoch."""

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.checkpoint import Checkpoint
from orchestra.coordinator.coordinator import Coordinator
from orchestra.coordinator.csv_logger import CSVLogger
from orchestra.coordinator.early_stopping import EarlyStopping
from orchestra.coordinator.learning_rate import LearningRateScheduler, ReduceLROnPlateau
from orchestra.coordinator.protocol import Decision, WorkerReport
from orchestra.coordinator.tensorboard import TensorBoard
from orchestra.coordinator.terminate import TerminateOnNaN

__all__ = [
    "CSVLogger",
    "Checkpoint",
    "Coordinator",
    "CoordinatorCallback",
    "Decision",
    "EarlyStopping",
    "EpochResult",
    "LearningRateScheduler",
    "ReduceLROnPlateau",
    "TensorBoard",
    "TerminateOnNaN",
    "WorkerReport",
]
