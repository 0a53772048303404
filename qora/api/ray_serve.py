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


def build_app(
    path: str, model_id: str, threads, context, api_key, device: str, allowed_hosts, port, options: dict | None = None
):
    """The ASGI app of one replica: the model loaded on the replica's node, then qora's app over it with
    the batching scheduler `qora serve` runs (options: those of `qora serve` a replica takes, see
    application)."""
    from qora.api.app import create_app
    from qora.api.batch import BatchScheduler, plan_slots
    from qora.loader import load_model

    o = dict(options or {})
    model = load_model(
        path, device, threads, context, verbose=False,
        rope_scaling=o.get("rope_scaling"), kv_type=o.get("kv_type"), precision=o.get("precision"),
    )  # fmt: skip
    parallel, slot_context = plan_slots(model, o.get("parallel"), context)
    kwargs = {"max_queued": o["max_queued"]} if o.get("max_queued") is not None else {}
    scheduler = BatchScheduler(model, parallel, slot_context, **kwargs)
    app_kwargs = {k: o[k] for k in ("cors", "max_body_bytes") if o.get(k) is not None}
    return create_app(
        model, model_id, api_key=api_key, allowed_hosts=allowed_hosts, port=port, scheduler=scheduler, **app_kwargs
    )


# what a replica takes from `qora serve` besides the arguments of application (build_app's options)
REPLICA_OPTIONS = ("rope_scaling", "kv_type", "precision", "parallel", "max_queued", "cors", "max_body_bytes")


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
    options: dict | None = None,
    shutdown_timeout: float | None = None,
):
    """A Ray Serve application serving the model at `path` (a path every node can read) from `replicas`
    replicas, each with `threads` CPU threads (Ray reserves that many CPUs per replica; default 1).
    allowed_hosts / port: the Host header check of create_app (None: any Host, as behind a load balancer
    that sets its own). options: REPLICA_OPTIONS of `qora serve` (rope_scaling, kv_type, precision: the
    load; parallel, max_queued: each replica's batching; cors, max_body_bytes: its app). shutdown_timeout:
    seconds a stopping replica lets answers in progress finish."""
    from pathlib import Path

    serve = _ray_serve()
    path = str(Path(path).resolve())
    model_id = model_id or Path(path).stem
    unknown = set(options or {}) - set(REPLICA_OPTIONS)
    if unknown:
        from qora.errors import QoraError

        raise QoraError(f"a Ray Serve replica does not take {', '.join(sorted(unknown))}")

    def builder():  # a plain function: Ray Serve calls it on each replica (a partial would pass for an app)
        return build_app(path, model_id, threads, context, api_key, device, allowed_hosts, port, options)

    replica = serve.ingress(builder)()
    deployment = serve.deployment(
        replica,
        name="qora",
        num_replicas=int(replicas),
        ray_actor_options={"num_cpus": threads or 1},
        # one engine per replica: requests beyond its queue wait in Ray's proxy, not in the replica
        max_ongoing_requests=64,
        **({"graceful_shutdown_timeout_s": float(shutdown_timeout)} if shutdown_timeout is not None else {}),
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
    options: dict | None = None,
    shutdown_timeout: float | None = None,
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
        app = application(
            path, replicas, threads, context, model_id, api_key, device, allowed_hosts, port, options, shutdown_timeout
        )
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
