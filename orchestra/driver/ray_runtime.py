"""Which Ray this driver trains on: the cluster it is a Ray job's driver
of, or a new embedded local Ray, never a stray one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from orchestra.driver.resources import Node, missing, this_machine
from orchestra.errors import ClusterError
from orchestra.spec import JobSpec


def cluster_address() -> str | None:
    """The GCS address of the Ray cluster this process is a job driver of
    (Ray Jobs sets RAY_ADDRESS for its drivers), or None: embedded Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address and "://" not in address else None


def ensure_ray(show_worker_output: bool = False) -> None:
    """Connect to Ray, unless this process already is: to the cluster when
    running as a Ray job's driver, else to a new embedded local Ray, never
    to a stray `ray start` cluster that happens to run on this machine.
    Workers' output (Keras's progress with `fit.verbose`) reaches this
    terminal only when asked for."""
    import ray

    if ray.is_initialized():
        return
    # Worker prints are otherwise routed through logging and shown twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = cluster_address()
    if address:
        ray.init(address=address, log_to_driver=show_worker_output, configure_logging=False)
    else:
        check_embedded_auth()
        with loopback_only():
            ray.init(address="local", include_dashboard=False, log_to_driver=show_worker_output,
                     configure_logging=False)


# Ray's switch for a one-machine Ray (its default on macOS and Windows): the
# node's address is 127.0.0.1, so the GCS, the raylet, the agents and every
# worker's gRPC server listen on loopback only. On Linux Ray otherwise takes
# the machine's primary address and listens on all interfaces.
ONE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_only() -> Iterator[None]:
    """Start an embedded Ray whose servers listen on 127.0.0.1 only.

    The processes `ray.init` starts inherit the switch; this process gets it
    back afterwards, so a `ray start` it runs later (a cluster node) is not
    refused as a second node of a one-machine Ray. Ray reads the switch when
    it is imported, so its constant is set too.
    """
    from ray._private import ray_constants

    saved_env, saved_constant = os.environ.get(ONE_MACHINE_RAY), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ONE_MACHINE_RAY], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(ONE_MACHINE_RAY, None)
        else:
            os.environ[ONE_MACHINE_RAY] = saved_env


def check_embedded_auth() -> None:
    """An embedded Ray listens on loopback, but any user of this machine can
    reach loopback: its token is what keeps them out, so turning it off is
    refused."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        raise ClusterError("RAY_AUTH_MODE=disabled is refused for the embedded Ray on this machine: its token "
                           "keeps the machine's other users out of its servers; unset it")


def total_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0)


def cluster_nodes(show_worker_output: bool = False) -> list[Node]:
    """The live nodes of the Ray cluster this process is a job driver of
    (connecting to it), or [] for an embedded Ray: this machine."""
    if cluster_address() is None:
        return []
    ensure_ray(show_worker_output)
    return live_nodes()


def live_nodes() -> list[Node]:
    """The live nodes of the Ray this process is connected to, with their
    GPUs and custom resources."""
    import ray

    return [Node.from_ray(str(node.get("NodeManagerAddress", "?")), node.get("Resources", {}))
            for node in ray.nodes() if node.get("Alive")]


def waits_for(spec: JobSpec) -> list[tuple[str, str]]:
    """What the job would wait PENDING for on the cluster this process
    sees: the Ray cluster it is a job driver of, else this machine (what an
    embedded Ray has: its GPUs, no custom resources). As (field, reason)."""
    return missing(spec, cluster_nodes(show_worker_output=spec.fit.verbose > 0) or [this_machine()])
