"""Answers: a job's Responses shaped as OpenAI's chat or text completion, whole (one JSON object) or
streamed (server-sent events ending with `data: [DONE]`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar

from qora import tools
from qora.api.errors import generation_error, valid_text
from qora.api.jobs import END, Job
from qora.generate import Response

FINISH = {"stop": "stop", "length": "length", "loop": "length", "interrupted": "stop"}
DONE = b"data: [DONE]\n\n"


def usage(r: Response) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "total_tokens": r.prompt_tokens + r.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": r.think_tokens},
    }


def sse(obj) -> bytes:
    return b"data: " + valid_text(json.dumps(obj, ensure_ascii=False)).encode() + b"\n\n"


class Answer:
    """One request's answer as its Responses arrive: the text per channel, the logprob entries, the last
    Response. `feed` returns the stream chunks' choices each Response adds (a whole answer ignores them);
    `whole` is the choice of the complete answer. The subclasses shape both for their endpoint."""

    object: ClassVar[str]  # of the whole answer
    chunk_object: ClassVar[str]  # of each streamed chunk
    id_prefix: ClassVar[str]
    strip_leading_newlines: ClassVar[bool] = False

    def __init__(self, tokenizer, logprobs: int | None, echo: str = ""):
        self.tok = tokenizer
        self.logprobs = logprobs  # None: no logprobs asked for
        self.echo = echo
        self.reasoning: list[str] = []
        self.text: list[str] = [echo]
        self.chars = len(echo)  # answer characters so far (the legacy text_offset)
        self.entries: list = []  # one logprob entry per answer token
        self._streamed = 0  # entries already sent in a chunk
        self.answer_started = False
        self.last: Response | None = None
        self.tools: tools.ToolSpec | None = None  # the request offered tools: look for calls in the answer
        self._held = ""  # answer text not streamed yet: it may be (the start of) a tool call

    def pieces(self, r: Response) -> tuple[str, str]:
        """(reasoning text, answer text) this response adds."""
        self.last = r
        if r.channel == "think":
            return r.text, ""
        text = r.text
        if not self.answer_started and self.strip_leading_newlines:
            text = text.lstrip("\r\n")  # the newline a model puts after </think>, as the CLI drops it
        if text:
            self.answer_started = True
        return "", text

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def has_logprob(self, r: Response) -> bool:
        """Whether `r` carries a logprob entry: asked for, and a token that is not the end of the turn."""
        if self.logprobs is None or r.logprob is None or r.token is None:
            return False
        return r.token not in self.tok.stop_ids

    def take_entries(self) -> list:
        """The entries not yet streamed."""
        new = self.entries[self._streamed :]
        self._streamed = len(self.entries)
        return new

    def finish(self) -> str:
        return FINISH.get(self.last.finish_reason or "stop", "stop")

    def opening(self) -> list[dict]:
        """The choices streamed before the first Response."""
        return []

    def feed(self, r: Response) -> list[dict]:
        raise NotImplementedError

    def whole(self) -> dict:
        raise NotImplementedError


class ChatAnswer(Answer):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"
    strip_leading_newlines = True

    def entry(self, r: Response) -> dict | None:
        """OpenAI's chat logprob entry for an answer token."""
        if not self.has_logprob(r) or r.channel != "answer":
            return None
        text = self.token_text(r.token)
        tops = [
            {"token": (t := self.token_text(i)), "logprob": lp, "bytes": list(t.encode())}
            for i, lp in (r.top_logprobs or [])
        ]
        return {"token": text, "logprob": r.logprob, "bytes": list(text.encode()), "top_logprobs": tops}

    def _delta(self, delta: dict, finish: str | None = None, with_logprobs: bool = False) -> dict:
        lp = {"content": self.take_entries()} if with_logprobs and self.logprobs is not None else None
        return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def opening(self) -> list[dict]:
        return [self._delta({"role": "assistant", "content": ""})]

    def _streamable(self, piece: str) -> str:
        """With tools: the part of the answer that cannot belong to a tool call and may go out now. From a
        `<tool_call>` on, everything is held until the end; a piece ending in a possible start of one
        (`<tool`) is held until the next piece decides."""
        if self.tools is None:
            return piece
        held = self._held + piece
        at = held.find(tools.OPEN)
        if at < 0:
            at = next(
                (
                    i
                    for i in range(max(0, len(held) - len(tools.OPEN) + 1), len(held))
                    if tools.OPEN.startswith(held[i:])
                ),
                len(held),
            )
        self._held = held[at:]
        return held[:at]

    def _calls(self) -> tuple[str | None, list[dict]] | None:
        return tools.parse("".join(self.text), self.tools) if self.tools is not None else None

    def _closing(self, r: Response) -> list[dict]:
        """The last chunks: the tool calls, or the held text when it was no call."""
        parsed = self._calls()
        if parsed is not None:
            deltas = [{"index": i, **call} for i, call in enumerate(parsed[1])]
            return [self._delta({"tool_calls": deltas}), self._delta({}, "tool_calls", with_logprobs=True)]
        rest, self._held = self._held, ""
        choices = [self._delta({"content": rest}, with_logprobs=True)] if rest else []
        return choices + [self._delta({}, FINISH.get(r.finish_reason, "stop"), with_logprobs=True)]

    def feed(self, r: Response) -> list[dict]:
        think, piece = self.pieces(r)
        if (entry := self.entry(r)) is not None:
            self.entries.append(entry)
        self.reasoning.append(think)
        self.text.append(piece)
        choices = []
        if think:
            choices.append(self._delta({"reasoning_content": think}))
        if out := self._streamable(piece):
            choices.append(self._delta({"content": out}, with_logprobs=True))
        if r.finish_reason is not None:
            choices.extend(self._closing(r))
        return choices

    def whole(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.text)}
        finish = self.finish()
        if (parsed := self._calls()) is not None:
            message["content"], message["tool_calls"], finish = parsed[0], parsed[1], "tool_calls"
        if any(self.reasoning):
            message["reasoning_content"] = "".join(self.reasoning)
        lp = {"content": self.entries} if self.logprobs is not None else None
        return {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}


class TextAnswer(Answer):
    """/v1/completions; logprobs in the legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def _logprobs(self, entries: list) -> dict | None:
        if self.logprobs is None:
            return None
        names = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {name: [e[i] for e in entries] for i, name in enumerate(names)}

    def _choice(self, text: str, finish: str | None = None, with_logprobs: bool = False) -> dict:
        lp = self._logprobs(self.take_entries()) if with_logprobs else None
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def opening(self) -> list[dict]:
        return [self._choice(self.echo)] if self.echo else []

    def feed(self, r: Response) -> list[dict]:
        _, piece = self.pieces(r)
        if self.has_logprob(r):
            tops = {self.token_text(i): lp for i, lp in (r.top_logprobs or [])}
            self.entries.append((self.token_text(r.token), r.logprob, tops, self.chars))
        self.text.append(piece)
        self.chars += len(piece)
        choices = [self._choice(piece, with_logprobs=True)] if piece else []
        if r.finish_reason is not None:
            choices.append(self._choice("", FINISH.get(r.finish_reason, "stop"), with_logprobs=True))
        return choices

    def whole(self) -> dict:
        return {
            "index": 0,
            "text": "".join(self.text),
            "logprobs": self._logprobs(self.entries),
            "finish_reason": self.finish(),
        }


async def stream(
    job: Job, first, answer: Answer, head: dict, include_usage: bool, tick=None, done=None
) -> AsyncIterator[bytes]:
    """The answer as server-sent events, from the job's first event on; cancels the job when the client
    goes away (or the answer is complete). tick(): called per generated token; done(status): at the end
    (200, or the error's status, or 499 when the client left)."""
    usage_field = {"usage": None} if include_usage else {}
    status = 499
    try:
        for choice in answer.opening():
            yield sse({**head, "choices": [choice], **usage_field})
        event = first
        while event is not END:
            if isinstance(event, BaseException):
                status = generation_error(event).status
                yield sse(generation_error(event).body())  # the stream has started: the error goes in band
                break
            if tick is not None and event.token is not None:
                tick()
            for choice in answer.feed(event):
                yield sse({**head, "choices": [choice], **usage_field})
            event = await job.events.get()
        if include_usage and answer.last is not None:
            yield sse({**head, "choices": [], "usage": usage(answer.last)})
        status = 200 if status == 499 else status
        yield DONE
    finally:
        job.cancel()  # the client went away (or we are done): the scheduler stops at the next token
        if done is not None:
            done(status)


async def collect(
    job: Job, first, answer: Answer, head: dict, client_gone: Callable[[], Awaitable[bool]], tick=None
) -> dict:
    """The whole answer as one JSON object; ApiError if generation failed, ClientGone if the client left.
    tick(): called per generated token."""
    event = first
    try:
        while event is not END:
            if isinstance(event, BaseException):
                raise generation_error(event)
            if tick is not None and event.token is not None:
                tick()
            answer.feed(event)
            event = await job.next_event(client_gone)
    finally:
        job.cancel()  # a no-op once finished; stops the scheduler's work if we leave early
    return {**head, "object": answer.object, "choices": [answer.whole()], "usage": usage(answer.last)}
