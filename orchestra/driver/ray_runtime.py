"""Which Ray this driver trains on: the cluster it is a Ray job's driver
of, or a new embedded local Ray, never a stray one."""

from __future__ import annotations

import os


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
        ray.init(address="local", include_dashboard=False, log_to_driver=show_worker_output,
                 configure_logging=False)


def total_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0)
