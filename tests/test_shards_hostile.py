"""The node's shard cache and a bucket's shards as a hostile teammate on a
shared machine, or a writer of the bucket, would meet them: whatever the
cache folder or the bucket holds is input, never a path to follow, and a
bad one is one line naming the field with nothing kept. Against moto's S3
server on 127.0.0.1 (tests/s3_server.py), as test_shards_s3.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import test_shards_s3
from test_shards import data_spec
from test_shards_s3 import put_manifest, uploaded

from orchestra.build import node_cache, shards
from orchestra.cli import main as cli_main
from orchestra.errors import FieldError, StorageError
from orchestra.storage import bucket
from orchestra.tools.convert import convert

NOBODY = 65534
s3, cache, toy_npz = test_shards_s3.s3, test_shards_s3.cache, test_shards_s3.toy_npz  # the fixtures


def opened(uri: str) -> tuple[shards.BucketShards, shards.Manifest]:
    source = shards.BucketShards(bucket.parse_uri(uri))
    return source, shards.read_manifest(source)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(source: shards.BucketShards, file: shards.ShardFile, says: str) -> FieldError:
    with pytest.raises(FieldError, match=says) as info:
        source.fetch(file)
    assert info.value.field == "data.shards.path" and "\n" not in str(info.value)
    return info.value


def kept(root: Path) -> list[Path]:
    """The shard files (not the locks) under the node's cache."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if root.is_dir() else []


@pytest.mark.parametrize("planted", ["symlink", "fifo", "folder"])
def test_a_symlink_fifo_or_folder_where_a_cached_file_goes_is_replaced_by_a_verified_download(
        s3, request, tmp_path, toy_npz, cache, planted):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    file = manifest.splits["train"].shards[0].x
    folder = cache / source._key
    folder.mkdir(mode=0o700, parents=True)
    cache.chmod(0o700)
    mine = tmp_path / "attacker"
    mine.write_bytes(b"A" * file.bytes)  # the manifest's size, other bytes
    place = folder / file.sha256
    if planted == "symlink":
        place.symlink_to(mine)
    elif planted == "fifo":
        os.mkfifo(place)
    else:
        (place / "inside").mkdir(parents=True)
    path, downloaded = source.fetch(file)
    assert downloaded and path == place and not path.is_symlink() and path.is_file()
    assert sha256(path) == file.sha256 and mine.read_bytes() == b"A" * file.bytes  # the target is untouched
    assert source.fetch(file) == (path, False)


@pytest.mark.parametrize("how", ["world-writable", "another user's", "a symlink"])
def test_a_cache_folder_others_can_write_to_is_refused_naming_the_field(s3, request, tmp_path, toy_npz, cache, how):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    if how == "a symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(elsewhere)
    else:
        cache.mkdir(mode=0o700, parents=True)
        if how == "world-writable":
            cache.chmod(0o777)
        else:
            os.chown(cache, NOBODY, NOBODY)
    refused(source, manifest.splits["train"].shards[0].x, "not a folder that only this user can write to")
    assert kept(cache) == [] and (how != "a symlink" or list(elsewhere.iterdir()) == [])


@pytest.mark.parametrize("how", ["world-writable", "a symlink"])
def test_a_manifest_folder_in_the_cache_others_can_write_to_is_refused(s3, request, tmp_path, toy_npz, cache, how):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    cache.mkdir(mode=0o700, parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777 if how == "world-writable" else 0o700)
    if how == "world-writable":
        elsewhere.chmod(0o777)
        elsewhere.rename(cache / source._key)
    else:
        (cache / source._key).symlink_to(elsewhere)
    refused(source, manifest.splits["train"].shards[0].x, "not a folder that only this user can write to")
    assert kept(cache) == [] and (how != "a symlink" or list(elsewhere.iterdir()) == [])


@pytest.mark.parametrize("value, says", [("relative/cache", "ORCHESTRA_S3_CACHE must be an absolute path"),
                                         ("a-file", "Not a directory|File exists")])
def test_a_cache_setting_that_is_relative_or_a_file_is_refused(s3, request, tmp_path, toy_npz, monkeypatch,
                                                               value, says):
    source, manifest = opened(uploaded(s3, request, toy_npz, "npy"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(bucket.MIRROR_ENV, value)
    refused(source, manifest.splits["train"].shards[0].x, says)
    assert not (tmp_path / "relative").exists() and (tmp_path / "a-file").read_text() == "not a folder"


def test_an_object_grown_in_the_bucket_is_refused_and_nothing_is_kept(s3, request, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    file = manifest.splits["train"].shards[1].x
    key = f"{bucket.parse_uri(uri).key}/{file.path}"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body + b"\0" * (1 << 20))  # after the size check
    refused(source, file, "does not match the manifest")
    assert kept(cache) == []


def test_a_download_stops_at_the_first_byte_past_the_manifest_size(tmp_path):
    cache = node_cache.ShardCache("0" * 32, tmp_path / "node")
    taken = []

    def endless(out) -> None:  # an object far bigger than its manifest says
        for _ in range(1000):
            out.write(b"x" * 4096)
            taken.append(4096)

    with pytest.raises(StorageError, match="more than its 10000 bytes"):
        cache.fetch("a" * 64, 10_000, "big.npy", endless)
    assert sum(taken) == 8192  # the third write was refused
    assert kept(tmp_path / "node") == []


def test_an_object_deleted_after_the_check_is_one_line_and_nothing_is_kept(s3, request, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    shards.check_files(source, manifest)
    file = manifest.splits["train"].shards[0].x
    s3.client().delete_object(Bucket=s3.bucket, Key=f"{bucket.parse_uri(uri).key}/{file.path}")
    refused(source, file, "does not exist any more")
    assert kept(cache) == []


def test_convert_refuses_a_bucket_root_and_leaves_the_bucket_empty(s3, toy_npz):
    s3.client().create_bucket(Bucket="orchestra-empty-root")
    for dest in ("s3://orchestra-empty-root", "s3://orchestra-empty-root/"):
        with pytest.raises(FieldError, match="is a bucket's root: give a new prefix") as info:
            convert(str(toy_npz), dest, "npy", 2)
        assert info.value.field == "DEST"
        assert cli_main(["data", "convert", str(toy_npz), dest, "--format", "npy", "--shards", "2"]) == 2
    assert s3.client().list_objects_v2(Bucket="orchestra-empty-root").get("KeyCount") == 0


def test_an_upload_failing_midway_deletes_what_it_uploaded_and_only_that(s3, request, toy_npz, monkeypatch):
    uri = s3.uri(f"datasets/{request.node.name}")
    prefix = bucket.parse_uri(uri).key
    storage, calls = bucket.bucket(), []
    real = storage.upload

    def failing_third(local, place):  # the network drops on the third file; another writer came meanwhile
        calls.append(place.key)
        if len(calls) == 3:
            s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/theirs.txt", Body=b"not ours to delete")
            raise StorageError(f"cannot upload {local} to {place.uri}: connection reset")
        real(local, place)

    monkeypatch.setattr(storage, "upload", failing_third)
    with pytest.raises(StorageError, match="connection reset"):
        convert(str(toy_npz), uri, "npy", 4)
    assert len(calls) == 3 and s3.keys(prefix + "/") == [f"{prefix}/theirs.txt"]


@pytest.mark.parametrize("change", ["./", "a//"])
def test_a_name_spelled_with_dot_or_double_slash_reads_the_same_object(s3, request, toy_npz, cache, change):
    uri = uploaded(s3, request, toy_npz, "npy")

    def respell(manifest):
        x = manifest["splits"]["train"]["shards"][0]["x"]
        x["path"] = "./" + x["path"] if change == "./" else x["path"].replace("-", "//", 1)

    put_manifest(s3, uri, respell)
    source, manifest = opened(uri)
    file = manifest.splits["train"].shards[0].x
    if change == "./":
        path, _ = source.fetch(file)
        assert sha256(path) == file.sha256
    else:  # a//b is the object a/b, which is not there
        with pytest.raises(FieldError, match="does not exist"):
            shards.check_files(source, manifest)


def test_two_shards_naming_one_object_with_different_checksums_are_refused(s3, request, toy_npz, cache):
    uri = uploaded(s3, request, toy_npz, "npy")

    def duplicate(manifest):
        first, second = manifest["splits"]["train"]["shards"][:2]
        second["x"]["path"] = first["x"]["path"]
        second["x"]["bytes"] = first["x"]["bytes"]

    put_manifest(s3, uri, duplicate)
    source, manifest = opened(uri)
    shards.check_files(source, manifest)  # the sizes agree: only the checksum tells
    refused(source, manifest.splits["train"].shards[1].x, "does not match the manifest")
    assert kept(cache) == []


@pytest.mark.parametrize("lock", ["the file's", "the manifest's"])
def test_a_lock_planted_as_a_symlink_creates_nothing_where_it_points(s3, request, tmp_path, toy_npz, cache, lock):
    uri = uploaded(s3, request, toy_npz, "npy")
    source, manifest = opened(uri)
    file = manifest.splits["train"].shards[0].x
    (cache / source._key).mkdir(mode=0o700, parents=True)
    cache.chmod(0o700)
    target = tmp_path / "outside" / "made-by-the-cache"
    target.parent.mkdir()
    planted = cache / source._key / f"{file.sha256}.lock" if lock == "the file's" else cache / f"{source._key}.lock"
    planted.symlink_to(target)
    refused(source, file, "Too many levels of symbolic links")
    assert not target.exists() and kept(cache) == []


@pytest.mark.parametrize("name", ["a\\b.npy", "a\0b.npy", "", "x/../../b.npy"],
                         ids=["backslash", "nul", "empty", "dots"])
def test_a_bucket_manifest_name_with_a_backslash_nul_or_dots_is_refused(s3, request, tmp_path, toy_npz, cache, name):
    uri = uploaded(s3, request, toy_npz, "npy")
    put_manifest(s3, uri, lambda m: m["splits"]["train"]["shards"][0]["x"].update(path=name))
    with pytest.raises(FieldError) as info:
        shards.open_examples(data_spec(shards={"path": uri, "format": "npy"}), tmp_path)
    assert info.value.field == "data.shards.path" and "\n" not in str(info.value)
    assert kept(cache) == []
