"""Options -> a loaded Model: the one path from what a user asked for (a file, a pulled repo id, or
nothing: ./model.qora, else the demo model; a device; threads; a context size) to a Model with its
engine. The command line, chat, the server and bench call `load_model`; `qora.load` is `open_model`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from qora import log as qlog
from qora.errors import FormatError, QoraError

log = logging.getLogger(__name__)


def resolve_model_path(load: str | os.PathLike | None, progress: Callable[[str], None] | None = None) -> Path:
    """`load` (a .qora or GGUF path, or a REPO_ID fetched by `qora pull`), else ./model.qora, else the demo
    model (downloaded and converted on first use; `progress` gets its lines, else the log does)."""
    if load:
        load = os.fspath(load)
        path = Path(load).expanduser()
        if not path.exists():
            from qora.hub import find_pulled, looks_like_repo_id

            if looks_like_repo_id(load):
                return find_pulled(load)
            raise QoraError(f"{load}: no such file")
        if path.is_dir():
            raise QoraError(f"{load} is a folder: convert it first with `qora convert {load} -o model.qora`")
        return path
    local = Path("model.qora")
    if local.is_file():
        return local
    from qora import demo

    return demo.ensure_demo_model() if progress is None else demo.ensure_demo_model(log=progress)


def open_model_file(path, check_values: bool = True):
    """The model file at `path`, validated and memory-mapped: a .qora file (format.QoraFile) or a GGUF
    file (gguf_model.GGUFModelFile), chosen by the file's first bytes, not its name."""
    from qora.safeio import open_regular

    where = os.fspath(path)
    with open_regular(path, where) as f:  # a FIFO or a device is refused before it can block
        try:
            magic = f.read(4)
        except OSError as e:
            raise FormatError(f"{where}: cannot read ({e.strerror or e})") from None
    if magic == b"GGUF":
        from qora.gguf_model import GGUFModelFile

        return GGUFModelFile(path, check_values)
    from qora.format import read_qora

    return read_qora(path, check_values)  # its errors name what else the file may be


def engine_label(engine) -> str:
    """The engine in a few words, for --verbose: `gpu (NAME, Vulkan)` or `cpu (ISA, N threads)`."""
    if engine.device == "vulkan":
        return f"gpu ({engine.device_name}, Vulkan)"
    return f"cpu ({engine.isa}, {engine.n_threads} threads)"


def open_model(
    path,
    threads=None,
    device: str = "auto",
    max_seq_len=None,
    verbose: bool = False,
    rope_scaling=None,
    kv_type=None,
    precision=None,
):
    """Open a .qora or GGUF file by mmap and build the engine for it (this is `qora.load`). verbose: the
    load's debug lines (device memory, why the CPU runs it, load time) are shown on stderr;
    rope_scaling: "yarn" / "yarn:F" (engine.base.with_rope_scaling); kv_type: the KV cache type
    ("f16", "f32", "q8"; engine.base.kv_cache_dtype); precision: the CPU engine's arithmetic, "q8" or "f32"
    (None: engine.cpu.default_precision)."""
    from qora.engine import DEVICES, make_engine
    from qora.engine.base import with_rope_scaling
    from qora.model import Model
    from qora.tokenizer import Tokenizer

    if device not in DEVICES:
        raise QoraError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    path = os.fspath(path)
    with qlog.verbose(verbose):
        t0 = time.perf_counter()
        qfile = open_model_file(path)
        try:
            qfile.config = with_rope_scaling(qfile.config, rope_scaling)
            tokenizer = Tokenizer(
                qfile.tokenizer_json,
                qfile.chat_template,
                qfile.special_tokens,
                where=path,
                loaded=getattr(qfile, "loaded_tokenizer", None),
            )
            if tokenizer.id_limit > qfile.config["vocab_size"]:  # ids past the embedding would reach the engine
                raise FormatError(
                    f"{path}: tokenizer has token ids up to {tokenizer.id_limit - 1} but the model's vocab_size is "
                    f"{qfile.config['vocab_size']}"
                )
            engine = make_engine(
                qfile, device, threads=threads, max_seq_len=max_seq_len, kv_type=kv_type, precision=precision
            )
        except BaseException:
            qfile.close()
            raise
        model = Model(qfile, engine, tokenizer, load_seconds=time.perf_counter() - t0)
        cfg = model.config
        about = ", ".join(f"{k} {cfg[k]}" for k in ("architecture", "n_layers", "dim", "vocab_size") if k in cfg)
        log.debug("loaded %s in %.2f s (%s) on %s", path, model.load_seconds, about, engine_label(engine))
    return model


def load_model(
    load: str | os.PathLike | None = None,
    device: str = "auto",
    threads: int | None = None,
    context: int | None = None,
    verbose: bool = False,
    progress: Callable[[str], None] | None = None,
    rope_scaling: str | None = None,
    kv_type: str | None = None,
    precision: str | None = None,
):
    """A front end's options -> a loaded Model: the path as resolve_model_path finds it (a demo
    download reports to `progress`), then `qora.load` with the device ("auto", "cpu", "gpu"), the
    thread count and the context size (None: the defaults); `verbose` shows the load's debug lines."""
    import qora

    path = resolve_model_path(load, progress)
    kwargs = {"threads": threads, "device": device}
    if context is not None:
        kwargs["max_seq_len"] = context
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    if kv_type is not None:
        kwargs["kv_type"] = kv_type
    if precision is not None:
        kwargs["precision"] = precision
    with qlog.verbose(verbose):
        # through the public qora.load: the one entry a program (or a test) may wrap or replace
        return qora.load(path, **kwargs)
