"""Storage on an S3 bucket (storage.bucket), against moto's standalone S3
server started by the tests on 127.0.0.1 (tests/s3_server.py): no mock in
orchestra's code. The processes a test starts (the CLI, its driver, Ray's
workers, which inherit the driver's environment) reach the bucket through
the same environment variables the AWS tools read.

Each reading "process" here gets a mirror of its own (`fresh_mirror`), as
a process on another node would: nothing passes through a shared folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, get_json, run_cli, small_spec, write_spec
from s3_server import S3Server

from orchestra.errors import StorageError
from orchestra.storage import bucket
from orchestra.storage.folders import Storage, remove_published, storage_root
from orchestra.storage.record import JobRecord


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server with one bucket; this process's environment points at it."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log").start()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    bucket._bucket = None  # a client made before would point elsewhere
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    bucket._bucket = None


@pytest.fixture
def fresh_mirror():
    """Start this process's mirror afresh, as another process would have it."""
    def fresh() -> Path:
        bucket._mirror_base = None
        return bucket.mirror_base()
    return fresh


def _prefix(request) -> str:
    return f"unit/{request.node.name}-{time.time_ns()}"


# The URI and the mirror's paths.

def test_storage_root_of_a_bucket_is_a_mirror_that_names_its_place():
    root = storage_root("s3://team-bucket/runs/a")
    assert bucket.locate(root) == bucket.Place("team-bucket", "runs/a")
    assert bucket.locate(root / "job-1" / "job.json").uri == "s3://team-bucket/runs/a/job-1/job.json"
    assert bucket.locate(Path("/somewhere/else/job-1")) is None


@pytest.mark.parametrize("uri, says", [
    ("s3://Bad_Bucket/x", "not an S3 bucket name"),
    ("s3://ok-bucket/a/../b", "'..'"),
    ("gs://bucket/x", "s3://<bucket>/<prefix>"),
])
def test_a_bad_storage_uri_is_one_line_naming_what_is_allowed(uri, says):
    with pytest.raises(StorageError, match=None) as caught:
        storage_root(uri)
    assert says in str(caught.value) and "\n" not in str(caught.value)



def test_the_cli_refuses_a_bad_bucket_in_one_line_with_exit_2(tmp_path):
    result = run_cli("list", "--storage", "s3://Bad_Bucket/jobs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "'Bad_Bucket' is not an S3 bucket name" in line and "s3://<bucket>/<prefix>" in line


def test_an_unreachable_endpoint_is_one_line_naming_the_field_with_exit_2(tmp_path, mnist_dir):
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    spec = write_spec(tmp_path / "s.json", small_spec())
    result = run_cli("validate", spec, "--datasets", mnist_dir, "--storage", tmp_path / "storage",
                     "--set", "data.shards={\"path\": \"s3://team-bucket/mnist-npy\", \"format\": \"npy\"}",
                     "--set", "data.source=null", env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "data.shards.path: cannot read s3://team-bucket/mnist-npy/manifest.json" in result.stderr


def test_a_path_of_another_process_mirror_maps_to_this_process_own(fresh_mirror):
    theirs = bucket.mirror_path(bucket.Place("b-1", "p/job/model"))
    fresh_mirror()
    mine = bucket.own(theirs)
    assert mine != theirs and bucket.locate(mine) == bucket.locate(theirs)
    assert Storage(theirs.parent.parent).root == bucket.own(theirs.parent.parent)



def test_mirrors_of_ended_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"orchestra-s3-{int(ended.stdout)}-abc"
    live = tmp_path / f"orchestra-s3-{os.getpid()}-def"
    for mirror in (dead, live):
        (mirror / "s3@b-1").mkdir(parents=True)
    monkeypatch.setenv(bucket.MIRROR_ENV, str(tmp_path))
    monkeypatch.setattr(bucket, "_mirror_base", None)
    mine = bucket.mirror_base()
    assert mine.parent == tmp_path and live.is_dir() and not dead.exists()


# Records, history and folders through the bucket.

def test_a_record_written_by_one_process_is_read_by_another(s3, request, fresh_mirror):
    fresh_mirror()
    writer = Storage(storage_root(s3.uri(_prefix(request))))
    writer.check_writable()
    writer.create_job_dir("job-1")
    record = JobRecord(job_id="job-1", name="n", workers=2, spec={})
    writer.write_record(record)
    writer.append_history("job-1", {"epoch": 1, "loss": 0.5})
    writer.append_history("job-1", {"epoch": 2, "loss": 0.25})
    fresh_mirror()
    reader = Storage(storage_root(s3.uri(request.node.name)))  # not the same prefix: nothing there
    assert reader.records() == []
    reader = Storage(bucket.own(writer.root))
    assert not reader.job_dir("job-1").exists()  # nothing shared: the reader's mirror starts empty
    assert [r.job_id for r in reader.records()] == ["job-1"]
    again = reader.read_record("job-1", history=True)
    assert again.workers == 2 and [h["loss"] for h in again.history] == [0.5, 0.25]
    with pytest.raises(StorageError, match="already exists"):
        reader.create_job_dir("job-1")
    with pytest.raises(StorageError, match=f"no job 'job-2' in s3://{s3.bucket}/unit/"):
        reader.read_record("job-2")


def _publish(storage: Storage, final: Path, files: dict[str, bytes]) -> None:
    from orchestra.storage.folders import publish_directory

    staging = bucket.own(final).parent / f".staging-test-{time.time_ns()}"
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    publish_directory(staging, final)


def test_a_checkpoint_is_seen_whole_through_its_manifest_and_versions_do_not_mix(s3, request, fresh_mirror):
    fresh_mirror()
    storage = Storage(storage_root(s3.uri(_prefix(request))))
    storage.create_job_dir("job-1")
    final = storage.checkpoint_dir("job-1", 3)
    _publish(storage, final, {"model.weights.h5": b"first", "state.json": b'{"epoch": 3, "callbacks": {}}'})
    _publish(storage, final, {"model.weights.h5": b"second!", "state.json": b'{"epoch": 3, "callbacks": {}}'})
    place = bucket.locate(final)
    versions = {key.split("/")[-2] for key in s3.keys(place.key + "/") if "/.v-" in key}
    assert len(versions) == 1  # the first version was deleted once the second was named
    fresh_mirror()
    local = bucket.pull_folder(final)
    assert local != final and (local / "model.weights.h5").read_bytes() == b"second!"
    assert Storage.read_checkpoint_state(final)["epoch"] == 3
    remove_published(final)
    assert s3.keys(place.key + "/") == []
    assert not bucket.pull_folder(final).exists()  # gone from the bucket: gone from the mirror


def test_a_checkpoint_without_its_manifest_is_never_read_and_the_next_owner_sweeps_it(s3, request, fresh_mirror):
    """What a publisher killed mid-upload leaves: files under a version, no manifest."""
    from orchestra.driver.resume import latest_checkpoint

    fresh_mirror()
    storage = Storage(storage_root(s3.uri(_prefix(request))))
    storage.create_job_dir("job-1")
    storage.write_record(JobRecord(job_id="job-1", name="n", workers=1, spec={}))
    _publish(storage, storage.checkpoint_dir("job-1", 2), {"state.json": b'{"epoch": 2, "callbacks": {}}'})
    half = bucket.locate(storage.checkpoint_dir("job-1", 5))
    s3.client().put_object(Bucket=s3.bucket, Key=f"{half.key}/.v-0bad/state.json",
                           Body=b'{"epoch": 5, "callbacks": {}}')
    fresh_mirror()
    reader = Storage(bucket.own(storage.root))
    reader.read_record("job-1")
    latest = latest_checkpoint(reader, "job-1")
    assert latest is not None and latest.epoch == 2
    assert not reader.checkpoint_dir("job-1", 5).exists()
    swept = reader.sweep_staging("job-1")
    assert "epoch-0005/.v-0bad" in swept
    assert s3.keys(f"{half.key}/") == []
    assert any(key.endswith("epoch-0002/manifest.json") for key in s3.keys(bucket.locate(storage.root).key))


def test_a_manifest_naming_a_file_outside_its_folder_is_refused(s3, request, fresh_mirror):
    fresh_mirror()
    place = bucket.parse_uri(s3.uri(_prefix(request))).child("job-1", "model")
    s3.client().put_object(Bucket=s3.bucket, Key=f"{place.key}/manifest.json",
                           Body=json.dumps({"version": "ab", "files": {"../../job.json": 3}}).encode())
    with pytest.raises(StorageError, match="is not a manifest"):
        bucket.pull_folder(bucket.mirror_path(place))




def test_the_csv_log_is_kept_in_the_bucket_and_a_resumed_driver_continues_it(s3, request, fresh_mirror):
    from orchestra.coordinator import CSVLogger, Decision, EpochResult

    fresh_mirror()
    storage = Storage(storage_root(s3.uri(_prefix(request))))
    path = storage.create_job_dir("job-1") / "training.log"
    first = CSVLogger(path)
    for epoch in (1, 2, 3):
        first.on_epoch_end(EpochResult(epoch, {"loss": 1.0 / epoch}, 1.0, 1.0), Decision())
    key = f"{bucket.locate(path).key}"
    assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode().splitlines()[-1] == \
        "2,0.3333333333333333,NA"
    fresh_mirror()  # the resumed driver: another process, with nothing of the job here yet
    resumed = CSVLogger(path)
    resumed.load_state_dict({"epochs": 2})
    resumed.on_epoch_end(EpochResult(3, {"loss": 0.25}, 1.0, 1.0), Decision())
    rows = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode().splitlines()
    assert rows == ["epoch,loss,val_loss", "0,1.0,NA", "1,0.5,NA", "2,0.25,NA"]
def test_keys_that_name_no_job_folder_are_not_jobs(s3, request, fresh_mirror):
    """`list` and `tensorboard` take job ids from the bucket's keys: `..` and hidden names are none."""
    fresh_mirror()
    root = storage_root(s3.uri(_prefix(request)))
    Storage(root).write_record(JobRecord(job_id="job-1", name="n", workers=1, spec={}))
    prefix = bucket.locate(root).key
    for key in (f"{prefix}/../job.json", f"{prefix}/.hidden/job.json"):
        s3.client().put_object(Bucket=s3.bucket, Key=key, Body=b"{}")
    assert bucket.job_names(root) == ["job-1"]
    fresh_mirror()
    assert [record.job_id for record in Storage(root).records()] == ["job-1"]
    assert not (root.parent / "job.json").exists()
def test_tensorboard_files_are_pushed_as_they_grow_and_pulled_by_a_reader(s3, request, fresh_mirror):
    fresh_mirror()
    storage = Storage(storage_root(s3.uri(_prefix(request))))
    storage.create_job_dir("job-1")
    events = storage.tensorboard_dir("job-1") / "train" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"one")
    record = JobRecord(job_id="job-1", name="n", workers=1, spec={})
    storage.write_record(record)
    with open(events, "ab") as out:
        out.write(b"two")
    storage.write_record(record)
    fresh_mirror()
    sync = bucket.TreeSync.of(storage.tensorboard_dir("job-1"))
    assert sync.pull() == 1
    assert (sync.local / "train" / "events.out.tfevents.1").read_bytes() == b"onetwo"
    assert sync.pull() == 0  # nothing grew since


# Real jobs: the CLI, its driver and two Ray workers, with only the bucket in common.

RECOVERABLE = {
    "data.train_size": 2000,  # 100 steps an epoch: long enough to kill a worker in
    "callbacks.EarlyStopping": {"monitor": "val_loss", "patience": 3, "min_delta": 0},
    "callbacks.ModelCheckpoint": {"monitor": "val_loss", "keep": 1},  # every epoch: a restart starts from the latest
    "callbacks.TensorBoard": {"update_freq": "epoch"},
}
TRAINING_NUMBERS = ("loss", "accuracy", "val_loss", "val_accuracy")


def read_bucket_job(s3: S3Server, prefix: str, job_id: str | None = None) -> dict | None:
    """The job's record and history as the bucket holds them (the test's own look, through boto3)."""
    client = s3.client()
    if job_id is None:
        records = [key for key in s3.keys(f"{prefix}/") if key.count("/") == prefix.count("/") + 2
                   and key.endswith("/job.json")]
        if not records:
            return None
        job_id = records[0].split("/")[-2]
    record = json.loads(client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{job_id}/job.json")["Body"].read())
    try:
        history = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{job_id}/history.jsonl")["Body"].read()
    except client.exceptions.NoSuchKey:
        history = b""
    record["history"] = [json.loads(line) for line in history.decode().splitlines()]
    return record


def submit_on_bucket(s3: S3Server, tmp_path: Path, mnist_dir: Path, spec: dict, prefix: str) -> subprocess.Popen:
    spec_path = write_spec(tmp_path / f"{spec['name']}.json", spec)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestra.cli", "submit", str(spec_path), "--storage", s3.uri(prefix),
             "--datasets", str(mnist_dir)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **s3.env})


def on_bucket_shards(spec: dict, uri: str) -> dict:
    """`spec` reading its examples from npy shards at `uri` instead of `data.source`."""
    data = {name: value for name, value in spec["data"].items() if name != "source"}
    return {**spec, "data": {"shards": {"path": uri, "format": "npy"}, **data}}


@pytest.fixture(scope="module")
def bucket_job(s3, tmp_path_factory, mnist_dir) -> dict:
    """A 2-worker job with its storage on the bucket, run to its end, on
    MNIST as npy shards in the bucket (`data.shards.path: s3://...`,
    written by `orchestra data convert`). The jobs compared with it below
    read the same arrays from `data.source`: npy shards give the in-memory
    path's global batches (test_shards.py), so the numbers must agree."""
    from orchestra.tools.convert import convert

    root = tmp_path_factory.mktemp("bucket-job")
    prefix = f"jobs-{time.time_ns()}"
    shards = s3.uri(f"datasets-{time.time_ns()}/mnist-npy")
    convert("mnist", shards, "npy", 4, datasets=str(mnist_dir))
    spec = on_bucket_shards(small_spec(name="bucket", **RECOVERABLE), shards)
    process = submit_on_bucket(s3, root, mnist_dir, spec, prefix)
    assert process.wait(timeout=600) == 0, (root / "driver.log").read_text()
    record = read_bucket_job(s3, prefix)
    return {"record": record, "prefix": prefix, "uri": s3.uri(prefix), "log": (root / "driver.log").read_text()}


def _cli(s3: S3Server, *args):
    return run_cli(*args, env={**os.environ, **s3.env})



def test_validate_names_the_bucket_not_this_process_s_mirror(s3, request, tmp_path, mnist_dir):
    uri = s3.uri(_prefix(request))
    result = _cli(s3, "validate", write_spec(tmp_path / "job.json", small_spec()), "--storage", uri,
                  "--datasets", mnist_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["storage"] == uri
@pytest.mark.integration
def test_a_job_on_the_bucket_succeeds_and_keeps_everything_there(s3, bucket_job):
    record, prefix = bucket_job["record"], bucket_job["prefix"]
    job = record["job_id"]
    assert record["state"] == "SUCCEEDED", record["reason"]
    stop = record["stopped_epoch"]
    assert [h["epoch"] for h in record["history"]] == list(range(1, stop + 1))
    keys = s3.keys(f"{prefix}/{job}/")
    names = {key[len(f"{prefix}/{job}/"):] for key in keys}
    assert {"job.json", "history.jsonl", "lease.json", "heartbeat.json",
            "model/manifest.json", f"checkpoints/epoch-{stop:04d}/manifest.json"} <= names
    assert not any(name.startswith("checkpoints/epoch-0001/") for name in names)  # retention (keep 1) in the bucket
    for run in ("train", "validation"):
        assert any(name.startswith(f"tensorboard/{run}/events.out.tfevents.") for name in names), names
    assert any(name.startswith("ray/") for name in names), names  # Ray Train's run storage
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/{job}/model/manifest.json")
                          ["Body"].read())
    assert {f"model/.v-{manifest['version']}/{name}" for name in manifest["files"]} <= names


@pytest.mark.integration
def test_status_list_plot_and_evaluate_read_the_bucket(s3, bucket_job, mnist_dir, tmp_path):
    record, uri = bucket_job["record"], bucket_job["uri"]
    job = record["job_id"]
    status = _cli(s3, "status", job, "--storage", uri, "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["state"], shown["epochs_completed"]) == ("SUCCEEDED", record["epochs_completed"])
    listing = _cli(s3, "list", "--storage", uri)
    assert listing.returncode == 0 and job in listing.stdout and "SUCCEEDED" in listing.stdout, listing.stderr
    plotted = _cli(s3, "plot", job, "--storage", uri, "--output", tmp_path / "curves.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    for checkpoint in ("final", "latest"):  # the final model is the last epoch's, which is the latest checkpoint
        evaluated = _cli(s3, "evaluate", job, "--storage", uri, "--checkpoint", checkpoint, "--json",
                         "--datasets", mnist_dir)
        assert evaluated.returncode == 0, evaluated.stderr
        metrics = json.loads(evaluated.stdout)
        metrics = metrics.get("metrics", metrics)
        for name, value in record["test_metrics"].items():
            assert metrics[name] == pytest.approx(value, rel=1e-5), (checkpoint, name)


@pytest.mark.integration
def test_the_latest_checkpoint_loads_here_from_the_bucket_alone(s3, bucket_job, mnist_dir, fresh_mirror):
    from orchestra.build import data as data_lib
    from orchestra.client.inference import load_model
    from orchestra.spec import JobSpec

    record = bucket_job["record"]
    fresh_mirror()
    model = load_model(record["job_id"], storage=bucket_job["uri"], checkpoint="latest")
    assert record["spec"]["data"]["shards"]["path"].startswith("s3://")  # the same arrays, as data.source:
    arrays = data_lib.prepare(JobSpec.model_validate(small_spec(**RECOVERABLE)).data, mnist_dir / "mnist.npz",
                              mnist_dir)
    value = model.evaluate(arrays.x_val, arrays.y_val, verbose=0, return_dict=True)["loss"]
    assert value == pytest.approx(record["history"][-1]["val_loss"], rel=1e-5)


@pytest.mark.integration
def test_tensorboard_serves_the_bucket_jobs_scalars(s3, bucket_job):
    record, job = bucket_job["record"], bucket_job["record"]["job_id"]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestra.cli", "tensorboard", "--storage", bucket_job["uri"], "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **s3.env})
    try:
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line + process.stderr.read()
        base = f"http://127.0.0.1:{port}"
        served = get_json(f"{base}/data/plugin/scalars/scalars?run={job}/train&tag=epoch_loss")
        assert [step for _, step, _ in served] == [h["epoch"] for h in record["history"]]
        assert [value for _, _, value in served] == pytest.approx([h["loss"] for h in record["history"]], rel=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.integration
def test_a_killed_worker_is_replaced_from_the_bucket_checkpoint_with_the_same_numbers(
        s3, bucket_job, tmp_path, mnist_dir):
    prefix = f"killed-{time.time_ns()}"
    process = submit_on_bucket(s3, tmp_path, mnist_dir,
                               small_spec(name="bucket", **RECOVERABLE, **{"scaling.max_failures": 1}), prefix)
    log = tmp_path / "driver.log"
    record = _wait_for_bucket_epoch(s3, prefix, process, log, 2)
    victim = record["worker_pids"]["1"]
    os.kill(victim, signal.SIGKILL)
    assert process.wait(timeout=600) == 0, log.read_text()
    record = read_bucket_job(s3, prefix, record["job_id"])
    assert record["state"] == "SUCCEEDED" and record["restarts"] == 1, record["reason"]
    assert record["worker_pids"]["1"] != victim
    _same_numbers(record, bucket_job["record"])



def _wait_for_bucket_epoch(s3: S3Server, prefix: str, process: subprocess.Popen, log: Path, epoch: int) -> dict:
    deadline = time.monotonic() + 300
    while True:
        exited = process.poll() is not None
        record = read_bucket_job(s3, prefix)
        if record is not None and record["epochs_completed"] >= epoch and record["worker_pids"].get("1"):
            return record
        assert not exited and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _same_numbers(record: dict, reference: dict) -> None:
    assert [h["epoch"] for h in record["history"]] == [h["epoch"] for h in reference["history"]]
    for got, want in zip(record["history"], reference["history"]):
        for name in TRAINING_NUMBERS:
            assert got[name] == pytest.approx(want[name], rel=1e-5), f"epoch {got['epoch']} {name}"
    assert record["test_metrics"] == pytest.approx(reference["test_metrics"], rel=1e-5)


@pytest.mark.integration
def test_a_killed_driver_is_lost_and_resume_continues_from_the_bucket_with_the_same_numbers(
        s3, bucket_job, tmp_path, mnist_dir):
    prefix = f"resumed-{time.time_ns()}"
    process = submit_on_bucket(s3, tmp_path, mnist_dir, small_spec(name="bucket", **RECOVERABLE), prefix)
    record = _wait_for_bucket_epoch(s3, prefix, process, tmp_path / "driver.log", 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    job, uri = record["job_id"], s3.uri(prefix)
    status = _cli(s3, "status", job, "--storage", uri, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "FAILED" and "driver lost" in json.loads(status.stdout)["reason"]
    resumed = _cli(s3, "resume", job, "--storage", uri, "--datasets", mnist_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = read_bucket_job(s3, prefix, job)
    assert record["state"] == "SUCCEEDED" and record["resumes"] == 1
    owner = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/{job}/lease.json")["Body"].read())
    assert owner["generation"] == 2
    _same_numbers(record, bucket_job["record"])


# The lease's generation on a bucket: conditional writes.

def test_conditional_writes_refuse_a_writer_that_read_a_stale_object(s3, request):
    place = bucket.parse_uri(s3.uri(_prefix(request))).child("lease.json")
    first = bucket.put_if(place, b'{"generation": 1}', None)
    with pytest.raises(bucket.WriteConflict):
        bucket.put_if(place, b'{"generation": 1}', None)  # If-None-Match: * on an object that exists
    second = bucket.put_if(place, b'{"generation": 2}', first)
    with pytest.raises(bucket.WriteConflict):
        bucket.put_if(place, b'{"generation": 2}', first)  # If-Match with the ETag read before the change
    assert bucket.get_tagged(place, 100) == (b'{"generation": 2}', second)


def test_each_owner_of_a_bucket_job_takes_the_next_generation_and_fences_the_last(s3, request, fresh_mirror):
    from orchestra.storage.lease import Lease, LeaseLost, read_owner

    fresh_mirror()
    storage = Storage(storage_root(s3.uri(_prefix(request))))
    job_dir = storage.create_job_dir("job-1")
    first = Lease.acquire(job_dir, "job-1")
    first.release()
    fresh_mirror()  # the next owner in another process, with a mirror of its own
    second = Lease.acquire(Storage(bucket.own(storage.root)).job_dir("job-1"), "job-1")
    try:
        assert (first.generation, second.generation) == (1, 2)
        assert read_owner(job_dir).generation == 2
        with pytest.raises(LeaseLost):
            first.fence.check()
        second.fence.check()
    finally:
        second.release()


# deploy/kuberay/raycluster-s3.yaml: the bucket instead of the shared volume.

def test_the_kuberay_bucket_variant_points_every_pod_at_the_bucket_and_mounts_no_storage():
    import yaml

    from orchestra.cli import build_parser

    manifest = Path(__file__).resolve().parent.parent / "deploy" / "kuberay" / "raycluster-s3.yaml"
    datasets, cluster, board, service = yaml.safe_load_all(manifest.read_text())
    assert datasets["spec"]["accessModes"] == ["ReadOnlyMany"]  # input only: the jobs' storage is the bucket
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"])]
    storages = set()
    for pod in pods:
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        storages.add(env["ORCHESTRA_STORAGE"]["value"])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert "secretKeyRef" in env[key]["valueFrom"], key  # never in the file
        assert all(mount.get("readOnly") for mount in container["volumeMounts"])
    (storage,) = storages
    assert bucket.parse_uri(storage).bucket == "orchestra-jobs"
    arguments = build_parser().parse_args(board["spec"]["template"]["spec"]["containers"][0]["command"][1:])
    assert arguments.storage == storage and arguments.watch
    assert "volumes" not in board["spec"]["template"]["spec"]
    assert service["spec"]["ports"][0]["targetPort"] == 6006
