"""Cluster probe: proves a submitted job reaches every node and the MLflow server.

    ray job submit --address $RAY_ADDRESS --working-dir . -- python jobs/cluster_probe.py

Runs one Ray task pinned to each alive node (NodeAffinitySchedulingStrategy, hard) and one that
needs the worker node's custom resource ``node_b``, then records the node ids in a parent MLflow
run with one child run per node. The child runs are created *inside* the pinned tasks, so a
finished probe also shows that every node can reach the tracking server. Prints one line
``CLUSTER_PROBE_RESULT {json}`` that callers parse from ``ray job logs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from smpp_ray import tracking
from smpp_ray.runtime import init_ray

logger = logging.getLogger("cluster_probe")


@ray.remote(num_cpus=0.5)
def probe_node(tracking_uri: str, experiment: str, parent_run_id: str, index: int) -> dict:
    """Runs on one node: its id, host and pid, logged as a child run of the probe."""
    node_id = ray.get_runtime_context().get_node_id()
    name = f"probe-node-{index}"
    with tracking.tracked_run(tracking_uri, experiment, name, parent_run_id=parent_run_id,
                              tags={"smpp.node_id": node_id, tracking.STAGE_TAG: "cluster_probe"}) as run_id:
        tracking.log_metrics(tracking_uri, run_id, {"node_index": index, "pid": os.getpid()})
    return {"node_id": node_id, "host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}


@ray.remote(num_cpus=0.5, resources={"node_b": 0.01})
def on_node_b() -> str:
    return ray.get_runtime_context().get_node_id()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="smpp-cluster-probe")
    parser.add_argument("--min-nodes", type=int, default=2, help="fail unless this many nodes answer")
    parser.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        parser.error("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    init_ray()
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    logger.info("alive nodes: %s", nodes)

    with tracking.tracked_run(uri, args.experiment, "cluster-probe",
                              tags={tracking.STAGE_TAG: "cluster_probe"}) as parent:
        pinned = [probe_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                  .remote(uri, args.experiment, parent, i) for i, node in enumerate(nodes)]
        results = ray.get(pinned)
        node_b = ray.get(on_node_b.remote())
        seen = sorted({r["node_id"] for r in results})
        tracking.log_metrics(uri, parent, {"distinct_nodes": len(seen), "alive_nodes": len(nodes)})
        tracking.set_tags(uri, parent, {"smpp.node_ids": ",".join(seen), "smpp.node_b": node_b})
        result = {"parent_run_id": parent, "experiment": args.experiment, "node_ids": seen,
                  "node_b": node_b, "tasks": results}
    print("CLUSTER_PROBE_RESULT " + json.dumps(result, sort_keys=True), flush=True)
    if len(seen) < args.min_nodes:
        logger.error("only %d distinct nodes ran tasks (%s); expected at least %d",
                     len(seen), seen, args.min_nodes)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
