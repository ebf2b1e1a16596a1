"""Sharded datasets in an S3 bucket (`data.shards.path: s3://bucket/prefix`),
against moto's standalone S3 server on 127.0.0.1 (tests/s3_server.py): no
mock in orchestra's code. The manifest read from the bucket as input, the
node's shard cache (each file downloaded once, verified, only what is
read), and `orchestra data convert` into a bucket. The 2-worker job on
shards in a bucket is test_s3.py's `bucket_job`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_s3
from s3_server import S3Server
from test_shards import N_TEST, converted, data_spec, job, toy_arrays

from orchestra.build import node_cache, shards
from orchestra.cli import main as cli_main
from orchestra.errors import FieldError
from orchestra.storage import bucket
from orchestra.tools.convert import convert

s3 = test_s3.s3  # the fixture: moto's server, with this process pointed at it


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's node cache of shards (under `ORCHESTRA_S3_CACHE`)."""
    monkeypatch.setenv(bucket.MIRROR_ENV, str(tmp_path / "node"))
    return node_cache.default_shard_root()


@pytest.fixture
def toy_npz(tmp_path) -> Path:
    path = tmp_path / "toy.npz"
    np.savez(path, **toy_arrays())
    return path


def uploaded(s3: S3Server, request, npz: Path, fmt: str, n: int = 4) -> str:
    """The toy set converted straight into a new prefix of the bucket."""
    uri = s3.uri(f"datasets/{request.node.name}-{time.time_ns()}".replace("[", "-").replace("]", ""))
    convert(str(npz), uri, fmt, n)
    return uri


def cached(root: Path) -> set[str]:
    """The checksums of the shard files the node's cache holds (every manifest's)."""
    return {path.name for path in root.glob("*/*") if len(path.name) == 64}


def put_manifest(s3: S3Server, uri: str, change) -> None:
    key = f"{bucket.parse_uri(uri).key}/{shards.MANIFEST}"
    manifest = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    change(manifest)
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(manifest).encode())


def test_convert_uploads_the_shards_manifest_last_and_the_bucket_manifest_is_the_local_one(
        s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")
    local = converted(tmp_path, toy_npz, "npy")
    prefix = bucket.parse_uri(uri).key
    assert [key[len(prefix) + 1:] for key in s3.keys(prefix + "/")] == sorted(p.name for p in local.iterdir())
    source = shards.BucketShards(bucket.parse_uri(uri))
    manifest = shards.read_manifest(source)
    assert manifest == shards.read_manifest(local)
    shards.check_files(source, manifest)                  # sizes: one listing, nothing downloaded
    assert cached(cache) == set()
    shards.check_files(source, manifest, checksums=True)  # every file, downloaded and verified
    assert cached(cache) == {f.sha256 for f in manifest.all_files()}
    assert cli_main(["data", "convert", str(toy_npz), uri, "--format", "npy", "--shards", "2"]) == 2


def test_npy_rows_read_through_the_cache_are_the_local_rows_and_only_needed_shards_are_fetched(
        s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy", n=4)
    fields = dict(flatten=True, rescale="1/255", validation_size=30, seed=5)
    train, validation, test, shape = shards.open_examples(data_spec(shards={"path": uri, "format": "npy"},
                                                                    **fields), tmp_path)
    manifest = shards.read_manifest(train.split.source)
    labels = {s.y.sha256 for split in manifest.splits.values() for s in split.shards}
    assert cached(cache) == labels                        # labels up front, no examples yet
    local = shards.open_examples(data_spec(shards={"path": str(converted(tmp_path, toy_npz, "npy")),
                                                   "format": "npy"}, **fields), tmp_path)
    third = manifest.splits["train"].shards[2]
    rows = np.arange(110, 115)                            # in the third shard (101..151) only
    np.testing.assert_array_equal(train.split.read(rows), local[0].split.read(rows))
    assert cached(cache) == labels | {third.x.sha256}
    for ours, theirs in zip((train, validation, test), local[:3]):
        everything = np.arange(len(ours))
        for got, want in zip(ours.load_batch(everything), theirs.load_batch(everything)):
            np.testing.assert_array_equal(got, want)
    assert shape == local[3] == (12,)


def test_a_tfrecord_worker_fetches_only_its_own_files(s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "tfrecord", n=4)
    train, _, test, _ = shards.open_examples(data_spec(shards={"path": uri, "format": "tfrecord"}), tmp_path)
    assert cached(cache) == set() and train.steps_per_epoch(10, 2) == 101 // 5
    files, count = train.share(1, 2)
    assert count == 51 + 51 and cached(cache) == {s.records.sha256 for s in train.split.shards[1::2]}
    assert [Path(f).name for f in files] == [s.records.sha256 for s in train.split.shards[1::2]]
    assert len(list(test.evaluation_pipeline(per_worker_batch=8, rank=0, world_size=1)))  # reads the test files
    assert len(cached(cache)) == 2 + len(test.split.shards)


def test_a_shard_changed_in_the_bucket_is_refused_by_its_checksum_naming_it(s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")
    source = shards.BucketShards(bucket.parse_uri(uri))
    manifest = shards.read_manifest(source)
    victim = manifest.splits["train"].shards[1].x
    key = f"{bucket.parse_uri(uri).key}/{victim.path}"
    data = bytearray(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # the same size: only the checksum tells
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    shards.check_files(source, manifest)
    with pytest.raises(FieldError, match=f"{victim.path} does not match the manifest") as info:
        source.local(victim)
    assert info.value.field == "data.shards.path" and "\n" not in str(info.value)
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]  # nothing kept


@pytest.mark.parametrize("name, says", [
    ("../outside.npy", "relative paths inside s3://"),
    ("/etc/passwd", "relative paths inside s3://"),
])
def test_a_bucket_manifest_naming_a_file_outside_its_folder_is_refused(s3, request, tmp_path, toy_npz, cache,
                                                                      name, says):
    uri = uploaded(s3, request, toy_npz, "npy")
    put_manifest(s3, uri, lambda m: m["splits"]["train"]["shards"][0]["x"].update(path=name))
    with pytest.raises(FieldError, match=says) as info:
        shards.open_examples(data_spec(shards={"path": uri, "format": "npy"}), tmp_path)
    assert info.value.field == "data.shards.path"
    assert cached(cache) == set()


def test_a_wrong_size_a_missing_manifest_and_a_bad_uri_are_one_line_naming_the_field(
        s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "tfrecord")
    put_manifest(s3, uri, lambda m: m["splits"]["test"]["shards"][0]["records"].update(bytes=7))
    cases = [(uri, "is .* bytes but the manifest says 7"),
             (s3.uri("nothing-here"), "has no manifest.json: make the shards with `orchestra data convert"),
             ("s3://Bad_Bucket/x", "'Bad_Bucket' is not an S3 bucket name .* expected s3://<bucket>/<prefix>"),
             ("gs://bucket/x", "give a folder .* or s3://<bucket>/<prefix>")]
    for path, says in cases:
        with pytest.raises(FieldError, match=says) as info:
            shards.open_examples(data_spec(shards={"path": path, "format": "tfrecord"}), tmp_path)
        assert info.value.field == "data.shards.path" and "\n" not in str(info.value)


FETCH = """
import sys
from orchestra.build import shards
from orchestra.storage.bucket import parse_uri
source = shards.BucketShards(parse_uri(sys.argv[1]))
manifest = shards.read_manifest(source)
sys.stdin.readline()  # both processes have read the manifest: fetch together
path, downloaded = source.fetch(manifest.splits["train"].shards[0].x)
print(downloaded, path)
"""


def test_two_processes_of_a_node_download_a_shard_once(s3, request, tmp_path, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")
    env = {**os.environ, **s3.env, bucket.MIRROR_ENV: os.environ[bucket.MIRROR_ENV]}
    readers = [subprocess.Popen([sys.executable, "-c", FETCH, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [reader.communicate("go\n", timeout=120) for reader in readers]
    assert [reader.returncode for reader in readers] == [0, 0], outputs
    answers = sorted(out.split() for out, _ in outputs)
    assert [downloaded for downloaded, _ in answers] == ["False", "True"]  # one downloaded, the other waited
    assert answers[0][1] == answers[1][1]                                # and both read the same file
    assert len(cached(cache)) == 1


def test_a_new_manifest_sweeps_the_cache_of_one_no_process_uses(s3, request, tmp_path, toy_npz, cache):
    first, second = (uploaded(s3, request, toy_npz, "npy", n=n) for n in (2, 3))
    env = {**os.environ, **s3.env, bucket.MIRROR_ENV: os.environ[bucket.MIRROR_ENV]}
    ended = subprocess.run([sys.executable, "-c", FETCH, first], input="go\n", capture_output=True, text=True,
                           env=env, timeout=120)
    assert ended.returncode == 0 and ended.stdout.startswith("True"), ended.stderr
    old = Path(ended.stdout.split()[1]).parent
    assert old.is_dir()
    shards.open_examples(data_spec(shards={"path": second, "format": "npy"}), tmp_path)
    assert not old.exists() and len(list(cache.iterdir())) == 2  # the new manifest's folder and its use lock


def test_preflight_and_evaluate_read_the_bucket_as_they_read_a_folder(s3, request, tmp_path, toy_npz, cache):
    from orchestra.client.inference import evaluation_arrays
    from orchestra.driver.preflight import preflight
    from orchestra.spec import JobSpec

    uri = uploaded(s3, request, toy_npz, "tfrecord", n=3)
    prepared = preflight(JobSpec.model_validate(job(uri, "tfrecord")), storage=str(tmp_path / "storage"),
                         check_cluster=False)
    assert prepared.input_shape == (12,)
    assert len(cached(cache)) == 1  # the first records file, for a trial step on two examples
    x, y, which = evaluation_arrays(data_spec(shards={"path": uri, "format": "tfrecord"}, flatten=True), tmp_path)
    assert which == "test" and x.shape == (N_TEST, 12)
    np.testing.assert_array_equal(x, toy_arrays()["x_test"].reshape(N_TEST, 12).astype(np.float32))
    np.testing.assert_array_equal(y, toy_arrays()["y_test"])
