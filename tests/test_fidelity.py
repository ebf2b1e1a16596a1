"""Same results on 1 or N workers: a 2-worker job gives the in-process
reference run's numbers, and the reference run is plain Keras."""

from __future__ import annotations

import numpy as np
import pytest

from orchestra.keras_compat import keras, tensorflow
from orchestra.spec import JobSpec

pytestmark = pytest.mark.integration

# Float32 sums in a different order: the only difference allowed.
RTOL = 1e-5

FIDELITY_SPEC = {
    "name": "fidelity", "seed": 3,
    "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "one_hot",
             "train_size": 600, "validation_size": 200, "test_size": 1000, "seed": 5},
    "model": {"layers": [{"type": "Dense", "units": 16, "activation": "relu"},
                         {"type": "Dense", "units": 10, "activation": "softmax"}]},
    "compile": {"optimizer": {"type": "sgd", "learning_rate": 0.02}, "loss": "categorical_crossentropy",
                "metrics": ["accuracy"]},
    "fit": {"epochs": 60, "batch_size": 20},
    "callbacks": [{"class_name": "EarlyStopping", "config": {"monitor": "val_loss", "patience": 3, "min_delta": 0.002}},
                  {"class_name": "ModelCheckpoint", "config": {"monitor": "val_loss", "save_best_only": True, "keep": 1}},
                  {"class_name": "TensorBoard", "config": {}}],
    "scaling": {"workers": 2},
}
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def run(spec_dict, storage, mnist_dir, in_process):
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_in_process, run_job

    prepared = preflight(JobSpec.model_validate(spec_dict), storage=str(storage), datasets=str(mnist_dir))
    record = create_job(prepared, in_process=in_process)
    final = (run_in_process if in_process else run_job)(prepared, record)
    assert final.state.value == "SUCCEEDED", final.reason
    return final


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory, mnist_dir):
    storage = tmp_path_factory.mktemp("fidelity")
    reference = run(FIDELITY_SPEC, storage, mnist_dir, in_process=True)
    distributed = run(FIDELITY_SPEC, storage, mnist_dir, in_process=False)
    return reference, distributed, storage


def test_two_workers_give_the_reference_run(both_modes):
    from orchestra import load_model

    reference, distributed, storage = both_modes
    assert (reference.mode, reference.workers, distributed.mode, distributed.workers) == ("in_process", 1, "ray", 2)
    assert len(reference.history) >= 20
    assert [h["epoch"] for h in distributed.history] == [h["epoch"] for h in reference.history]
    for ours, theirs in zip(distributed.history, reference.history):
        for key in METRICS:
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL), (ours["epoch"], key)
    assert (distributed.stopped_epoch, distributed.best_epoch) == (reference.stopped_epoch, reference.best_epoch)
    assert distributed.best_checkpoint.rsplit("/", 1)[1] == reference.best_checkpoint.rsplit("/", 1)[1]
    for key in ("loss", "accuracy"):
        assert distributed.test_metrics[key] == pytest.approx(reference.test_metrics[key], rel=RTOL)
    ours = load_model(distributed.job_id, storage=str(storage)).get_weights()
    theirs = load_model(reference.job_id, storage=str(storage)).get_weights()
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_reference_run_is_plain_keras(both_modes, mnist_dir):
    """The same experiment written by hand: Keras's fit and EarlyStopping,
    the seeded split and the seeded per-epoch order orchestra documents."""
    reference = both_modes[0]
    k, tf = keras(), tensorflow()
    with np.load(mnist_dir / "mnist.npz") as npz:
        x, y = npz["x_train"], npz["y_train"]
    order = np.random.RandomState(5).permutation(len(x))  # scikit-learn's train_test_split(random_state=5)
    val, train = order[:200], order[200:800]

    def features(a):
        return (a.astype(np.float32) * np.float32(1 / 255)).reshape(len(a), -1)

    x_train, y_train = features(x[train]), np.eye(10, dtype=np.float32)[y[train]]
    x_val, y_val = features(x[val]), np.eye(10, dtype=np.float32)[y[val]]

    k.utils.set_random_seed(3)
    model = k.Sequential([k.Input(shape=(784,)), k.layers.Dense(16, activation="relu"),
                          k.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=k.optimizers.SGD(learning_rate=0.02), loss="categorical_crossentropy",
                  metrics=["accuracy"])

    def epoch(e):
        shuffled = tf.random.experimental.stateless_shuffle(tf.range(600, dtype=tf.int64),
                                                            seed=tf.stack([tf.constant(3, tf.int64), e]))
        return tf.data.Dataset.from_tensor_slices(tf.reshape(shuffled, [30, 20]))

    batches = tf.data.Dataset.range(60).flat_map(epoch).map(lambda i: (tf.gather(x_train, i), tf.gather(y_train, i)))
    stopper = k.callbacks.EarlyStopping(monitor="val_loss", patience=3, min_delta=0.002)
    history = model.fit(batches, epochs=60, steps_per_epoch=30, validation_data=(x_val, y_val),
                        validation_batch_size=1024, callbacks=[stopper], verbose=0).history

    assert reference.stopped_epoch == stopper.stopped_epoch + 1
    assert len(reference.history) == len(history["loss"])
    for key in METRICS:
        assert [h[key] for h in reference.history] == pytest.approx(history[key], rel=1e-6), key


SLOW = {"steps_per_execution": 1, "threads_per_worker": 2, "evaluation_batch_size": 20,
        "skip_end_of_data_vote": False, "single_worker_strategy": "multi_worker_mirrored"}


def test_fast_defaults_keep_kerass_meaning(both_modes, mnist_dir, tmp_path):
    """orchestra's performance defaults against every one of them turned off:
    the same per-epoch history within float noise, the same decisions."""
    distributed = both_modes[1]
    slow = run({**FIDELITY_SPEC, "performance": SLOW}, tmp_path, mnist_dir, in_process=False)
    assert (slow.stopped_epoch, slow.best_epoch) == (distributed.stopped_epoch, distributed.best_epoch)
    for ours, theirs in zip(distributed.history, slow.history, strict=True):
        for key in METRICS:
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL), (ours["epoch"], key)


def test_one_worker_trains_without_collectives_and_gives_the_reference_run(both_modes, mnist_dir, tmp_path):
    reference = both_modes[0]
    single = run({**FIDELITY_SPEC, "scaling": {"workers": 1}}, tmp_path, mnist_dir, in_process=False)
    assert single.workers == 1
    assert [h["loss"] for h in single.history] == [h["loss"] for h in reference.history]
    assert [h["val_loss"] for h in single.history] == [h["val_loss"] for h in reference.history]


def test_dropout_lands_in_the_same_range(tmp_path, mnist_dir):
    """Dropout masks are drawn per replica, so runs differ; over several
    seeds both modes reach the same validation accuracy."""
    spec = {**FIDELITY_SPEC, "callbacks": [], "fit": {"epochs": 6, "batch_size": 20},
            "model": {"layers": [{"type": "Dense", "units": 64, "activation": "relu"},
                                 {"type": "Dropout", "rate": 0.3},
                                 {"type": "Dense", "units": 10, "activation": "softmax"}]}}
    finals = {True: [], False: []}
    for seed in (11, 12, 13):
        for in_process in (True, False):
            record = run({**spec, "seed": seed}, tmp_path, mnist_dir, in_process)
            finals[in_process].append(record.history[-1]["val_accuracy"])
    reference, distributed = np.array(finals[True]), np.array(finals[False])
    assert abs(reference.mean() - distributed.mean()) < 0.03, finals
    assert distributed.min() > reference.min() - 0.05 and distributed.max() < reference.max() + 0.05, finals
