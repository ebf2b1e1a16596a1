"""Spec → arrays → per-worker pipelines: splits, sharding, evaluation sets."""

from __future__ import annotations

import numpy as np
import pytest

from orchestra.build import data
from orchestra.spec import DataSpec


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (103, 4, 4), dtype=np.uint8),
             y_train=np.arange(103) % 3, x_test=rng.integers(0, 256, (11, 4, 4), dtype=np.uint8),
             y_test=(np.arange(11) % 3).reshape(11, 1))
    return path


def prepare(path, **fields):
    spec = DataSpec(source=str(path), **fields)
    return data.prepare(spec, data.resolve_source(spec.source, path.parent), path.parent)


def test_random_subsets_are_disjoint_and_seeded(tiny_npz):
    a = prepare(tiny_npz, train_size=50, validation_size=20, rescale=1 / 255, flatten=True, labels="one_hot")
    b = prepare(tiny_npz, train_size=50, validation_size=20, rescale=1 / 255, flatten=True, labels="one_hot")
    assert a.x_train.shape == (50, 16) and a.x_val.shape == (20, 16)
    assert a.y_train.shape == (50, 3) and a.y_test.shape == (11, 3)
    assert np.array_equal(a.x_train, b.x_train)
    assert a.x_train.max() <= 1.0
    rows = {row.tobytes() for row in a.x_train}
    assert not rows & {row.tobytes() for row in a.x_val}


def test_fraction_split(tiny_npz):
    arrays = prepare(tiny_npz, validation_split=0.2)
    assert len(arrays.x_val) == 21 and len(arrays.x_train) == 82  # ceil, as scikit-learn's test_size


def test_dataset_directory_comes_before_keras(tmp_path, tiny_npz):
    (tmp_path / "mnist.npz").write_bytes(tiny_npz.read_bytes())
    assert data.resolve_source("mnist", tmp_path) == (tmp_path / "mnist.npz").resolve()
    assert data.resolve_source("mnist", tmp_path / "elsewhere") is None  # left to Keras's download
    with pytest.raises(data.FieldError, match="expected .*nosuch.npz"):
        data.resolve_source("nosuch", tmp_path)


def test_prepared_examples_can_be_handed_to_tensorflow_as_they_are(tiny_npz):
    """Aligned, C-contiguous and writable: `host_tensor` wraps them without a copy."""
    arrays = prepare(tiny_npz, validation_size=20, rescale=1 / 255, reshape=[16])
    for x in (arrays.x_train, arrays.x_val, arrays.x_test):
        assert x.ctypes.data % data.ALIGNMENT == 0 and x.flags.c_contiguous and x.flags.writeable
    assert arrays.x_train.dtype == np.float32 and arrays.x_train.shape == (83, 16)


def test_real_mnist_layout(mnist_dir):
    arrays = prepare(mnist_dir / "mnist.npz", train_size=700, validation_size=300, flatten=True, rescale=1 / 255)
    assert arrays.x_train.shape == (700, 784) and arrays.x_test.shape == (10000, 784)
    assert np.bincount(arrays.y_test, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def batches(world_size, rank, x, epochs=2):
    dataset = data.training_dataset(
        x, np.zeros(len(x), np.int64), global_batch=12, rank=rank, world_size=world_size, shuffle=True,
        seed=3, initial_epoch=0, class_weight=None, parallel_calls=2, prefetch=1,
    )
    steps = data.steps_per_epoch(len(x), 12)
    return [xb.numpy().ravel().tolist() for xb, _ in dataset.take(steps * epochs)]


def test_global_batches_do_not_depend_on_worker_count():
    x = np.arange(50, dtype=np.float32).reshape(50, 1)
    one = batches(1, 0, x)
    two = [a + b for a, b in zip(batches(2, 0, x), batches(2, 1, x))]
    three = [a + b + c for a, b, c in zip(batches(3, 0, x), batches(3, 1, x), batches(3, 2, x))]
    assert one == two == three
    assert len(one) == 8 and all(len(b) == 12 for b in one)
    first_epoch = sum(one[:4], [])
    assert len(set(first_epoch)) == 48              # no example twice in an epoch
    assert one[:4] != one[4:]                        # reshuffled each epoch


def test_evaluation_shares_cover_every_example_once():
    for n, world, batch in [(300, 2, 5), (11, 2, 5), (101, 3, 7), (10, 2, 1)]:
        x = np.arange(n, dtype=np.float32).reshape(n, 1)
        steps = data.evaluation_steps(n, batch, world)
        seen = []
        for rank in range(world):
            shares = list(data.evaluation_dataset(x, x, per_worker_batch=batch, rank=rank, world_size=world))
            assert len(shares) == steps and all(len(xb) > 0 for xb, _ in shares)
            seen += [v for xb, _ in shares for v in xb.numpy().ravel().tolist()]
        assert sorted(seen) == list(range(n))


def test_arrays_are_captured_by_the_pipeline_not_copied_into_its_graph():
    """Issue 17: made inside the function tf.data traces, `tf.constant` of the
    whole array was a constant of the graph, copied again at every iterator
    (seconds an epoch, GBs). The traced function must capture the array."""
    import tensorflow as tf

    x = np.zeros((4096, 64), np.float32)  # 1 MB
    examples = data.ArrayExamples(x, np.zeros(len(x), np.int64))

    @tf.function
    def fetch(indices):
        return examples.fetch(indices, tf.constant(0, tf.int64))

    graph = fetch.get_concrete_function(tf.TensorSpec([None], tf.int64)).graph.as_graph_def()
    assert graph.ByteSize() < 100_000
    batch, _ = fetch(tf.constant([3, 1], tf.int64))
    assert batch.shape == (2, 64)
