"""Image loaders that are processes: same batches whatever their number,
no loader outliving its owner (kill -9 included), a dead loader named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from orchestra.build import data as data_lib
from orchestra.build.images import FolderExamples, index_folder, recipe
from orchestra.build.loader_processes import (
    LoaderError,
    LoaderPool,
    Recipe,
    apply_affine_transform,
)
from orchestra.spec import DataSpec
from orchestra.tools.samples import write_image_tree

AUGMENT_ALL = {"rotation_range": 40, "width_shift_range": 0.2, "height_shift_range": 0.2, "shear_range": 0.2,
               "zoom_range": 0.2, "horizontal_flip": True, "vertical_flip": True, "fill_mode": "nearest"}
GONE_WITHIN = 30.0  # seconds: a bound for the polls below, not a measured time


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("loaders") / "train", per_class=12, size=20, seed=4)


def data_spec(tree) -> DataSpec:
    return DataSpec.model_validate({
        "images": {"train_dir": str(tree), "target_size": [16, 16], "label_mode": "int"},
        "rescale": "1/255", "augmentation": AUGMENT_ALL})


def alive(pid: int) -> bool:
    """Whether `pid` is a running loader process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            is_loader = b"loader_processes.py" in cmdline.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and is_loader


def wait_until_gone(pids: list[int]) -> list[int]:
    """Poll until none of `pids` runs; the ones still running at the bound."""
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def test_the_affine_transform_is_keras_own():
    """The loaders apply Keras's transform without importing Keras."""
    from orchestra.keras_compat import keras

    keras_transform = keras().preprocessing.image.apply_affine_transform
    x = np.random.default_rng(0).random((17, 23, 3)).astype(np.float32)
    cases = [dict(theta=31.0), dict(tx=2.5, ty=-4.0), dict(shear=12.0), dict(zx=0.8, zy=1.15),
             dict(theta=-20.0, tx=1.0, ty=3.0, shear=-7.0, zx=1.1, zy=0.9), dict()]
    for fill_mode in ("nearest", "constant", "reflect", "wrap"):
        for case in cases:
            ours = apply_affine_transform(x, fill_mode=fill_mode, **case)
            theirs = keras_transform(x, row_axis=0, col_axis=1, channel_axis=2, fill_mode=fill_mode, cval=0.0,
                                     order=1, **case)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=f"{fill_mode} {case}")


def training_batches(examples, count: int, epochs_from: int = 0) -> list[tuple[np.ndarray, ...]]:
    pipeline = data_lib.training_pipeline(
        examples, global_batch=8, rank=0, world_size=1, shuffle=True, seed=11, initial_epoch=epochs_from,
        class_weight=None, parallel_calls=2, prefetch=2)
    return [tuple(t.numpy() for t in batch) for batch in pipeline.take(count)]


def test_one_and_two_processes_give_the_same_batches(tree):
    """Same seed, same batches: the same images in the same order with the
    same augmentation draws, whatever the number of loader processes (and
    as the in-process loader gives them)."""
    spec = data_spec(tree)
    index = index_folder(str(tree), "data.images.train_dir")
    steps = 3 * len(index.files) // 8  # three epochs
    runs = []
    for processes in (1, 2):
        with LoaderPool(processes, recipe(spec, seed=5)) as pool:
            runs.append(training_batches(FolderExamples(index, spec, seed=5, pool=pool), steps))
    runs.append(training_batches(FolderExamples(index, spec, threads=1, seed=5), steps))
    one, two, in_process = runs
    assert len(one) == steps
    for k, (a, b, c) in enumerate(zip(one, two, in_process)):
        np.testing.assert_array_equal(a[0], b[0], err_msg=f"batch {k}: images differ")
        np.testing.assert_array_equal(a[1], b[1], err_msg=f"batch {k}: labels differ")
        np.testing.assert_array_equal(a[0], c[0], err_msg=f"batch {k}: not what the in-process loader gives")
    assert np.abs(one[0][0] - one[steps // 3][0]).mean() > 0.01, "a new epoch draws new transforms"


def test_a_batch_split_over_processes_keeps_its_order(tree):
    """Rows come back in the order asked, also when a batch is cut into
    more tasks than there are processes (tasks of at most CHUNK rows)."""
    from orchestra.build import loader_processes

    spec = data_spec(tree)
    index = index_folder(str(tree), "data.images.train_dir")
    reference = FolderExamples(index, spec, seed=1)
    order = np.random.default_rng(3).permutation(len(index.files))
    items = [(int(i), index.files[i]) for i in order]
    expected = np.stack([reference.load(i, 2) for i, _ in items])
    old_chunk, loader_processes.CHUNK = loader_processes.CHUNK, 5
    try:
        with LoaderPool(2, recipe(spec, seed=1)) as pool:
            results: dict[int, np.ndarray] = {}
            callers = [threading.Thread(target=lambda k=k: results.__setitem__(k, pool.load(items, epoch=2)))
                       for k in range(3)]  # as tf.data's threads call it
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
    finally:
        loader_processes.CHUNK = old_chunk
    for k in range(3):
        np.testing.assert_array_equal(results[k], expected)


def test_closing_the_pool_ends_its_processes(tree):
    pool = LoaderPool(2, Recipe(8, 8))
    pids = pool.pids
    assert all(alive(pid) for pid in pids)
    pool.close()
    assert wait_until_gone(pids) == []
    with pytest.raises(LoaderError, match="closed"):
        pool.load([(0, "whatever.png")], epoch=0)


def test_a_pool_closed_while_a_batch_is_copied_out_closes_and_the_batch_is_whole(tree, monkeypatch):
    """A worker closes its pool when training ends, while tf.data's threads
    may still be loading: a batch being copied out of the shared memory
    then keeps that memory until it is copied, and closing succeeds."""
    from orchestra.build import loader_processes

    files = sorted(str(p) for p in tree.glob("*/*.png"))[:4]
    pool = LoaderPool(1, Recipe(16, 16))
    expected = pool.load(list(enumerate(files)), epoch=-1)
    view = loader_processes._Block.view

    def close_while_copying(block, shape):
        pixels = view(block, shape)
        pool.close()
        return pixels

    monkeypatch.setattr(loader_processes._Block, "view", close_while_copying)
    np.testing.assert_array_equal(pool.load(list(enumerate(files)), epoch=-1), expected)
    assert wait_until_gone(pool.pids) == []


def test_loaders_outlive_the_thread_that_made_the_pool(tree):
    """The kernel kills a child when the *thread* that started it ends
    (PR_SET_PDEATHSIG): the pool starts them from its own thread, so a pool
    made on a short-lived thread keeps its loaders."""
    made: list[LoaderPool] = []
    maker = threading.Thread(target=lambda: made.append(LoaderPool(2, Recipe(16, 16))))
    maker.start()
    maker.join()
    pool = made[0]
    try:
        files = sorted(str(p) for p in tree.glob("*/*.png"))[:4]
        assert pool.load(list(enumerate(files)), epoch=0).shape == (4, 16, 16, 3)
        assert all(alive(pid) for pid in pool.pids)
    finally:
        pool.close()


OWNER = textwrap.dedent("""
    import sys, time
    from orchestra.build.loader_processes import LoaderPool, Recipe

    pool = LoaderPool(int(sys.argv[1]), Recipe(16, 16, augmentation={"rotation_range": 30}))
    files = sys.argv[3:]
    pool.load([(i, f) for i, f in enumerate(files)], epoch=0)
    print(" ".join(map(str, pool.pids)), flush=True)
    if sys.argv[2] == "busy":
        while True:  # the loaders are working when the owner is killed
            pool.load([(i, f) for i, f in enumerate(files * 50)], epoch=1)
    time.sleep(600)
""")


@pytest.mark.parametrize("when", ["idle", "busy"])
def test_no_loader_outlives_an_owner_killed_with_sigkill(tree, when):
    files = sorted(str(p) for p in tree.glob("*/*.png"))[:6]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, "3", when, *files], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        assert all(int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == owner.pid for pid in pids)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert wait_until_gone(pids) == [], "loader processes outlived their owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_loader_that_dies_fails_the_input_naming_it(tree):
    spec = data_spec(tree)
    index = index_folder(str(tree), "data.images.train_dir")
    pool = LoaderPool(2, recipe(spec, seed=0))
    try:
        examples = FolderExamples(index, spec, seed=0, pool=pool)
        batches = iter(data_lib.training_pipeline(
            examples, global_batch=8, rank=0, world_size=1, shuffle=True, seed=0, initial_epoch=0,
            class_weight=None, parallel_calls=1, prefetch=0))
        next(batches)
        victim, other = pool.pids
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(Exception) as info:  # tf.data carries the LoaderError's text in its own error
            for _ in range(len(index.files)):
                next(batches)
        message = str(info.value)
        assert f"loader process 1 of 2 (pid {victim}) ended (killed by SIGKILL)" in message
        assert "data_loader.processes" in message
        assert wait_until_gone([other]) == [], "the other loader is stopped with the pool"
        with pytest.raises(LoaderError, match=f"pid {victim}"):
            pool.load([(0, index.files[0])], epoch=0)
    finally:
        pool.close()


def test_an_unreadable_image_fails_its_batch_not_the_pool(tmp_path):
    root = write_image_tree(tmp_path / "train", per_class=2, size=8)
    files = sorted(str(p) for p in root.glob("*/*.png"))
    secret = root / "circle" / "private_name.png"
    secret.write_bytes(b"not a png")
    with LoaderPool(2, Recipe(8, 8)) as pool:
        with pytest.raises(LoaderError) as info:
            pool.load([(0, files[0]), (7, str(secret))], epoch=-1)
        assert "example 7" in str(info.value) and "private_name" not in str(info.value)
        assert pool.load(list(enumerate(files)), epoch=-1).shape == (4, 8, 8, 3)


RAY_OWNER = textwrap.dedent("""
    import os, sys, time
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Worker:
        def start(self, files):
            from orchestra.build.loader_processes import LoaderPool, Recipe

            self.pool = LoaderPool(2, Recipe(16, 16))
            self.pool.load(list(enumerate(files)), epoch=0)
            return os.getpid(), self.pool.pids

    worker = Worker.remote()
    pid, pids = ray.get(worker.start.remote(sys.argv[1:]))
    print(pid, " ".join(map(str, pids)), flush=True)
    sys.stdin.readline()  # the test killed the worker
    ray.shutdown()
""")


@pytest.mark.integration
def test_no_loader_outlives_a_ray_worker_killed_with_sigkill(tree):
    files = sorted(str(p) for p in tree.glob("*/*.png"))[:4]
    driver = subprocess.Popen([sys.executable, "-c", RAY_OWNER, *files], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        worker, *pids = (int(pid) for pid in driver.stdout.readline().split())
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        os.kill(worker, signal.SIGKILL)
        assert wait_until_gone(pids) == [], "loader processes outlived their Ray worker"
        driver.communicate("done\n", timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
