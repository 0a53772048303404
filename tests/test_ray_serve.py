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
