"""qora's API as a Ray Serve deployment: N replicas of the same ASGI app, each with its own model, behind
Ray's HTTP proxy (which spreads requests over them), on one machine or a Ray cluster.

    from ray import serve
    from qora.api.ray_serve import application

    serve.run(application("smollm3-3b-q4.qora", replicas=2, threads=8), route_prefix="/")

or `qora serve --load MODEL --ray 2` (a local Ray instance, its proxy on --host / --port). The server
keeps no state between requests but its caches, so replicas need no coordination; each reserves
`threads` CPUs of its node, so Ray places as many on a node as its cores allow. Needs `pip install
"ray[serve]"` (not a dependency of qora).
"""

from __future__ import annotations


def _ray_serve():
    try:
        from ray import serve
    except ImportError as e:
        from qora.errors import QoraError

        raise QoraError(f"Ray Serve is not installed ({e}): pip install 'ray[serve]'") from None
    return serve


def build_app(path: str, model_id: str, threads, context, api_key, device: str, allowed_hosts, port):
    """The ASGI app of one replica: the model loaded on the replica's node, then qora's app over it."""
    from qora.api.app import create_app
    from qora.loader import load_model

    model = load_model(path, device, threads, context, verbose=False)
    return create_app(model, model_id, api_key=api_key, allowed_hosts=allowed_hosts, port=port)


def application(
    path,
    replicas: int = 2,
    threads: int | None = None,
    context: int | None = None,
    model_id: str | None = None,
    api_key: str | None = None,
    device: str = "cpu",
    allowed_hosts: list[str] | None = None,
    port: int | None = None,
):
    """A Ray Serve application serving the model at `path` (a path every node can read) from `replicas`
    replicas, each with `threads` CPU threads (Ray reserves that many CPUs per replica; default 1).
    allowed_hosts / port: the Host header check of create_app (None: any Host, as behind a load balancer
    that sets its own)."""
    from pathlib import Path

    serve = _ray_serve()
    path = str(Path(path).resolve())
    model_id = model_id or Path(path).stem

    def builder():  # a plain function: Ray Serve calls it on each replica (a partial would pass for an app)
        return build_app(path, model_id, threads, context, api_key, device, allowed_hosts, port)

    replica = serve.ingress(builder)()
    deployment = serve.deployment(
        replica,
        name="qora",
        num_replicas=int(replicas),
        ray_actor_options={"num_cpus": threads or 1},
        # one engine per replica: requests beyond its queue wait in Ray's proxy, not in the replica
        max_ongoing_requests=64,
    )
    return deployment.bind()


def run(
    path,
    model_id: str,
    host: str,
    port: int,
    replicas: int,
    threads: int | None,
    context: int | None,
    api_key: str | None,
    device: str,
    allowed_hosts: list[str] | None = None,
) -> int:
    """`qora serve --ray N`: a local Ray instance, N replicas, Ray's proxy on host:port, until Ctrl-C."""
    import signal
    import sys
    import threading

    serve = _ray_serve()
    import ray

    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = application(path, replicas, threads, context, model_id, api_key, device, allowed_hosts, port)
        serve.run(app, name="qora", route_prefix="/")
        print(
            f"qora: serving {model_id} with {replicas} Ray Serve replicas at http://{host}:{port}/v1 - Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
