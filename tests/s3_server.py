"""An S3-compatible server for the tests: moto's standalone server as a
local process on 127.0.0.1, never a mock patched into orchestra's code.

`S3Server.start()` runs `python -m moto.server` on a free port, waits until
it answers, creates a bucket, and gives the environment the AWS tools read
(`AWS_ENDPOINT_URL`, keys, region): processes a test starts with it (the
CLI, its driver, Ray's workers) reach the bucket as they would a real one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_SECONDS = 60.0
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """One moto server process and one bucket in it.

    Args:
        log: where the server's output goes.
        bucket: the bucket created at start.
    """

    def __init__(self, log: Path, bucket: str = "orchestra-test"):
        self.log = log
        self.bucket = bucket
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the bucket, as the AWS tools read it."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def start(self) -> S3Server:
        with open(self.log, "ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"the moto server ended at start (exit {self._process.returncode}): "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the moto server did not answer on {self.endpoint}") from None
                time.sleep(0.2)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        """A boto3 client of the server, for a test's own looks into the bucket."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object's key in the bucket under `prefix`, sorted (the empty
        'folder' markers pyarrow's filesystem leaves after a delete left out)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", [])
                      if not item["Key"].endswith("/"))

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
