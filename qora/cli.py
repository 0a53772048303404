"""Command line: `python -m qora` (also the `qora` console script).

    qora [--load PATH] --prompt TEXT [options]      generate (prompt from stdin when piped)
    qora convert SRC [-o OUT.qora] [--quant q4]     HF folder or GGUF file -> .qora
    qora chat [--load PATH] [options]               interactive chat (qora/chat.py)
    qora serve [--load PATH] [--port 8000]          OpenAI-compatible HTTP server (qora/server.py)
    qora pull REPO_ID [--quant q4]                  Hugging Face checkpoint -> cached .qora (qora/hub.py)
    qora bench [--load PATH] [--pp 512] [--tg 128]  prefill / decode tok/s on this machine (qora/bench.py)

The answer streams to stdout; thinking goes to stderr with --show-think; --verbose adds load time
and prefill / decode speed on stderr. A QoraError is one line on stderr and exit status 1; a bad flag
is a usage message and 2; Ctrl-C keeps what was produced, ends the line, and exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import qora
from qora import dtypes, limits
from qora import log as qlog
from qora.errors import QoraError
from qora.loader import load_model, resolve_model_path  # noqa: F401  (resolve_model_path: part of this module's API)
from qora.sampling import DEFAULTS

PROG = "qora"
# Subcommands with a module of their own (each has main(argv) -> exit status, raising QoraError).
SUBCOMMANDS = {
    "chat": "qora.chat",
    "serve": "qora.server",
    "pull": "qora.hub",
    "bench": "qora.bench",
    "perplexity": "qora.perplexity",
}
EXIT_INTERRUPTED = 130


# ───── parsers ─────


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _text(value: str) -> str:
    """An argument that is text: undecodable bytes in argv reach Python as lone surrogates, which the
    tokenizer cannot take; refuse them here as a usage error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _vulkan_summary() -> str:
    """Whether the Vulkan backend is built and which devices its loader finds (for bug reports)."""
    try:
        from qora._core import _vulkan
    except ImportError:
        return "not built"
    try:
        found = _vulkan.list_devices(os.environ.get("QORA_VK_LOADER") or None)
    except _vulkan.VulkanError as e:  # no loader / no driver: the CPU engine runs instead
        return f"built, not available ({e})"
    if not found:
        return "built, no device found"
    return "found " + "; ".join(f"{d['name']} ({d['type']}{'' if d['usable'] else ', unusable'})" for d in found)


def version_text() -> str:
    """`qora --version`: version, CPU kernel path, OpenMP threads and Vulkan, one fact a line."""
    lines = [f"{PROG} {qora.__version__} (Python {sys.version.split()[0]}, {sys.platform})"]
    try:
        info = qora.cpu_info()
        lines.append(
            f"cpu: isa {info['isa'] or 'none'} ({info['isa_reason']}); compiled {', '.join(info['compiled'])}; "
            f"amx {info['amx']}; decode walk {info['kernel'] or 'none'} ({info['kernel_reason']})"
        )
        omp = "on" if info["openmp"] else "off (single-threaded build)"
        lines.append(
            f"openmp: {omp}; threads {info['threads']} of {info['physical_cores']} physical cores; "
            f"wait: {info['openmp_wait']}"
        )
    except QoraError as e:
        lines.append(f"cpu: {e}")
    lines.append(f"vulkan: {_vulkan_summary()}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    # Computed only when asked: listing Vulkan devices opens the loader.
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run SmolLM3-3B and other Llama-family models locally from quantized .qora files.",
        epilog=(
            "Convert a model first with: qora convert SRC -o OUT.qora (see qora convert --help), or fetch one "
            "with: qora pull REPO_ID. Without --load, qora uses ./model.qora, else downloads a small demo model "
            "(SmolLM2-135M). More commands: qora chat (interactive), qora serve (OpenAI-compatible server), "
            "qora bench (speed on this machine)."
        ),
    )
    p.add_argument("--version", action=_VersionAction, help="show the version and the engine facts for bug reports")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompt", "-p", metavar="TEXT", type=_text, help="the prompt (default: read from stdin when it is piped)"
    )
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from PATH (UTF-8 text; '-': stdin)")
    add_generation_args(p)
    return p


def add_generation_args(p: argparse.ArgumentParser, raw: bool = True) -> None:
    """The model and generation flags, shared by the one-shot command and `qora chat` (raw=False)."""
    p.add_argument(
        "--load",
        metavar="PATH",
        help="a GGUF or .qora model file, or a pulled REPO_ID (default: ./model.qora, else the demo model)",
    )
    p.add_argument("--system", metavar="TEXT", type=_text, help="system message")
    p.add_argument("--max-tokens", type=int_at_least(1), metavar="N", help="answer tokens at most (default: from RAM)")
    p.add_argument(
        "--think-budget", type=int_at_least(0), metavar="N", help="thinking tokens before </think> (default: from RAM)"
    )
    p.add_argument("--no-think", action="store_true", help="answer without thinking first")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--show-think", action="store_true", help="print the thinking to stderr")
    if raw:
        p.add_argument(
            "--raw",
            action="store_true",
            help="feed the prompt as is, without the chat template; special tokens written in it (<|im_start|>, "
            "<think>, ...) are parsed as control tokens on purpose (chat messages are plain text)",
        )
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is usable")
    dev.add_argument("--gpu", action="store_true", help="run on the GPU (Vulkan)")
    d = DEFAULTS
    p.add_argument(
        "--temperature",
        type=_float,
        metavar="T",
        help=f"sampling temperature (default {d.temperature_think:g} think, {d.temperature:g} not)",
    )
    p.add_argument(
        "--top-k", type=int_at_least(0), metavar="K", help=f"keep the K most likely tokens (default {d.top_k:g})"
    )
    p.add_argument("--top-p", type=_float, metavar="P", help=f"nucleus sampling mass (default {d.top_p:g})")
    p.add_argument(
        "--min-p", type=_float, metavar="P", help=f"drop tokens below P x the top probability (default {d.min_p:g})"
    )
    p.add_argument(
        "--repeat-penalty", type=_float, metavar="F", help=f"repetition penalty (default {d.repeat_penalty:g})"
    )
    p.add_argument(
        "--repeat-window",
        type=int_at_least(0),
        metavar="N",
        help=f"tokens the penalties see (default {d.repeat_window:g})",
    )
    p.add_argument(
        "--presence-penalty", type=_float, metavar="F", help=f"presence penalty (default {d.presence_penalty:g})"
    )
    p.add_argument(
        "--frequency-penalty", type=_float, metavar="F", help=f"frequency penalty (default {d.frequency_penalty:g})"
    )
    p.add_argument("--seed", type=int_at_least(0), metavar="N", help="random seed (reproducible sampling)")
    p.add_argument("--threads", type=int_at_least(1), metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--context", type=int_at_least(2), metavar="N", help="KV cache size in tokens (default: auto)")
    add_context_args(p)
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate --max-tokens tokens: never end the answer at an end-of-turn token (for benchmarks)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        type=_text,
        help="stop when the answer contains TEXT (repeatable)",
    )
    p.add_argument(
        "--length", metavar="HINT", type=_text, help="answer length hint: short, medium, long, or '100 words'"
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid under the JSON schema in FILE")
    shape.add_argument("--grammar", metavar="FILE", help="the answer matches the Lark or GBNF grammar in FILE")
    p.add_argument("--verbose", "-v", action="store_true", help="print load time, speeds and finish reason to stderr")


def build_convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} convert",
        description="Convert a Hugging Face model folder or a GGUF file to a .qora file.",
        epilog=(
            "Example: huggingface-cli download HuggingFaceTB/SmolLM3-3B --local-dir SmolLM3-3B && "
            "qora convert SmolLM3-3B -o smollm3-3b-q4.qora"
        ),
    )
    p.add_argument("src", metavar="SRC", help="HF folder (config.json, *.safetensors, tokenizer.json) or .gguf file")
    p.add_argument("-o", "--output", metavar="OUT", help="the .qora file to write (default: SRC name + -QUANT.qora)")
    p.add_argument(
        "--quant",
        choices=dtypes.CHOICES,
        default=dtypes.DEFAULT,
        help=f"weight type of the layers (default {dtypes.DEFAULT})",
    )
    p.add_argument(
        "--embed-quant",
        choices=dtypes.CHOICES,
        default=None,
        help="embedding / LM head type (default: the converter's)",
    )
    return p


# ───── helpers ─────


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


LOOP_NOTE = "stopped: the model was repeating itself (loop detection)"


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def read_text(stream, where: str, limit: int = limits.CLI_MAX_PROMPT_BYTES) -> str:
    """All of a byte (or text) stream as UTF-8 text, reading at most `limit` bytes (then a QoraError:
    the tokenizer would need hundreds of bytes for each byte of it); bytes that are not UTF-8 are a
    QoraError naming the offset, not a traceback (nor a silently changed prompt)."""
    raw = getattr(stream, "buffer", stream)
    data = raw.read(limit + 1)
    if len(data) > limit:
        raise QoraError(f"{where} is larger than {limit} bytes: far beyond any model's context")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QoraError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _starts_chat(args) -> bool:
    """No prompt, no prompt file, not --raw, and a terminal on stdin: the user wants to talk."""
    if args.prompt is not None or getattr(args, "prompt_file", None) is not None or getattr(args, "raw", False):
        return False
    return sys.stdin is not None and sys.stdin.isatty()


def _read_prompt(args, parser) -> str:
    if args.prompt is not None:
        if len(args.prompt) > limits.CLI_MAX_PROMPT_BYTES:
            raise QoraError(f"the prompt is larger than {limits.CLI_MAX_PROMPT_BYTES} characters")
        return args.prompt
    source = getattr(args, "prompt_file", None)
    if source not in (None, "-"):
        try:
            with open(Path(source).expanduser(), "rb") as f:
                text = read_text(f, source)
        except OSError as e:
            raise QoraError(f"cannot read {source}: {e.strerror or e}") from None
        if not text.strip():
            raise QoraError(f"the prompt in {source} is empty")
        return text
    if sys.stdin is None or (source is None and sys.stdin.isatty()):
        parser.error("no prompt: give --prompt TEXT or pipe the prompt on stdin")
    text = read_text(sys.stdin, "the prompt read from stdin")
    if not text.strip():
        raise QoraError("the prompt read from stdin is empty")
    return text


def _read_grammar_file(path, flag: str) -> str | None:
    """The text of a --json-schema / --grammar file (None when the flag is not given)."""
    if path is None:
        return None
    from qora import limits, safeio

    data = safeio.read_regular(path, limits.GRAMMAR_MAX_CHARS * 4, where=f"{flag} {path}", error=QoraError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise QoraError(f"{flag} {path}: not UTF-8 text") from None


def generation_options(args, parser):
    """The generation flags of add_generation_args as GenerationOptions (a bad value: a usage error)."""
    from qora.generate import GenerationOptions

    try:
        return GenerationOptions(
            max_tokens=args.max_tokens,
            think_budget=args.think_budget,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            repeat_window=DEFAULTS.repeat_window if args.repeat_window is None else args.repeat_window,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=args.stop,
            greedy=args.greedy,
            enable_thinking=False if args.no_think else None,
            show_think=args.show_think,
            raw=getattr(args, "raw", False),
            system=args.system,
            length_hint=args.length,
            ignore_eos=getattr(args, "ignore_eos", False),
            json_schema=_read_grammar_file(args.json_schema, "--json-schema"),
            grammar=_read_grammar_file(args.grammar, "--grammar"),
        )
    except QoraError as e:
        parser.error(str(e))  # a bad option value is a usage error: exit 2 with the usage line


def _cpu_info_line() -> str:
    try:
        info = qora.cpu_info()
    except Exception as e:  # the engine may be missing in a broken install; --verbose should still work
        return f"unavailable ({e})"
    if isinstance(info, dict):
        return ", ".join(f"{k}={v}" for k, v in info.items())
    return str(info)


# ───── generate ─────


class Printer:
    """Writes the answer to stdout and (with --show-think) the thinking to stderr, flushing each piece.
    Leading line breaks of a chat answer are dropped (the model puts one after </think>)."""

    def __init__(self, show_think: bool, raw: bool = False):
        self.show_think = show_think
        self.raw = raw
        self.answer_started = False
        self.last_out = ""
        self.last_err = ""
        self.dim = show_think and sys.stderr.isatty() and not os.environ.get("NO_COLOR")

    def write(self, text: str, channel: str) -> None:
        if not text:
            return
        if channel == "think":
            if self.show_think:
                sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if self.dim else text)
                sys.stderr.flush()
                self.last_err = text
            return
        if not self.answer_started:
            if not self.raw:  # a raw completion keeps its text exactly
                text = text.lstrip("\r\n")
            if not text:
                return
            if self.last_err and not self.last_err.endswith("\n"):
                sys.stderr.write("\n")  # end the thinking's last line before the answer starts
                sys.stderr.flush()
            self.answer_started = True
        sys.stdout.write(text)
        sys.stdout.flush()
        self.last_out = text

    def end(self, always: bool = False) -> None:
        if (self.answer_started or always) and not self.last_out.endswith("\n"):
            sys.stdout.write("\n")
            sys.stdout.flush()


def device_choice(args) -> str:
    """--cpu / --gpu as load_model's device (--gpu with only a software Vulkan device: the CPU, said)."""
    from qora.engine.select import user_device

    return user_device("cpu" if getattr(args, "cpu", False) else ("gpu" if getattr(args, "gpu", False) else "auto"))


def note_unused_think_flags(args, tokenizer) -> None:
    """--no-think / --think-budget on a model without a thinking mode (no <think> / </think> tokens)
    change nothing: say so once rather than silently."""
    flags = [f for f, on in (("--no-think", args.no_think), ("--think-budget", args.think_budget is not None)) if on]
    if flags and (tokenizer.think_id is None or tokenizer.end_think_id is None):
        verb = "change" if len(flags) > 1 else "changes"
        _note(f"this model has no thinking mode: {' and '.join(flags)} {verb} nothing")


def add_context_args(p) -> None:
    """--rope-scaling, --kv-type and --precision: how long a context the model runs, how its KV cache is
    stored and the CPU engine's arithmetic (qora, qora chat, qora serve, qora bench, qora perplexity)."""
    from qora.engine.cpu import PRECISIONS

    p.add_argument(
        "--rope-scaling",
        metavar="yarn[:F]",
        help="stretch the model's context by YaRN, factor F (default 2: SmolLM3's 65,536 -> 131,072 positions)",
    )
    p.add_argument(
        "--kv-type",
        choices=("f16", "f32", "q8"),
        help="KV cache type: f16 (default for quantized weights), f32, or q8 (Q8_0 blocks: about half the "
        "memory of f16, for long contexts)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the CPU engine's arithmetic: q8 rounds activations to 8 bits for integer products (llama.cpp's "
        "way, faster), f32 keeps them as floats (default: f32 for a GGUF of up to 1B weights, else q8)",
    )


def load_from_args(args):
    """The model the flags of add_generation_args ask for (--load, --cpu / --gpu, --threads, --context,
    --rope-scaling, --kv-type, --precision); with --verbose the load says what it found (device memory, the engine,
    load time)."""
    return load_model(
        args.load,
        device_choice(args),
        args.threads,
        args.context,
        verbose=args.verbose,
        rope_scaling=args.rope_scaling,
        kv_type=args.kv_type,
        precision=args.precision,
    )


def _run(args, parser) -> int:
    from qora.generate import stream_generate

    options = generation_options(args, parser)
    prompt = _read_prompt(args, parser)
    qlog.configure(args.verbose)
    model = load_from_args(args)
    if args.verbose:
        _note(f"cpu: {_cpu_info_line()}")
    note_unused_think_flags(args, model.tokenizer)
    for stream in (sys.stdout, sys.stderr):
        try:  # a console that cannot show a character gets "?" rather than a crash mid-answer
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    printer = Printer(args.show_think, raw=args.raw)
    last = None
    try:
        try:
            for r in stream_generate(model, prompt, options):
                printer.write(r.text, r.channel)
                last = r
        except KeyboardInterrupt:  # Ctrl-C while we were printing, outside the generator's own handler
            printer.end(always=True)
            if args.verbose:
                _note("finish: interrupted")
            return EXIT_INTERRUPTED
        interrupted = last is not None and last.finish_reason == "interrupted"
        printer.end(always=interrupted)
        if last is not None and last.finish_reason == "loop" and not args.verbose:
            _note(LOOP_NOTE)  # said once, also without -v: an answer cut short must not look finished
        if args.verbose and last is not None:
            _note(f"prompt: {last.prompt_tokens} tokens in {last.prompt_time:.2f} s ({last.prompt_tps:.2f} tok/s)")
            _note(
                f"generated: {last.generation_tokens} tokens ({last.think_tokens} thinking) in "
                f"{last.generation_time:.2f} s ({last.generation_tps:.2f} tok/s)"
            )
            _note(f"finish: {last.finish_reason}")
        return EXIT_INTERRUPTED if interrupted else 0
    finally:
        model.close()


# ───── convert ─────


def _convert(argv: list[str]) -> int:
    parser = build_convert_parser()
    args = parser.parse_args(argv)
    src = Path(args.src).expanduser()
    if not src.exists():
        raise QoraError(f"{args.src}: no such file or folder")
    if args.output:  # kept a string: Path() would drop a trailing "/" that names a folder
        out_arg = os.path.expanduser(args.output)
    else:  # SmolLM3-3B -> SmolLM3-3B-q4.qora in the current folder
        out_arg = f"{src.stem if src.is_file() else src.name}-{args.quant}.qora"
    out = Path(out_arg)
    from qora.convert import convert

    t0 = time.perf_counter()
    convert(str(src), out_arg, quant=args.quant, embed_quant=args.embed_quant, progress=True)
    size = out.stat().st_size if out.exists() else 0
    _note(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0


# ───── entry point ─────


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with qlog.cli_session():  # the library's warnings and progress on stderr; -v adds its debug lines
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "convert":
            return _convert(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            module = importlib.import_module(SUBCOMMANDS[argv[0]])
            return module.main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if _starts_chat(args):  # bare `qora` at a terminal: a conversation, as `ollama run` does
            return importlib.import_module(SUBCOMMANDS["chat"]).main(argv)
        return _run(args, parser)
    except QoraError as e:
        _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading or converting
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`qora ... | head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:  # unreadable file, full disk, ...: the message says it all
        _err(str(e))
        return 1
