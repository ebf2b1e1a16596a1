"""GPUs, custom Ray resources and accelerator types: the spec's fields,
what they become for Ray Train and TensorFlow, and a job that asks for what
the cluster does not have (PENDING, named, cancellable).

This machine has no GPU: the options chosen for GPUs are tested as units;
Ray's side is tested for real with a custom resource a local Ray declares
(and lacks), which Ray places exactly as it places GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT, run_cli, write_spec

from orchestra import cli
from orchestra.build.accelerators import collective_implementation, grow_gpu_memory
from orchestra.build.tuning import threads_per_worker
from orchestra.driver.resources import (
    GB,
    Node,
    fit_problems,
    footprint,
    missing,
    scaling_arguments,
    this_machine,
)
from orchestra.errors import SpecError
from orchestra.spec import JobSpec, parse_spec


def spec_dict(scaling: dict | None = None, **sections) -> dict:
    """A small MNIST job without a callbacks section (the defaults)."""
    return {
        "name": "accel", "seed": 1,
        "data": {"source": "mnist", "rescale": "1/255", "flatten": True, "labels": "sparse",
                 "train_size": 200, "validation_size": 100, "test": False, "seed": 3},
        "model": {"layers": [{"type": "Dense", "units": 16, "activation": "relu"},
                             {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": 1, "batch_size": 20},
        "scaling": {"workers": 2, **(scaling or {})},
        **sections,
    }


def spec_of(**scaling) -> JobSpec:
    return JobSpec.model_validate(spec_dict(scaling))


def problems(**scaling) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_spec(json.dumps(spec_dict(scaling)))
    return caught.value.problems


# The spec's fields


@pytest.mark.parametrize("scaling, gpus", [
    ({}, 0), ({"use_gpu": True}, 1), ({"gpus_per_worker": 0.5}, 0.5), ({"gpus_per_worker": 2}, 2),
    ({"use_gpu": True, "gpus_per_worker": 0.25}, 0.25), ({"use_gpu": False, "gpus_per_worker": 0}, 0),
])
def test_use_gpu_means_one_gpu_and_gpus_imply_use_gpu(scaling, gpus):
    spec = spec_of(**scaling)
    assert (spec.scaling.gpus_per_worker, spec.scaling.use_gpu) == (gpus, gpus > 0)
    # the record's copy of the spec (every field written out) reads back the same
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("scaling, field, words", [
    ({"use_gpu": False, "gpus_per_worker": 0.5}, "scaling.use_gpu", "contradicts gpus_per_worker 0.5"),
    ({"use_gpu": True, "gpus_per_worker": 0}, "scaling.gpus_per_worker", "contradicts use_gpu true"),
    ({"gpus_per_worker": 1.5}, "scaling.gpus_per_worker", "a fraction below 1 (workers share it) or a whole"),
    ({"gpus_per_worker": 0.00001}, "scaling.gpus_per_worker", "4 decimal places"),
    ({"accelerator_type": "A100"}, "scaling.accelerator_type", "set gpus_per_worker"),
    ({"gpus_per_worker": 1, "accelerator_type": "a100"}, "scaling.accelerator_type", "did you mean 'A100'"),
    ({"resources_per_worker": {"GPU": 1}}, "scaling.resources_per_worker.GPU", "use scaling.gpus_per_worker"),
    ({"resources_per_worker": {"cpu": 1}}, "scaling.resources_per_worker.cpu", "use scaling.cpus_per_worker"),
    ({"resources_per_worker": {"accelerator_type:A100": 1}}, "scaling.resources_per_worker.accelerator_type:A100",
     "use scaling.accelerator_type"),
    ({"resources_per_worker": {"my disk": 1}}, "scaling.resources_per_worker.my disk", "not a resource name"),
    ({"resources_per_worker": {"ssd": 0}}, "scaling.resources_per_worker.ssd", "more than 0"),
    ({"resources_per_worker": {"ssd": 2.5}}, "scaling.resources_per_worker.ssd", "whole number"),
])
def test_contradictions_and_bad_resources_name_the_field(scaling, field, words):
    found = problems(**scaling)
    assert [path for path, _ in found] == [field], found
    assert words in found[0][1]


def test_a_bad_resource_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.json", spec_dict({"use_gpu": False, "gpus_per_worker": 0.5}))
    assert cli.main(["validate", str(path), "--schema-only"]) == 2
    err = capsys.readouterr().err
    assert "scaling.use_gpu: false contradicts gpus_per_worker 0.5" in err and "Traceback" not in err


def test_accelerator_types_are_ray_s_own():
    from ray.util.accelerators import NVIDIA_A100, NVIDIA_TESLA_T4

    for name in (NVIDIA_A100, NVIDIA_TESLA_T4):
        assert spec_of(gpus_per_worker=1, accelerator_type=name).scaling.accelerator_type == name


# What they become for Ray Train


def test_ray_train_gets_gpus_custom_resources_and_the_accelerator_type():
    """Ray Train's own ScalingConfig, built from the spec: what its placement group asks for."""
    from ray.train import ScalingConfig

    spec = spec_of(cpus_per_worker=0.5, gpus_per_worker=0.5, resources_per_worker={"fake_gpu_like": 1},
                   accelerator_type="A100")
    config = ScalingConfig(**scaling_arguments(spec))
    assert config.num_workers == 2 and config.use_gpu
    assert config._resources_per_worker_not_none == {
        "CPU": 0.5, "GPU": 0.5, "fake_gpu_like": 1, "accelerator_type:A100": 0.001}


def test_a_cpu_job_asks_ray_for_cpus_only():
    from ray.train import ScalingConfig

    config = ScalingConfig(**scaling_arguments(spec_of(cpus_per_worker=2)))
    assert not config.use_gpu and config._resources_per_worker_not_none == {"CPU": 2}


# What they become in the workers


@pytest.mark.parametrize("gpus, implementation", [(0, "AUTO"), (0.5, "RING"), (1, "NCCL"), (4, "NCCL")])
def test_nccl_only_for_workers_with_whole_gpus_of_their_own(gpus, implementation):
    assert collective_implementation(spec_of(gpus_per_worker=gpus)) == implementation


def test_threads_per_worker_auto_keeps_its_cpu_meaning_with_gpus():
    assert threads_per_worker(spec_of(cpus_per_worker=3, gpus_per_worker=1)) == 3
    assert threads_per_worker(spec_of(cpus_per_worker=3)) == 3


def test_gpu_memory_growth_is_set_only_for_gpu_jobs_and_only_on_gpus():
    from orchestra.keras_compat import tensorflow

    assert grow_gpu_memory(spec_of()) == []
    present = [gpu.name for gpu in tensorflow().config.list_physical_devices("GPU")]
    assert grow_gpu_memory(spec_of(gpus_per_worker=1)) == present


# A cluster without what the job asks for: PENDING, not refused


def test_missing_gpus_and_resources_are_named_not_refused():
    spec = spec_of(gpus_per_worker=1, resources_per_worker={"fake_gpu_like": 1}, accelerator_type="A100")
    need = footprint(spec, (784,))
    cpu_only = [Node("cpu-only", 4, int(24 * GB), 0)]
    assert fit_problems(spec, need, cpu_only, fixed=True) == []
    lacking = dict(missing(spec, cpu_only))
    assert set(lacking) == {"scaling.gpus_per_worker", "scaling.resources_per_worker.fake_gpu_like",
                            "scaling.accelerator_type"}
    assert lacking["scaling.gpus_per_worker"] == "2 workers x 1 GPU need 2, but the cluster has 0"
    assert "no node of the cluster has A100 GPUs" in lacking["scaling.accelerator_type"]


def test_resources_are_counted_per_node_and_in_all():
    spec = spec_of(workers=2, gpus_per_worker=2)
    one_each = [Node("a", 4, int(24 * GB), 1), Node("b", 4, int(24 * GB), 1)]
    assert dict(missing(spec, one_each))["scaling.gpus_per_worker"] == (
        "2 workers x 2 GPU need 4, but the cluster has 2")
    four_ones = one_each + [Node("c", 4, int(24 * GB), 1), Node("d", 4, int(24 * GB), 1)]
    assert dict(missing(spec, four_ones))["scaling.gpus_per_worker"] == (
        "a worker needs 2 GPU on one node, but a node has at most 1")
    two = [Node("a", 4, int(24 * GB), 2)]
    assert "need 4, but the cluster has 2" in dict(missing(spec, two))["scaling.gpus_per_worker"]
    enough = [Node("a", 4, int(24 * GB), 2, {"accelerator_type:A100": 1}), Node("b", 4, int(24 * GB), 2)]
    assert missing(spec, enough) == []
    assert missing(spec_of(gpus_per_worker=2, accelerator_type="A100"), enough) == []


def test_validate_says_what_the_job_would_wait_for_on_this_machine(tmp_path, capsys, mnist_dir):
    if this_machine().gpus:
        pytest.skip("this machine has a GPU")
    path = write_spec(tmp_path / "spec.json", spec_dict({"gpus_per_worker": 0.5,
                                                          "resources_per_worker": {"fake_gpu_like": 1}}))
    args = ["validate", str(path), "--storage", str(tmp_path / "s"), "--datasets", str(mnist_dir)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "would wait PENDING: scaling.gpus_per_worker: 2 workers x 0.5 GPU" in out
    assert "would wait PENDING: scaling.resources_per_worker.fake_gpu_like: 2 workers x 1 'fake_gpu_like'" in out
    assert cli.main([*args, "--json"]) == 0
    waits = json.loads(capsys.readouterr().out)["waits_for"]
    assert [w["field"] for w in waits] == ["scaling.gpus_per_worker", "scaling.resources_per_worker.fake_gpu_like"]
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


# Ray's side, for real


# A driver on a local Ray that declares 2 of a custom resource, as a node
# started with `ray start --resources '{"fake_gpu_like": 2}'` would.
DRIVER_WITH_RESOURCE = """
import sys, ray
ray.init(address="local", num_cpus=2, resources={"fake_gpu_like": 2}, include_dashboard=False,
         log_to_driver=False, configure_logging=False)
from orchestra.driver.preflight import preflight
from orchestra.driver.run import create_job, run_job
from orchestra.spec import JobSpec, load_spec
prepared = preflight(load_spec(sys.argv[1]), storage=sys.argv[2], datasets=sys.argv[3])
record = create_job(prepared)
print("JOB", record.job_id, flush=True)
print("END", run_job(prepared, record).state.value, flush=True)
"""


def _driver(spec_path, storage, mnist_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER_WITH_RESOURCE, str(spec_path), str(storage),
                             str(mnist_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _status(job_id: str, storage) -> dict:
    result = run_cli("status", job_id, "--storage", storage, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_for_reason(job_id: str, storage, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(job_id, storage)
        if status["reason"] and status["reason"].startswith("waiting for resources"):
            return status
        assert status["state"] == "PENDING", status
        time.sleep(1)
    raise AssertionError(f"no waiting reason within {timeout} s")


@pytest.mark.integration
def test_resources_per_worker_reach_ray_s_placement(tmp_path, mnist_dir):
    """2 workers x 1 of the 2 the node has: placed and trained. 2 x 2 of
    them: Ray places neither (the CPUs would do), the job waits PENDING
    naming the resource, and cancel stops it."""
    storage = tmp_path / "storage"
    fits = _driver(write_spec(tmp_path / "fits.json", spec_dict({"cpus_per_worker": 0.5,
                                                                 "resources_per_worker": {"fake_gpu_like": 1}})),
                   storage, mnist_dir)
    out, _ = fits.communicate(timeout=300)
    assert "END SUCCEEDED" in out, out

    driver = _driver(write_spec(tmp_path / "waits.json", spec_dict({"cpus_per_worker": 0.5,
                                                                   "resources_per_worker": {"fake_gpu_like": 2}})),
                     storage, mnist_dir)
    try:
        job_id = driver.stdout.readline().split()[1]
        status = _wait_for_reason(job_id, storage)
        assert status["state"] == "PENDING"
        assert ("scaling.resources_per_worker.fake_gpu_like: 2 workers x 2 'fake_gpu_like' need 4, but the "
                "cluster has 2") in status["reason"]
        time.sleep(5)
        assert _status(job_id, storage)["state"] == "PENDING"
        assert run_cli("cancel", job_id, "--storage", storage).returncode == 0
        driver.wait(timeout=120)  # run_job records STOPPED, then goes on up as an interrupt would
        assert _status(job_id, storage)["state"] == "STOPPED"
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.integration
def test_a_gpu_this_machine_lacks_leaves_the_job_pending_until_cancelled(tmp_path, mnist_dir):
    if this_machine().gpus:
        pytest.skip("this machine has a GPU")
    storage = tmp_path / "storage"
    spec = write_spec(tmp_path / "gpu.json", spec_dict({"cpus_per_worker": 0.5, "gpus_per_worker": 1}))
    submitted = run_cli("submit", spec, "--detach", "--storage", storage, "--datasets", mnist_dir)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[1].rstrip(":")
    status = _wait_for_reason(job_id, storage)
    assert status["state"] == "PENDING"
    assert "scaling.gpus_per_worker: 2 workers x 1 GPU need 2, but the cluster has 0" in status["reason"]
    processes = _driver_and_its_ray(job_id)
    assert len(processes) > 1, "the background driver and its embedded Ray"
    assert run_cli("cancel", job_id, "--storage", storage).returncode == 0
    deadline = time.monotonic() + 120
    while _status(job_id, storage)["state"] != "STOPPED":
        assert time.monotonic() < deadline, "not STOPPED within 120 s of cancel"
        time.sleep(1)
    gone, alive = psutil.wait_procs(processes, timeout=120)
    assert not alive, f"left running after cancel: {[p.pid for p in alive]}"


def _driver_and_its_ray(job_id: str) -> list[psutil.Process]:
    """The job's background driver (`python -m orchestra.driver ... JOB`) and every process under it."""
    for process in psutil.process_iter(["cmdline"]):
        words = process.info["cmdline"] or []
        if "orchestra.driver" in words and any(job_id in word for word in words):
            return [process, *process.children(recursive=True)]
    raise AssertionError(f"no driver process for {job_id}")


# The GPU plan's table in docs/gpus.md is the script's output, not typed


def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_gradients():
    from bench.gpu_plan import ring_bytes_per_worker

    assert ring_bytes_per_worker(4_000, 1) == 0
    assert ring_bytes_per_worker(4_000, 2) == 4_000
    assert ring_bytes_per_worker(4_000, 4) == 6_000


def test_the_gpu_plan_in_the_docs_is_the_script_s(tmp_path):
    """Each job's row, recomputed (the jobs without a backbone: building
    InceptionV3 takes too long for the fast tier)."""
    from bench.gpu_plan import JOBS, TABLE_END, TABLE_START, plan, write_table

    page = ROOT / "docs" / "gpus.md"
    doc = page.read_text()
    table = doc[doc.index(TABLE_START):doc.index(TABLE_END)]
    small = [path for path in sorted(JOBS.glob("*.json")) if "backbone" not in json.loads(path.read_text())["model"]]
    assert len(small) >= 5
    fresh = plan([2, 8], small).splitlines()
    for line in fresh[2:]:
        assert line in table.splitlines(), f"docs/gpus.md is stale: python -m bench.gpu_plan --write {page}"
    copy = tmp_path / "page.md"
    copy.write_text(f"top\n{TABLE_START}\nold\n{TABLE_END}\nbottom\n")
    write_table(copy, "new table")
    assert copy.read_text() == f"top\n{TABLE_START}\nnew table\n{TABLE_END}\nbottom\n"


@pytest.mark.integration
def test_validate_with_an_address_names_what_that_cluster_lacks(tmp_path):
    """A real two-node Ray cluster, and a third node that declares 1 of a
    custom resource: validate reads the nodes through the job server."""
    from ray_cluster import LoopbackCluster

    cluster = LoopbackCluster(tmp_path).start()
    try:
        cluster._start_node("node3", [f"--address=127.0.0.1:{cluster.gcs_port}",
                                      '--resources={"fake_gpu_like": 1}'])
        cluster._wait_for_nodes(3, 180)
        spec = write_spec(tmp_path / "spec.json", spec_dict({"cpus_per_worker": 0.5, "gpus_per_worker": 0.5,
                                                             "resources_per_worker": {"fake_gpu_like": 1}}))
        result = run_cli("validate", spec, "--schema-only", "--json", env=cluster.client_env())
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["waits_for"] == [
            {"field": "scaling.gpus_per_worker", "reason": "2 workers x 0.5 GPU need 1, but the cluster has 0"},
            {"field": "scaling.resources_per_worker.fake_gpu_like",
             "reason": "2 workers x 1 'fake_gpu_like' need 2, but the cluster has 1"}]
        one = write_spec(tmp_path / "one.json", spec_dict({"workers": 1, "cpus_per_worker": 0.5,
                                                           "resources_per_worker": {"fake_gpu_like": 1}}))
        result = run_cli("validate", one, "--schema-only", "--json", env=cluster.client_env())
        assert result.returncode == 0 and json.loads(result.stdout)["waits_for"] == [], result.stderr
    finally:
        cluster.stop()
