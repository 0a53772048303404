"""qora's app as a Ray Serve deployment (qora/api/ray_serve.py): a local Ray instance, two replicas of
the tiny model behind Ray's HTTP proxy, answered through it by the openai client. Skipped where
ray[serve] is not installed."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from openai import OpenAI  # noqa: E402

from qora.api.ray_serve import application  # noqa: E402

FIX = Path(__file__).parent / "fixtures"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_model):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            application(tiny_model("tiny-smollm3", "q8"), replicas=2, threads=1, model_id="tiny"),
            name="qora",
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_ray_serve(ray_url):
    client = OpenAI(base_url=ray_url + "/v1", api_key="none", max_retries=2, timeout=120)
    system = {"role": "system", "content": "Be brief. /no_think"}
    answers = {
        client.chat.completions.create(
            model="tiny", messages=[system, {"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        .choices[0]
        .message.content
        for _ in range(4)
    }
    assert len(answers) == 1  # greedy: every replica gives the same answer
    stream = client.chat.completions.create(
        model="tiny", messages=[system, {"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers.pop()
    instances = {httpx.get(ray_url + "/health", timeout=30).json()["instance"] for _ in range(40)}
    assert len(instances) == 2  # both replicas took requests


def test_a_replica_takes_the_serve_options(tiny_model):
    """Each replica loads and batches as `qora serve` would with the same flags: KV type, precision,
    --parallel, --max-queued, the body limit and CORS origins."""
    from starlette.testclient import TestClient

    from qora.api.ray_serve import build_app

    options = {"kv_type": "f32", "precision": "f32", "parallel": 3, "max_queued": 5, "max_body_bytes": 200}
    app = build_app(tiny_model("tiny-smollm3", "q8"), "tiny", 1, 64, None, "cpu", None, None, options)
    scheduler = app.state.worker
    assert (scheduler.slots, scheduler.max_queued, scheduler.context) == (3, 5, 64)
    assert scheduler.model.engine.kv_dtype == "f32" and scheduler.model.engine.precision == "f32"
    with TestClient(app) as client:
        body = b"{" + b" " * 300 + b"}"
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_serve_ray_hands_every_option_to_the_replicas(tiny_model, monkeypatch):
    """`qora serve --ray N` passes the load and batching flags on (none dropped on the way)."""
    from qora import server
    from qora.api import ray_serve

    seen = {}
    monkeypatch.setattr(ray_serve, "run", lambda *a: seen.setdefault("args", a) and 0)
    path = str(tiny_model("tiny-smollm3", "q8"))
    argv = ["--load", path, "--ray", "2", "--port", "8123", "--kv-type", "f32", "--precision", "f32", "--parallel", "3"]
    argv += ["--max-queued", "7", "--cors", "http://app.example", "--max-body-bytes", "999", "--shutdown-timeout", "4"]
    assert server.main(argv) == 0
    args = seen["args"]
    options, shutdown = args[-2], args[-1]
    assert options == {
        "rope_scaling": None, "kv_type": "f32", "precision": "f32", "parallel": 3, "max_queued": 7,
        "cors": ["http://app.example"], "max_body_bytes": 999,
    }  # fmt: skip
    assert shutdown == 4.0 and args[4] == 2  # replicas


def test_application_refuses_an_option_a_replica_does_not_take(tiny_model):
    from qora.api.ray_serve import application
    from qora.errors import QoraError

    with pytest.raises(QoraError, match="does not take nonsense"):
        application(tiny_model("tiny-smollm3", "q8"), replicas=1, options={"nonsense": 1})
