"""Interactive chat: `python -m qora chat [--load PATH] [options]` (the generation flags of `qora`).

Each turn renders the whole conversation with the model's own chat template and hands it to the
generation loop, whose KV reuse (qora.Model.reuse_prefix) prefills only what differs from the cached
sequence: the new user turn, plus the end-of-turn marker after the last answer (the model sampled it
but it was never fed). That is exact only if the transcript is what the template renders, so:
- the assistant's message is stored as the model wrote it, thinking block included: the template,
  not qora, decides whether old thoughts stay in the prompt (SmolLM3's keeps them);
- the date the template prints is pinned when the session starts (and saved with it);
- where the text does not re-tokenize to the same ids, the prefix comparison simply reuses less.
When the conversation no longer leaves room for an answer, the oldest turns are dropped, whole, with
a note; a message that cannot fit on its own is refused, never cut.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qora import limits
from qora.errors import ContextOverflowError, QoraError
from qora.generate import (
    GenerationOptions,
    Response,
    build_messages,
    check_prompt_size,
    prompt_ids,
    stream_generate,
)
from qora.tokenizer import ModelText

PROMPT = ">>> "
MORE = "... "
FENCE = '"""'
EXIT_COMMANDS = ("/exit", "/quit", "/bye")
HELP = f"""commands:
  /think, /no_think   thinking on / off for the next answers (SmolLM3)
  /clear              forget the conversation (the system message stays)
  /save FILE          write the conversation to FILE (JSON)
  /load FILE          continue a conversation saved with /save
  /help               this list
  /exit               leave (also /quit, /bye, or Ctrl-D)
input: a line starting with {FENCE} begins a multi-line message, {FENCE} ends it; a line ending in \\
continues on the next; start a message with // to send one that begins with /.
Ctrl-C stops the answer being written (what was written stays in the conversation)."""


# ───── the conversation ─────


class Conversation:
    """Messages and settings of one chat; `ask(text)` streams the answer and records the turn."""

    def __init__(self, model, options: GenerationOptions, today: str | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.enable_thinking = options.enable_thinking
        self.today = today or _dt.date.today().isoformat()
        # The system message (with the length hint's sentence) lives in the messages, not in the options,
        # so what /save writes is the whole conversation.
        self.messages: list[dict] = build_messages(
            [{"role": "user", "content": ""}], options.system, options.length_hint
        )[:-1]
        self.options = dataclasses.replace(options, system=None, length_hint=None, raw=False)
        self.dropped = 0  # messages dropped to fit the context before the last answer
        self.last: Response | None = None

    @property
    def context(self) -> int:
        return int(self.model.engine.max_seq_len)

    @property
    def can_think(self) -> bool:
        return self.tokenizer.think_id is not None and self.tokenizer.end_think_id is not None

    def turn_options(self) -> GenerationOptions:
        return dataclasses.replace(self.options, enable_thinking=self.enable_thinking, today=self.today)

    def prompt_length(self, messages: list[dict]) -> int:
        return len(prompt_ids(self.tokenizer, messages, self.turn_options()))

    def answer_room(self) -> int:
        """Tokens kept free for the answer (and its thinking): the limits, at most a quarter of the context."""
        thinking = self.can_think and self.enable_thinking is not False
        o = self.turn_options().resolved(thinking)
        want = o.max_tokens + (o.think_budget + 1 if thinking else 0)
        return max(1, min(want, self.context // 4))

    def fit(self, text: str) -> tuple[list[dict], int]:
        """The messages for a new user turn, dropping the oldest whole turns (a user message and the
        replies after it) until the answer has room; and how many messages were dropped."""
        # a message that cannot fit is refused before the conversation around it is tokenized
        check_prompt_size(self.tokenizer, text, self.context)
        msgs = self.messages + [{"role": "user", "content": text}]
        first = 1 if msgs[0]["role"] == "system" else 0
        room, dropped = self.answer_room(), 0
        n = self.prompt_length(msgs)
        while n + room > self.context and len(msgs) - first > 1:
            end = first + 1
            while end < len(msgs) - 1 and msgs[end]["role"] != "user":
                end += 1
            dropped += end - first
            del msgs[first:end]
            n = self.prompt_length(msgs)
        if n + 1 > self.context:
            raise ContextOverflowError(
                f"this message makes a {n}-token prompt but the context holds {self.context} tokens: "
                "shorten it (or start qora chat with a larger --context)"
            )
        return msgs, dropped

    def ask(self, text: str) -> Iterator[Response]:
        """Stream the answer to `text`; the turn is recorded when the stream ends, however it ends."""
        msgs, self.dropped = self.fit(text)
        tok = self.tokenizer
        tags = {i: tok.decode([i]) for i in (tok.think_id, tok.end_think_id) if i is not None}
        written: list[str] = []  # the answer as the model wrote it, think tags included
        last = None
        try:
            for r in stream_generate(self.model, msgs, self.turn_options()):
                last = r
                written.append(r.text)
                if r.token in tags:
                    written.append(tags[r.token])
                yield r
        finally:
            self.last = last
            if last is not None and last.generation_tokens > 0:
                # ModelText: the model's own think tags stay control tokens when the turn is re-rendered
                self.messages = msgs + [{"role": "assistant", "content": ModelText("".join(written))}]
            # else: stopped before a single token; the question is dropped with its (missing) answer

    def clear(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]

    def save(self, path: str) -> None:
        data = {
            "format": "qora-chat",
            "version": 1,
            "model": self.model.path.name if hasattr(self.model, "path") else None,
            "today": self.today,
            "enable_thinking": self.enable_thinking,
            "messages": self.messages,
        }
        from qora.safeio import write_bytes

        # a fresh temporary file renamed over the target: never through a planted symlink, never
        # into a device, FIFO or folder (QoraError)
        write_bytes(Path(path).expanduser(), (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode())

    def load(self, path: str) -> None:
        from qora.safeio import read_regular

        # a regular file only (a FIFO or /dev/zero would block or never end), of bounded size
        raw = read_regular(Path(path).expanduser(), limits.MAX_JSON_FILE_BYTES, path, error=QoraError)
        try:
            data = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise QoraError(f"{path} is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise QoraError(f"{path} is not JSON: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else data  # a bare message list works too
        if not isinstance(messages, list):
            raise QoraError(f"{path}: no 'messages' list")
        clean = []
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise QoraError(f"{path}: message {i} is not a system/user/assistant message with text content")
            clean.append({"role": m["role"], "content": m["content"]})
        self.messages = clean
        if isinstance(data, dict):
            if isinstance(data.get("today"), str):
                self.today = data["today"]
            if data.get("enable_thinking") in (True, False, None):
                self.enable_thinking = data.get("enable_thinking")


# ───── terminal ─────


def read_message(read=input, limit: int = limits.CLI_MAX_PROMPT_BYTES) -> str:
    """One message from the terminal: a line, lines joined by a trailing backslash, or a fenced block.
    A message longer than `limit` characters is read to its end but not kept: QoraError."""
    size = 0

    def add(parts: list, line: str) -> None:
        nonlocal size
        size += len(line) + 1
        if size <= limit:
            parts.append(line)

    def done(parts: list, sep: str) -> str:
        if size > limit:
            raise QoraError(f"the message is longer than {limit} characters: far beyond any model's context")
        return sep.join(parts)

    line = read(PROMPT)
    if line.lstrip().startswith(FENCE):
        rest = line.lstrip()[len(FENCE) :]
        if rest.rstrip().endswith(FENCE):  # """one line"""
            return done([rest.rstrip()[: -len(FENCE)]], "")
        lines: list[str] = []
        if rest:
            add(lines, rest)
        while True:
            line = read(MORE)
            if line.rstrip().endswith(FENCE):
                add(lines, line.rstrip()[: -len(FENCE)])
                return done(lines, "\n")
            add(lines, line)
    parts: list[str] = []
    while line.endswith("\\"):
        add(parts, line[:-1])
        line = read(MORE)
    add(parts, line)
    return done(parts, "\n")


def line_reader(stdin=None, limit: int = limits.CLI_MAX_PROMPT_BYTES):
    """input() for the REPL, safe for any bytes on stdin: bytes that are not UTF-8 become U+FFFD (said
    once on stderr) instead of a UnicodeDecodeError; from a pipe, a line is read at most `limit`
    characters at a time (a longer one is skipped to its end: QoraError)."""
    stdin = stdin or sys.stdin
    try:  # input() decodes with stdin's errors handler too, terminal (readline) or not
        stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):
        pass
    tty = stdin.isatty()
    noted = False

    def read(prompt: str) -> str:
        nonlocal noted
        if tty and stdin is sys.stdin:
            line = input(prompt)
        else:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            line = stdin.readline(limit + 1)
            if not line:
                raise EOFError
            if len(line) > limit and not line.endswith("\n"):
                while (more := stdin.readline(1 << 16)) and not more.endswith("\n"):
                    pass
                raise QoraError(f"a line longer than {limit} characters: far beyond any model's context")
            line = line.removesuffix("\n")
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: the undecodable bytes surrogateescape kept
            line = line.encode(stdin.encoding or "utf-8", "surrogateescape").decode("utf-8", "replace")
            line = line.encode("utf-8", "replace").decode("utf-8")  # any surrogate still left
            if not noted:
                print("qora: the input is not valid UTF-8: shown as \ufffd", file=sys.stderr, flush=True)
                noted = True
        return line

    return read


class _Style:
    def __init__(self):
        self.on = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.on else text


def _stats(r: Response) -> str:
    new = r.prompt_tokens - r.cached_tokens
    return (
        f"[prompt {r.prompt_tokens} tokens: {new} new, {r.cached_tokens} cached, {r.prompt_time:.2f} s · "
        f"answer {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s · {r.finish_reason}]"
    )


class ChatRepl:
    def __init__(self, conv: Conversation, show_think: bool, verbose: bool):
        self.conv, self.show_think, self.verbose = conv, show_think, verbose
        self.style = _Style()

    def say(self, text: str) -> None:
        print(self.style.dim(text), flush=True)

    def command(self, text: str) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        conv = self.conv
        if name in EXIT_COMMANDS:
            return False
        if name == "/help":
            print(HELP, flush=True)
        elif name in ("/think", "/no_think"):
            conv.enable_thinking = name == "/think"
            note = "" if conv.can_think else " (this model has no thinking mode)"
            self.say(f"thinking {'on' if conv.enable_thinking else 'off'}{note}")
        elif name == "/clear":
            conv.clear()
            self.say("conversation cleared")
        elif name in ("/save", "/load"):
            if not arg:
                self.say(f"usage: {name} FILE")
            elif name == "/save":
                conv.save(arg)
                self.say(f"saved {len(conv.messages)} messages to {arg}")
            else:
                conv.load(arg)
                self.say(f"loaded {len(conv.messages)} messages from {arg}")
        else:
            self.say(f"unknown command {name}: /help lists them (start with // to send a message beginning with /)")
        return True

    def answer(self, text: str) -> None:
        from qora.cli import Printer

        printer = Printer(self.show_think)
        thinking_note = False
        gen = self.conv.ask(text)
        last = None
        try:
            for r in gen:
                if r.channel == "think" and not self.show_think and not thinking_note and self.style.on:
                    sys.stdout.write(self.style.dim("thinking…"))
                    sys.stdout.flush()
                    thinking_note = True
                if thinking_note and r.channel == "answer" and r.text.strip():
                    sys.stdout.write("\r\x1b[K")  # the answer replaces the "thinking…" note
                    thinking_note = False
                printer.write(r.text, r.channel)
                last = r
        except KeyboardInterrupt:  # Ctrl-C while printing, outside the generation loop's own handler
            gen.close()
            last = self.conv.last
            if last is not None:
                last = dataclasses.replace(last, finish_reason="interrupted")
        if thinking_note:
            sys.stdout.write("\r\x1b[K")
        printer.end(always=True)
        if self.conv.dropped:
            self.say(f"(context full: dropped the {self.conv.dropped} oldest messages to make room)")
        if last is None:
            return
        if last.finish_reason == "interrupted":
            self.say("[interrupted]")
        elif last.finish_reason == "loop":
            self.say("[stopped: the model was repeating itself]")
        elif last.finish_reason == "length" and last.prompt_tokens + last.generation_tokens >= self.conv.context:
            self.say("[context full: the answer was cut; the oldest turns will be dropped to make room]")
        if self.verbose and last.prompt_tokens:
            self.say(_stats(last))

    def run(self, read=input) -> int:
        while True:
            try:
                text = read_message(read)
            except EOFError:
                print(flush=True)
                return 0
            except KeyboardInterrupt:
                print(flush=True)
                self.say("(Ctrl-C clears the line; /exit or Ctrl-D leaves)")
                continue
            except QoraError as e:  # a message too long to keep: say so and read the next one
                print(f"qora: error: {e}", flush=True)
                continue
            if not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if not self.command(text):
                        return 0
                    continue
                self.answer(text[1:] if text.startswith("//") else text)
            except KeyboardInterrupt:  # Ctrl-C outside the answer's own handling (rendering, a command)
                print(flush=True)
                self.say("[interrupted]")
            except QoraError as e:
                print(f"qora: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)


# ───── entry point ─────


def build_parser() -> argparse.ArgumentParser:
    from qora.cli import add_generation_args

    p = argparse.ArgumentParser(
        prog="qora chat",
        description="Chat with a model in the terminal; the KV cache is kept between turns.",
        epilog="Type /help in the chat for its commands.",
    )
    add_generation_args(p, raw=False)
    return p


def main(argv: list[str]) -> int:
    from qora import log
    from qora.cli import generation_options, load_from_args, note_unused_think_flags

    parser = build_parser()
    args = parser.parse_args(argv)
    options = generation_options(args, parser)
    log.configure(args.verbose)
    model = load_from_args(args)
    note_unused_think_flags(args, model.tokenizer)
    try:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
        conv = Conversation(model, options)
        repl = ChatRepl(conv, show_think=args.show_think, verbose=args.verbose)
        think = "" if not conv.can_think else (" · thinking off" if conv.enable_thinking is False else " · thinking on")
        repl.say(
            f"qora chat · {model.path.name} · {conv.context}-token context{think} · /help for commands, "
            "/exit or Ctrl-D to leave"
        )
        return repl.run(line_reader())
    finally:
        model.close()
