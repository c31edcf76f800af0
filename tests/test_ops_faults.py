"""Live, issue 42: faults of a multi-node Ray cluster under mixed load (``bench.cluster``, ``bench.faults``).

A head (no CPU: the Serve controller and the only HTTP proxy, with the replay of ``serve/proxy_replay.py``) and two
worker nodes on 127.0.0.1, each its own raylet, run ``deploy/serve_config.ha.yaml`` with at most one replica of a
deployment per node. Under the mix of ``bench.soak`` (every endpoint, bad inputs included):

* the ``ServeController`` actor is killed: no request is lost and Ray restarts it;
* a whole worker node is SIGKILLed (its raylet and every process under it): no request is lost, and the longest
  time without any answer is reported (``python -m bench.faults`` measures the 5 s bound on a quiet machine).

The cluster (``ha_cluster``, tests/conftest.py) is the one ``test_serve_reliability_ha.py`` kills replicas in: it
runs first, this module (``GROUP_ORDER``) last, since losing a node leaves one replica of each. The cluster is
stopped right after this module's last test that uses it, and no Ray process of it may be left (checked there, an
error of that test's teardown otherwise). Slow (a minute or more: ten replicas load their models on two cores). The
last test reads the RayService manifest only: head-node loss is left to KubeRay's GCS fault tolerance
(docs/operations.md).
"""

from __future__ import annotations

import pytest
import yaml

from bench.cluster import LoopbackCluster
from bench.faults import controller_loss, full_capacity, worker_node_loss
from tests.ops_helpers import REPO, SharedHACluster, wait_for

CLIENTS = 4
BEFORE_S = 5
AFTER_S = 12
GROUP_ORDER = 1  # after the other users of ha_cluster: the node loss below is for good


@pytest.fixture(scope="module")
def cluster(ha_cluster: SharedHACluster) -> LoopbackCluster:
    loopback = ha_cluster.get()
    # the replicas test_serve_reliability_ha.py killed are replaced: two of each, on two workers
    wait_for(lambda: full_capacity(loopback), 300, 1, "two replicas of each on two workers")
    return loopback


def test_each_deployment_runs_on_both_workers_and_none_on_the_head(cluster: LoopbackCluster) -> None:
    head = cluster.cluster.head_node.node_id
    workers = {node.node_id for node in cluster.workers}
    placed = cluster.replicas()
    assert set(placed) == {"TextEncoder", "AudioEncoder", "VideoEncoder", "Transcriber", "FusionIngress"}
    for deployment, nodes in placed.items():
        assert set(nodes) == workers, (deployment, nodes, head)
        assert all(n == 1 for n in nodes.values()), (deployment, nodes)


def test_killing_the_serve_controller_loses_nothing(cluster: LoopbackCluster) -> None:
    result = controller_loss(cluster, CLIENTS, BEFORE_S, AFTER_S)
    assert result["answers_by_status"].get("200", 0) > 10, result
    assert result["mixed_requests"] >= CLIENTS, result  # the mix went through too, not only the text probe
    assert result["lost"] == 0, result
    assert result["capacity_back_s"] is not None, result  # a new controller, the application whole
    assert result["controller_pid_after"] != result["controller_pid_before"], result


def test_losing_a_worker_node_loses_nothing(cluster: LoopbackCluster) -> None:
    wait_for(lambda: full_capacity(cluster), 300, 1, "two replicas of each on two workers")  # after the last test
    result = worker_node_loss(cluster, CLIENTS, BEFORE_S, AFTER_S, replace=False)
    print(f"worker node lost: {result['requests']} requests, longest gap {result['longest_gap_s']} s")
    assert sum(result["replicas_on_killed_node"].values()) == 5, result  # one of each deployment went with it
    assert result["killed_node_processes"] >= 6, result  # raylet, agents, five replicas
    assert result["answers_by_status"].get("200", 0) > 10, result
    assert result["mixed_requests"] >= CLIENTS, result
    assert result["lost"] == 0, result
    (survivor,) = cluster.workers
    assert all(nodes.get(survivor.node_id) == 1 for nodes in cluster.replicas().values())  # one of each left


def test_the_rayservice_keeps_the_gcs_in_an_external_redis() -> None:
    """Head-node loss, which one machine cannot show, is covered on KubeRay by GCS fault tolerance."""
    manifest = yaml.safe_load((REPO / "deploy" / "kubernetes" / "rayservice.yaml").read_text())
    options = manifest["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"].startswith("redis://"), options
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "password", options
