"""One copy of the arrays per node: the workers of a node map the same file
pages, TensorFlow reads them in place, and the batches are those of arrays
held in each worker's own memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, small_spec

from orchestra.build import data, node_cache
from orchestra.spec import DataSpec

# A child process: maps the node's copy, reads every page, says where it
# mapped it, and holds it until told to end (a line on stdin).
HOLDER = """
import json, sys
from pathlib import Path
import numpy as np
from orchestra.build import node_cache
from orchestra.spec import DataSpec
spec, npz, root = DataSpec.model_validate_json(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
arrays = node_cache.node_arrays(spec, npz, npz.parent, root=root)
checksum = float(np.asarray(arrays.x_train).sum(dtype=np.float64))
print(json.dumps({"path": str(arrays.x_train.filename), "checksum": checksum}), flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (3000, 28, 28), dtype=np.uint8), y_train=np.arange(3000) % 10,
             x_test=rng.integers(0, 256, (500, 28, 28), dtype=np.uint8), y_test=np.arange(500) % 10)
    return path


def spec_of(npz: Path, **fields) -> DataSpec:
    return DataSpec(source=str(npz), rescale=1 / 255, flatten=True, validation_size=500, **fields)


def holders(spec: DataSpec, npz: Path, root: Path, count: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return [subprocess.Popen([sys.executable, "-c", HOLDER, spec.model_dump_json(), str(npz), str(root)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(count)]


def release(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.communicate("\n", timeout=60)
        assert process.returncode == 0


def mapping(pid: int, path: str) -> dict[str, int]:
    """The smaps fields (kB) of process `pid`'s mapping of file `path`."""
    fields, inside = {}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(" " + path)
        elif inside and line.split()[-1] == "kB":
            name, value = line.split()[:2]
            fields[name.rstrip(":")] = fields.get(name.rstrip(":"), 0) + int(value)
    return fields


def test_the_workers_of_a_node_map_one_copy(npz, tmp_path):
    spec = spec_of(npz)
    processes = holders(spec, npz, tmp_path, 2)
    try:
        said = [json.loads(process.stdout.readline()) for process in processes]
        assert said[0] == said[1]
        assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(said[0]["path"]).parent.name]
        nbytes_kb = os.path.getsize(said[0]["path"]) // 1024
        for process in processes:
            pages = mapping(process.pid, said[0]["path"])
            # Every page read by both: resident in each, half of it in each one's proportional share.
            assert pages["Rss"] >= nbytes_kb
            assert pages["Pss"] <= pages["Rss"] / 2 + 4
            assert pages["Anonymous"] == 0
    finally:
        release(processes)
    expected = data.prepare(spec, npz, npz.parent)
    shared = np.load(said[0]["path"])
    assert np.array_equal(shared, expected.x_train) and shared.dtype == np.float32
    assert said[0]["checksum"] == float(expected.x_train.sum(dtype=np.float64))


def test_the_mapped_arrays_are_the_prepared_ones(npz, tmp_path):
    spec = spec_of(npz, labels="one_hot", test=True)
    mapped, prepared = node_cache.node_arrays(spec, npz, npz.parent, root=tmp_path), data.prepare(spec, npz, npz.parent)
    for name in node_cache.NAMES:
        assert np.array_equal(getattr(mapped, name), getattr(prepared, name)), name
    assert mapped.input_shape == prepared.input_shape == (784,)


def test_a_set_no_process_holds_is_deleted_by_the_next(npz, tmp_path):
    mine = node_cache.node_arrays(spec_of(npz, train_size=100), npz, npz.parent, root=tmp_path)  # held here
    release(holders(spec_of(npz, train_size=200), npz, tmp_path, 1))  # made, then let go
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    latest = node_cache.node_arrays(spec_of(npz, train_size=300), npz, npz.parent, root=tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    keys = sorted(Path(a.x_train.filename).parent.name for a in (mine, latest))
    assert kept == sorted(keys + [f"{key}{suffix}" for key in keys for suffix in (".lock", ".make")])
    assert len(mine.x_train) == 100 and len(latest.x_train) == 300


def test_a_damaged_set_is_made_again(npz, tmp_path):
    spec = spec_of(npz, train_size=100)
    path = Path(node_cache.node_arrays(spec, npz, npz.parent, root=tmp_path).x_train.filename)
    with open(path, "r+b") as handle:
        handle.truncate(200)
    again = node_cache.node_arrays(spec, npz, npz.parent, root=tmp_path)
    assert np.array_equal(again.x_train, data.prepare(spec, npz, npz.parent).x_train)


def test_a_changed_source_is_a_new_set(npz, tmp_path):
    spec = spec_of(npz, train_size=100)
    before = node_cache.cache_key(spec, npz)
    assert node_cache.cache_key(spec_of(npz, train_size=101), npz) != before
    os.utime(npz, ns=(os.stat(npz).st_atime_ns, os.stat(npz).st_mtime_ns + 1))
    assert node_cache.cache_key(spec, npz) != before


def test_a_folder_others_can_write_is_refused(npz, tmp_path):
    tmp_path.chmod(0o777)
    with pytest.raises(PermissionError, match="only this user"):
        node_cache.node_arrays(spec_of(npz), npz, npz.parent, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_worker_prepares_its_own_copy_when_the_node_folder_is_unusable(npz, tmp_path, monkeypatch, caplog):
    from orchestra.coordinator.protocol import WorkerConfig
    from orchestra.spec import JobSpec
    from orchestra.worker import pipelines

    spec = JobSpec.model_validate(small_spec(**{"data.source": str(npz)}))
    config = WorkerConfig(spec=spec, npz_path=str(npz), datasets_dir=str(npz.parent), model_dir="", tensorboard_dir="")
    tmp_path.chmod(0o777)
    monkeypatch.setattr(node_cache, "default_root", lambda: tmp_path)
    monkeypatch.setattr(pipelines, "workers_on_this_node", lambda config: 2)  # as Ray Train would say
    arrays = pipelines.job_arrays(config)
    assert not isinstance(arrays.x_train, np.memmap) and list(tmp_path.iterdir()) == []
    assert np.array_equal(arrays.x_train, data.prepare(spec.data, npz, npz.parent).x_train)
    assert "prepares its own copy" in caplog.text and str(tmp_path) in caplog.text


def anonymous_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Anonymous line")


def pipeline(examples, world_size=1, rank=0):
    return data.training_pipeline(examples, global_batch=256, rank=rank, world_size=world_size, shuffle=True,
                                  seed=1, initial_epoch=0, class_weight={0: 2.0}, parallel_calls=2, prefetch=2)


def epoch(examples, steps, world_size=1, rank=0):
    return [[t.numpy() for t in batch] for batch in pipeline(examples, world_size, rank).take(steps)]


def test_the_pipeline_reads_mapped_arrays_in_place(tmp_path):
    """No copy of the arrays in the worker's own memory: neither in making
    the tensors nor in tf.data's graph rewrites (which copy what a pipeline
    captures, and are skipped for arrays)."""
    rows, width = 24_576, 1024  # 96 MiB of float32
    np.save(tmp_path / "x.npy", np.ones((rows, width), np.float32))
    np.save(tmp_path / "y.npy", np.arange(rows) % 10)
    epoch(data.ArrayExamples(np.ones((512, 4), np.float32), np.zeros(512, np.int64)), 2)  # TensorFlow's own set-up
    before = anonymous_mb()
    x = np.load(tmp_path / "x.npy", mmap_mode="c")
    dataset = pipeline(data.ArrayExamples(x, np.load(tmp_path / "y.npy", mmap_mode="c")))
    shapes = {tuple(batch[0].shape) for batch in dataset.take(rows // 256)}  # every row read once
    assert shapes == {(256, width)}
    assert anonymous_mb() - before < 96 / 2
    assert mapping(os.getpid(), str(tmp_path / "x.npy"))["Rss"] >= rows * width * 4 // 1024


def test_in_place_and_copied_arrays_give_the_same_batches():
    rng = np.random.default_rng(3)
    x, y = rng.random((1000, 5), dtype=np.float32), rng.integers(0, 3, 1000)
    in_place = data.aligned_empty(x.shape, np.float32)
    in_place[...] = x
    read_only = np.frombuffer(x.tobytes(), np.float32).reshape(x.shape)  # copied by TensorFlow
    assert not read_only.flags.writeable
    for world_size in (1, 2):
        for rank in range(world_size):
            reference = epoch(data.ArrayExamples(x.copy(), y), 8, world_size, rank)
            for variant in (in_place, read_only):
                for ours, theirs in zip(epoch(data.ArrayExamples(variant, y), 8, world_size, rank), reference):
                    for a, b in zip(ours, theirs):
                        assert np.array_equal(a, b)


@pytest.mark.integration
def test_a_two_worker_job_maps_one_copy(tmp_path, mnist_dir):
    """Both workers of a 2-worker job on this node map the same file of the
    node's copy, checked at the end of epoch 1 (the workers wait for the
    driver's decision meanwhile); once they are gone nobody holds it."""
    import fcntl

    import psutil

    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job
    from orchestra.spec import JobSpec

    spec = JobSpec.model_validate(small_spec(**{"fit.epochs": 2, "callbacks.EarlyStopping": None,
                                                "callbacks.TensorBoard": None}))
    prepared = preflight(spec, storage=str(tmp_path / "storage"), datasets=str(mnist_dir))
    record = create_job(prepared)
    seen = {}

    def inspect(result):
        if result.epoch == 1:
            for rank, pid in record.worker_pids.items():
                maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
                seen[rank] = {(line.split()[3], line.split()[4], line.split()[5]) for line in maps
                              if line.split()[-1].endswith("x_train.npy") and "orchestra-arrays-" in line}

    final = run_job(prepared, record, progress=inspect)
    assert final.state.value == "SUCCEEDED", final.reason
    psutil.wait_procs([psutil.Process(pid) for pid in record.worker_pids.values() if psutil.pid_exists(pid)],
                      timeout=60)
    assert sorted(seen) == ["0", "1"] and len(seen["0"]) == 1 and seen["0"] == seen["1"]  # (device, inode, path)
    (path,) = {entry[2] for entry in seen["0"]}
    lock = os.open(Path(path).parent.with_suffix(node_cache.LOCK_SUFFIX), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still holds the copy
    finally:
        os.close(lock)
