"""`qora serve`: the OpenAI-compatible HTTP server on the command line.

`python -m qora serve --load m.qora [--host 127.0.0.1 --port 8000]` loads the model, binds the socket and
runs the app of `qora.api` (routes, request models, the job scheduler, streaming, the security checks;
its docstring says how a request goes through them) on uvicorn.

Needs the `server` extra: pip install "qora[server]" (starlette, uvicorn, pydantic).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
from pathlib import Path

from qora import limits
from qora.api.errors import quote, valid_text
from qora.api.security import LOOPBACK_HOSTS, WILDCARD_BINDS
from qora.api.security import split_host as _split_host
from qora.errors import QoraError

SHUTDOWN_TIMEOUT_S = 10.0  # answers in progress when the server is told to stop may finish this long


def create_app(*args, **kwargs):
    """`qora.api.app.create_app`, imported on first use: starlette and pydantic come with the server extra."""
    try:
        from qora.api.app import create_app
    except ImportError as e:
        raise QoraError(f"qora serve needs the server extra ({e}): pip install 'qora[server]'") from None
    return create_app(*args, **kwargs)


# ───── command line ─────


def _text(value: str) -> str:
    """An argument that must be text: Python hands undecodable bytes of argv over as lone surrogates,
    which no JSON answer or header could carry later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    from qora.cli import add_context_args

    p = argparse.ArgumentParser(
        prog="qora serve",
        description="Serve a model over an OpenAI-compatible HTTP API (chat and completions, streaming).",
        epilog=(
            "Example: qora serve --load smollm3-3b-q4.qora, then point an OpenAI client at "
            "http://127.0.0.1:8000/v1 with model set to the id GET /v1/models lists."
        ),
    )
    p.add_argument("--load", metavar="PATH", help="a GGUF or .qora model file, or a pulled REPO_ID (default as qora)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", type=_text, help="require Authorization: Bearer KEY on /v1 routes")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        type=_text,
        help="also answer requests whose Host header is HOST or HOST:PORT (repeatable; '*': any). By default "
        "only the --host address, localhost, 127.0.0.1 and [::1] are answered (no DNS rebinding)",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        type=_text,
        help="let web pages from ORIGIN (e.g. http://localhost:3000; '*': any) call the API from a browser "
        "(repeatable). Without it, any request carrying an Origin header is refused",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.SERVER_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted (default {limits.SERVER_MAX_BODY_BYTES}); larger ones get 413",
    )
    p.add_argument(
        "--model-name", metavar="ID", type=_text, help="the model id clients send (default: REPO_ID or file name)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--context", type=int, metavar="N", help="KV cache size in tokens (default: auto)")
    add_context_args(p)
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is usable")
    dev.add_argument("--gpu", action="store_true", help="run on the GPU (Vulkan), falling back to the CPU as qora does")
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="requests generated together in one batched step (default: as many as fit half the free memory's "
        "KV caches, at most 16); more wait in a queue, and a full queue answers 429",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=limits.SERVER_MAX_QUEUED,
        metavar="N",
        help=f"requests waiting for a free slot (default {limits.SERVER_MAX_QUEUED}); more are answered 429",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=SHUTDOWN_TIMEOUT_S,
        metavar="S",
        help=f"on SIGTERM / Ctrl-C, let answers in progress finish for up to S seconds (default {SHUTDOWN_TIMEOUT_S:g};"
        " a second signal stops at once)",
    )
    p.add_argument(
        "--ray",
        type=int,
        metavar="N",
        help="serve through Ray Serve: N replicas of the model on a local Ray instance, Ray's proxy on "
        "--host/--port (needs pip install 'ray[serve]'; module qora.api.ray_serve for a cluster)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log every request (one JSON line each)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        # listening before "serving ... at" is printed: a client that connects at once waits in the
        # backlog until uvicorn accepts, instead of being refused
        sock.listen(2048)
    except OSError as e:
        raise QoraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from qora import log as qlog

    qlog.configure(args.verbose)  # -v: the request log (one JSON line per request) and the library's debug lines
    try:
        import uvicorn
    except ImportError as e:
        raise QoraError(f"qora serve needs the server extra ({e}): pip install 'qora[server]'") from None
    if not 0 <= args.port <= 65535:
        raise QoraError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key:
        raise QoraError("--api-key must not be empty")
    if not 0 <= args.shutdown_timeout <= 3600:
        raise QoraError(f"--shutdown-timeout must be in 0..3600 seconds, got {args.shutdown_timeout:g}")
    if not 1 <= args.max_body_bytes <= 1 << 40:
        raise QoraError(f"--max-body-bytes must be in 1..{1 << 40}, got {args.max_body_bytes}")
    for host in args.allowed_host:
        if host != "*" and _split_host(host) is None:
            raise QoraError(f"--allowed-host {quote(host)} is not a host name, NAME:PORT or '*'")
    for origin in args.cors:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise QoraError(f"--cors {quote(origin)} is not an origin such as http://localhost:3000 (or '*')")

    from qora.hub import looks_like_repo_id, split_spec
    from qora.loader import load_model, resolve_model_path

    path = resolve_model_path(args.load)
    # an undecodable byte of a file name is a lone surrogate here; clients send the id as JSON text
    model_id = args.model_name or valid_text(
        split_spec(args.load)[0]
        if args.load and not Path(args.load).exists() and looks_like_repo_id(args.load)
        else path.stem
    )
    if args.parallel is not None and not 1 <= args.parallel <= limits.MAX_BATCH_SLOTS:
        raise QoraError(f"--parallel must be in 1..{limits.MAX_BATCH_SLOTS}, got {args.parallel}")
    if not 0 <= args.max_queued <= 1 << 20:
        raise QoraError(f"--max-queued must be in 0..{1 << 20}, got {args.max_queued}")
    device = "cpu" if args.cpu else ("gpu" if args.gpu else "auto")
    if args.ray is not None:
        if not 1 <= args.ray <= 1024 or args.port == 0:
            raise QoraError("--ray takes 1..1024 replicas and a fixed --port")
        from qora.api import ray_serve

        bound = args.host.strip("[]")
        hosts = [*LOOPBACK_HOSTS, f"[{bound}]" if ":" in bound else bound, *args.allowed_host]
        if bound in WILDCARD_BINDS:
            hosts.append("*")  # Ray's proxy answers on every address: any Host (as any_ip_host, for names too)
        # every other serve option reaches each replica (none is dropped on the way)
        options = {k: getattr(args, k) for k in ray_serve.REPLICA_OPTIONS}
        return ray_serve.run(
            path, model_id, args.host, args.port, args.ray, args.threads, args.context, args.api_key, device, hosts,
            options, args.shutdown_timeout,
        )  # fmt: skip
    sock = _bind(args.host, args.port)
    model = load_model(
        path, device, args.threads, args.context, verbose=args.verbose, rope_scaling=args.rope_scaling,
        kv_type=args.kv_type, precision=args.precision,
    )  # fmt: skip
    try:
        from qora.api.batch import BatchScheduler, plan_slots

        parallel, slot_context = plan_slots(model, args.parallel, args.context)
        scheduler = BatchScheduler(model, parallel, slot_context, max_queued=args.max_queued)
        host, port = sock.getsockname()[:2]
        bound = args.host.strip("[]")
        app = create_app(
            model,
            model_id,
            api_key=args.api_key,
            created=int(path.stat().st_mtime),
            max_body_bytes=args.max_body_bytes,
            allowed_hosts=[*LOOPBACK_HOSTS, f"[{bound}]" if ":" in bound else bound, *args.allowed_host],
            port=port,
            any_ip_host=bound in WILDCARD_BINDS,
            cors=args.cors,
            scheduler=scheduler,
        )
        shown = f"[{host}]" if ":" in host else host
        print(
            f"qora: serving {model_id} ({scheduler.context}-token context, {scheduler.slots} in parallel) "
            f"at http://{shown}:{port}/v1 "
            "- OpenAI-compatible; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        if not _is_loopback(args.host) and args.api_key is None:
            print(
                f"qora: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
                file=sys.stderr,
                flush=True,
            )
        config = uvicorn.Config(
            app,
            log_level="info" if args.verbose else "warning",
            access_log=args.verbose,
            # past the grace period the answers still running are cancelled (below); a second to send their end
            timeout_graceful_shutdown=args.shutdown_timeout + 1,
            limit_concurrency=limits.SERVER_MAX_CONNECTIONS,  # beyond it uvicorn answers 503 at once
        )
        worker = app.state.worker

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                # uvicorn stops accepting and waits for open requests; answers in progress get the grace
                # period to finish, then are cancelled (at once on a second signal)
                if self.should_exit or args.shutdown_timeout <= 0:
                    worker.cancel_all()
                else:
                    timer = threading.Timer(args.shutdown_timeout, worker.cancel_all)
                    timer.daemon = True
                    timer.start()
                    print(
                        f"qora: stopping: answers in progress may finish for {args.shutdown_timeout:g} s "
                        "(again to stop now)",
                        file=sys.stderr,
                        flush=True,
                    )
                super().handle_exit(sig, frame)

        Server(config).run(sockets=[sock])
    finally:
        model.close()
        sock.close()
    return 0
