"""A real two-node Ray cluster on this machine, for the cluster tests.

The head (`ray start --head`, dashboard and job server on 127.0.0.1) and a
second node joined to it, 1 CPU each, so a 2-worker job has one worker on
each node. Token authentication is on, with a token of the test's own. Each
node is a `ray start --block` process in a session of its own: stopping the
cluster ends exactly the processes it started, never another Ray here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackCluster:
    def __init__(self, folder: Path, cpus_per_node: int = 1, env: dict[str, str] | None = None):
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        self.folder = folder
        self.cpus_per_node = cpus_per_node
        self.token_path = folder / "auth_token"
        self.token_path.write_text(generate_new_authentication_token())
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ, **(env or {}),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        self.stopped: set[int] = set()  # nodes stopped on purpose
        # Ray's Unix sockets live under its temp dir, and their paths may not exceed 107 bytes.
        self.ray_temp = tempfile.mkdtemp(prefix="orchestra-ray-", dir="/tmp")

    def client_env(self) -> dict[str, str]:
        """What a client needs: the address and the token, nothing else of Ray's."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        return {**env, "ORCHESTRA_ADDRESS": self.address, "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def start(self, timeout: float = 180) -> "LoopbackCluster":
        try:
            self._start_node("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                      "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                      f"--ray-client-server-port={free_port()}", f"--temp-dir={self.ray_temp}"])
            self._wait_for_nodes(1, timeout)
            self._start_node("node2", [f"--address=127.0.0.1:{self.gcs_port}"])
            self._wait_for_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, timeout: float = 180) -> None:
        """Join one more node, as a replacement machine would."""
        self._start_node(f"node{len(self.nodes) + 1}", [f"--address=127.0.0.1:{self.gcs_port}"])
        self._wait_for_nodes(len([n for n in self.nodes if n.pid not in self.stopped]), timeout)

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < count:
            for node in self.nodes:
                if node.poll() is not None and node.pid not in self.stopped:
                    raise RuntimeError(f"a Ray node exited with {node.returncode}: see {self.folder}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not come up in {timeout} s: see {self.folder}")
            time.sleep(1)

    def _start_node(self, name: str, arguments: list[str]) -> None:
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        log = open(self.folder / f"{name}.log", "w")
        self.nodes.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
             f"--num-cpus={self.cpus_per_node}", *ports, *arguments],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def get(self, path: str):
        """GET a dashboard endpoint, with the token, as JSON."""
        request = urllib.request.Request(f"{self.address}{path}",
                                         headers={"authorization": f"Bearer {self.token_path.read_text()}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def alive_nodes(self) -> int:
        try:
            summary = self.get("/nodes?view=summary")["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def actor_nodes(self, pids: list[int]) -> dict[int, str]:
        """The node of each live-or-dead actor process among `pids`."""
        actors = self.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        return {actor["pid"]: actor["node_id"] for actor in actors if actor.get("pid") in pids}

    def processes(self) -> list[psutil.Process]:
        """Every process the running nodes started: Ray's own, workers, job drivers."""
        return [process for node in self.nodes if node.poll() is None for process in _family(node.pid)]

    def stop_node(self, index: int) -> None:
        """Stop one node and everything it started, as a lost machine would."""
        node = self.nodes[index]
        self.stopped.add(node.pid)
        family = _family(node.pid)
        for process in family:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        node.wait(timeout=30)

    def stop(self) -> None:
        """End every process the nodes started: `ray start --block` stops its
        own on SIGTERM; whatever is left of their process trees is killed."""
        families = [_family(node.pid) for node in self.nodes if node.poll() is None]
        for node in self.nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        leftovers = [p for family in families for p in family if p.is_running()]
        for process in leftovers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=30)
        shutil.rmtree(self.ray_temp, ignore_errors=True)


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_for(predicate, timeout: float, what: str):
    """`predicate()`'s first true value, polled every 0.5 s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
