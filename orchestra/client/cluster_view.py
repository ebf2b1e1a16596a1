"""What a remote Ray cluster has, read through its job server, so that
`orchestra validate --address` can say what a job would wait PENDING for
(GPUs, accelerator types, custom resources) without a Ray connection: Ray's
state API's node list, asked with the cluster's token like every other
request of the client."""

from __future__ import annotations

import json

from orchestra.client.ray_jobs import cluster_errors, token_headers
from orchestra.driver.resources import Node
from orchestra.errors import ClusterError

MAX_NODES = 10_000  # the state API's limit


def nodes_at(address: str) -> list[Node]:
    """The live nodes of the cluster whose job server is at `address`, from
    Ray's state API (the dashboard's own node summary changes the case of
    resource names: `fake_gpu` reads `fakeGpu` there)."""
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        client = JobSubmissionClient(address, headers=token_headers(address))
        response = client._do_request("GET", f"/api/v0/nodes?detail=1&limit={MAX_NODES}")
    if response.status_code != 200:
        raise ClusterError(f"the Ray job server at {address} did not list its nodes (HTTP {response.status_code})")
    try:
        listed = json.loads(response.text)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"the Ray job server at {address} answered the node list with something else") from None
    return [Node.from_ray(str(node.get("node_ip", "?")), node.get("resources_total") or {})
            for node in listed if isinstance(node, dict) and node.get("state") == "ALIVE"]
