"""deploy/ agrees with the code: the image's commands exist, every node
mounts the storage the image points orchestra at, and the ports are the
ones the CLI and Ray use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from orchestra.cli import build_parser
from orchestra.client.ray_jobs import DASHBOARD_PORT
from orchestra.driver.main import build_parser as driver_parser
from orchestra.spec import load_spec
from orchestra.tools.board import DEFAULT_PORT as TENSORBOARD_PORT

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def dockerfile() -> dict:
    text = (DEPLOY / "Dockerfile").read_text()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(
        line for line in re.sub(r"\\\n", " ", text).splitlines() if line.startswith("ENV"))))
    copies = dict((src, dst) for src, dst in re.findall(r"^COPY (\S+) (\S+)$", text, re.M))
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, re.M).group(1))
    return {"env": env, "copies": copies, "workdir": workdir, "exposed": exposed, "cmd": cmd, "text": text}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def kuberay(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()))


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def check_command(command: list[str]):
    """`orchestra ...` parses with orchestra's own CLI, `python -m
    orchestra.driver ...` with the driver's; `ray ...` is Ray's. Returns the
    parsed arguments of orchestra's commands."""
    program, *arguments = command
    if program == "python" and arguments[:2] == ["-m", "orchestra.driver"]:
        return driver_parser().parse_args(arguments[2:])
    assert program in console_scripts() | {"ray"}, command
    if program == "orchestra":
        return build_parser().parse_args(arguments)
    return None


def test_image_installs_orchestra_and_points_it_at_the_shared_volume():
    image = dockerfile()
    assert image["copies"]["orchestra"] == "./orchestra" and image["workdir"] == "/opt/orchestra"
    assert "pip install --no-cache-dir ." in image["text"] and "ray[default]" in image["text"]
    assert image["env"]["ORCHESTRA_STORAGE"].startswith("/shared/")
    assert image["env"]["TF_USE_LEGACY_KERAS"] == "1" and image["env"]["RAY_AUTH_MODE"] == "token"
    assert image["exposed"] == {DASHBOARD_PORT, TENSORBOARD_PORT}
    check_command(image["cmd"])


def test_compose_nodes_share_the_storage_and_publish_the_cli_ports():
    image, services = dockerfile(), compose()["services"]
    assert set(services) == {"ray-head", "ray-worker", "tensorboard"}
    for name, service in services.items():
        mounts = dict(volume.split(":") for volume in service["volumes"])
        assert mounts == {"shared": "/shared"}, name
        assert service["environment"]["ORCHESTRA_STORAGE"] == image["env"]["ORCHESTRA_STORAGE"], name
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
        check_command(service["command"])
    head = services["ray-head"]
    assert f"--dashboard-port={DASHBOARD_PORT}" in head["command"]
    assert f"{DASHBOARD_PORT}:{DASHBOARD_PORT}" in head["ports"]
    head_port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert f"--address=ray-head:{head_port}" in services["ray-worker"]["command"]
    board = services["tensorboard"]["command"]
    assert board[board.index("--port") + 1] == str(TENSORBOARD_PORT)
    assert board[board.index("--storage") + 1] == image["env"]["ORCHESTRA_STORAGE"]
    assert f"127.0.0.1:{TENSORBOARD_PORT}:{TENSORBOARD_PORT}" in services["tensorboard"]["ports"]


def test_raycluster_mounts_the_shared_claim_on_every_pod():
    image = dockerfile()
    claim, cluster, board, service = kuberay("raycluster.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]),
            board["spec"]["template"]["spec"]]
    for pod in pods:
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        container = pod["containers"][0]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/shared"}
        assert image["env"]["ORCHESTRA_STORAGE"].startswith("/shared/")
    head = pods[0]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {DASHBOARD_PORT}
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert env["ORCHESTRA_STORAGE"] == image["env"]["ORCHESTRA_STORAGE"] and env["RAY_AUTH_MODE"] == "token"
    check_command(board["spec"]["template"]["spec"]["containers"][0]["command"])
    assert service["spec"]["ports"][0]["port"] == TENSORBOARD_PORT


def test_rayjob_runs_a_spec_from_the_image_as_an_orchestra_job():
    image = dockerfile()
    (job,) = kuberay("rayjob.yaml")
    _, cluster, _, _ = kuberay("raycluster.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    arguments = check_command(shlex.split(job["spec"]["entrypoint"]))
    assert arguments.verb == "run" and arguments.job_id == job["spec"]["jobId"] and arguments.status_lines
    assert job["spec"]["metadata"]["orchestra"] == "1"
    # the spec path is inside the image, copied there from jobs/
    in_image = Path(arguments.spec).relative_to(image["workdir"])
    assert image["copies"][in_image.parts[0]] == f"./{in_image.parts[0]}"
    spec = load_spec(ROOT / in_image)
    assert job["spec"]["metadata"]["name"] == spec.name
    assert job["spec"]["metadata"]["workers"] == str(spec.scaling.workers)


@pytest.mark.parametrize("name", ["compose.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_manifests_keep_the_token_out_of_the_files(name):
    text = (DEPLOY / name).read_text()
    assert not re.search(r"RAY_AUTH_TOKEN:\s*[0-9a-f]{16,}", text)
    assert "secretKeyRef" in text or "${RAY_AUTH_TOKEN" in text or "RAY_AUTH_TOKEN" not in text
