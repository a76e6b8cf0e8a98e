"""The same OpenAI-compatible app as ``qgraph serve``, deployed as a Ray Serve application: N replicas, each loading
the model (from the shared cache when it is compiled already) and running its own engine; Ray's proxy spreads the
requests. On one machine ``ray.init()`` starts a local cluster; with ``address="auto"`` (or ``ray://HOST:10001``)
the same code joins an existing multi-node cluster, where the cache directory should be on storage all nodes see.

Needs the ``ray`` extra (``ray[serve]``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from qgraph.server import Served, create_app

logger = logging.getLogger(__name__)


def application(
    load: Callable[[], Served],
    model_name: str,
    replicas: int,
    max_queue: int = 64,
    api_key: str | None = None,
    cpus_per_replica: float = 1.0,
):
    """The Ray Serve application (bind it with ``serve.run``); the ASGI app is built on each replica."""
    from ray import serve

    def build_app():  # runs on the replica: its Ray actor name goes into every response's X-QGraph-Instance
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        return create_app(load, model_name, max_queue=max_queue, api_key=api_key, instance=replica)

    deployment = serve.deployment(
        serve.ingress(build_app)(),
        name="qgraph",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=max_queue,
    )
    return deployment.bind()


def serve_on_ray(
    load: Callable[[], Served],
    model_name: str,
    host: str,
    port: int,
    replicas: int,
    max_queue: int = 64,
    api_key: str | None = None,
    address: str | None = None,
    cpus_per_replica: float = 1.0,
) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy, and serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        application(load, model_name, replicas, max_queue, api_key, cpus_per_replica), name="qgraph", route_prefix="/"
    )
    logger.info("serving %s on Ray Serve at http://%s:%d with %d replicas", model_name, host, port, replicas)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
