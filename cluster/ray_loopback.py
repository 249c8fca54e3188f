"""`ray start` for a node that joins a cluster on 127.0.0.1 and keeps its services there.

Ray binds a node's gRPC servers (raylet, object manager, agents, every worker's core-worker
server) to loopback only when the node's IP is exactly 127.0.0.1, and its metrics servers
likewise. On Linux `ray start` never lets a node have that IP: it rewrites 127.0.0.1 in
`--address` and `--node-ip-address` to the host's reachable address, because a real cluster
spans hosts. The one switch that stops the rewrite (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also
makes `ray start` refuse to join a cluster. So this launcher, used by cluster/local.sh for the
second node only:

- keeps loopback addresses as given in this process (the rewrite is
  `ray._private.services.resolve_ip_for_localhost`), so the node joins the head's GCS at
  127.0.0.1 and takes 127.0.0.1 as its own IP (Ray reads it from the route to the GCS);
- sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the processes it starts (raylet, agents,
  workers), so they resolve 127.0.0.1 to itself too.

The head needs no launcher: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head` keeps it.
tests/test_cluster.py lists the cluster's listening sockets, so a Ray release that changes
this shows up as a failing test rather than as services silently on every interface.

Usage: python cluster/ray_loopback.py start --address 127.0.0.1:PORT [ray start options]
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from ray._common.network_utils import is_localhost
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    resolve = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        if is_localhost(host):
            return "127.0.0.1" if host == "localhost" else host
        return resolve(host)

    services.resolve_ip_for_localhost = keep_loopback
    # Read by the processes `ray start` spawns, after this one has passed its own checks.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
