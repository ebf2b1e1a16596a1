"""orchestra's errors cross process boundaries: a worker's error reaches the
driver pickled (Ray), so each must come back as itself, message and fields."""

import pickle

import pytest

from orchestra import errors
from orchestra.coordinator.plugin import PluginError
from orchestra.storage.lease import LeaseHeld, LeaseLost
from orchestra.storage.record import InvalidTransition

EXAMPLES = [
    errors.SpecError([("fit.epochs", "must be at least 1")], "job.json"),
    errors.FieldError("data.source", "no such file: /data/x.npz"),
    errors.StorageError("job x: no record"),
    errors.StorageWriteError(28, "cannot write /s/job.json: No space left on device", "/s/job.json"),
    errors.JobStateError("job x is RUNNING"),
    errors.ClusterError("cannot reach the cluster"),
    errors.BoardError("port taken"),
    errors.KerasVersionError("tf-keras is missing"),
    LeaseHeld("job x is owned by a live driver on h, pid 1"),
    LeaseLost("job x was taken over"),
    InvalidTransition("RUNNING -> PENDING"),
    PluginError("the callback 'raises' (callbacks.0) raised in on_epoch_end: KeyError: 'val_f1'"),
]


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda error: type(error).__name__)
def test_every_error_comes_back_from_a_pickle_as_itself(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert vars(back) == vars(error)


def test_the_examples_cover_every_error_class():
    def subclasses(cls):
        return {cls} | {sub for direct in cls.__subclasses__() for sub in subclasses(direct)}
    assert subclasses(errors.OrchestraError) - {errors.OrchestraError} <= {type(e) for e in EXAMPLES}
