"""Typed request bodies of /v1/chat/completions and /v1/completions (pydantic, strict: no type coercion).

`ChatRequest.parse(body, model_id)` / `CompletionRequest.parse(...)` validate a decoded JSON object and
raise ApiError on the first invalid field, with OpenAI's error shape: `param` names the field, the message
says what was expected and what came. pydantic checks the types and the numeric bounds (the `Field`
constraints); the validators below check the rest. pydantic reports every invalid field at once; the
answer names one, the first in `CHECK_ORDER`.

Beyond OpenAI's fields: `top_k`, `min_p`, `repetition_penalty`, `think_budget`, `ignore_eos`,
`chat_template_kwargs.enable_thinking`, and llama.cpp's `grammar` (Lark or GBNF) and `json_schema`.
A field qora does not support is answered 400 naming it, never ignored (the client would believe it
took effect): every model forbids extra fields. OpenAI fields that clients send with their default
are accepted with that value only (`store` false, `service_tier` "auto", `modalities` ["text"], ...);
`user` is an end-user id OpenAI keeps for abuse reports: accepted, and logged under --verbose.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from qora import limits, sampling, structured, tools
from qora.api.errors import ApiError, quote
from qora.errors import QoraError
from qora.generate import MAX_TOP_LOGPROBS, GenerationOptions

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4
MAX_LEGACY_LOGPROBS = 5

# Which invalid field a request is answered about when it has several (top-level names; a dotted name
# ranks a nested field on its own).
CHECK_ORDER = (
    "model",
    "store",
    "metadata",
    "service_tier",
    "modalities",
    "best_of",
    "user",
    "stream_options",
    "n",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "json_schema",
    "grammar",
    "logit_bias",
    "max_completion_tokens",
    "max_tokens",
    "temperature",
    "logprobs",
    "top_logprobs",
    "seed",
    "chat_template_kwargs",
    "think_budget",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "ignore_eos",
    "messages",
    "prompt",
    "suffix",
    "stream",
    "stream_options.include_usage",
    "echo",
)

# pydantic's error types for a value of the wrong JSON type, as the message names the type wanted
_WANTED = {
    "string_type": "a string",
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "dict_type": "an object",
    "model_type": "an object",
    "list_type": "an array",
}
_BOUNDS = ("greater_than_equal", "greater_than", "less_than_equal", "less_than")


class InvalidField(ValueError):
    """Raised by a validator: pydantic keeps it in its error list, and parse answers with its ApiError."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.error = ApiError(status, message, param=param, code=code)


def wrong_type(name: str, value, wanted: str) -> InvalidField:
    return InvalidField(f"'{name}' must be {wanted}, got {quote(value, json.dumps, 60)}", param=name)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None  # SmolLM3's thinking switch; the other kwargs are not passed on


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list | None = None  # an assistant's earlier calls (checked by _chat_messages)
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None  # a tool result's function


def _only(name: str, allowed: tuple):
    """A validator accepting only the listed values (OpenAI's defaults a client may send) for `name`."""

    def check(cls, value):
        if value is not None and value not in allowed:
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise InvalidField(f"'{name}' is not supported (only {shown} is accepted)", param=name)
        return value

    return field_validator(name, mode="before")(classmethod(check))


class _Request(_Strict):
    """The fields both endpoints take. None means "not sent" (JSON null too): qora's default applies."""

    chat: ClassVar[bool]

    model: str | None = Field(None, validate_default=True)
    stream: bool | None = None
    stream_options: StreamOptions | None = None  # after `stream`: its validator reads it
    n: int | None = Field(None, ge=1)
    tools: Any = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63))
    think_budget: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: list[str] = []
    ignore_eos: bool | None = None  # as vLLM and llama.cpp's server
    response_format: Any = None
    json_schema: Any = None  # llama.cpp's server's name for a response_format schema
    grammar: str | None = None  # Lark or GBNF (llama.cpp's server's field)
    logit_bias: Any = None
    user: str | None = Field(None, max_length=256)
    # OpenAI fields clients send with their default: accepted with it only
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    check_store = _only("store", (False,))
    check_metadata = _only("metadata", ({},))
    check_service_tier = _only("service_tier", ("auto", "default"))

    @classmethod
    def parse(cls, body: dict, model_id: str, vocab: int | None = None):
        """The request `body` validated, for the server of `model_id` (whose vocabulary has `vocab` ids);
        ApiError if any field is invalid."""
        try:
            return cls.model_validate(body, context={"model_id": model_id, "vocab": vocab})
        except ValidationError as e:
            raise _answer(cls, e) from None

    @field_validator("model")
    @classmethod
    def _served_model(cls, name: str | None, info: ValidationInfo) -> str:
        model_id = info.context["model_id"]
        if name is None:
            raise InvalidField("'model' is required", param="model")
        if name != model_id:
            raise InvalidField(
                f"model {quote(name)} does not exist; this server has {quote(model_id)}",
                "model",
                404,
                "model_not_found",
            )
        return name

    @field_validator("stream_options", mode="before")
    @classmethod
    def _only_when_streaming(cls, value, info: ValidationInfo):
        # an invalid `stream` is not in info.data: its own error is the answer then
        if isinstance(value, dict) and not info.data.get("stream", True):
            raise InvalidField("'stream_options' needs 'stream': true", param="stream_options")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise InvalidField("only n=1 is supported", param="n")
        return n

    @field_validator("response_format", "json_schema", "grammar")
    @classmethod
    def _structured(cls, value, info: ValidationInfo):
        if value is not None:
            try:
                structured.grammar_from(**{info.field_name: value})
            except QoraError as e:
                raise InvalidField(str(e), param=info.field_name) from None
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias, info: ValidationInfo):
        try:
            return sampling.check_logit_bias(bias, info.context.get("vocab"))
        except QoraError as e:
            raise InvalidField(str(e), param="logit_bias") from None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop) -> list[str]:
        if stop is None:
            return []
        if not isinstance(stop, (str, list)):
            raise wrong_type("stop", stop, "a string or an array")
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise InvalidField(f"'stop' must be a non-empty string or up to {MAX_STOPS} of them", param="stop")
        if any(len(s) > limits.SERVER_MAX_STOP_CHARS for s in stops):
            raise InvalidField(f"a stop string may have at most {limits.SERVER_MAX_STOP_CHARS} characters", "stop")
        return list(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def echo_text(self) -> str:
        """What the answer starts with before the generated text (completions' `echo`)."""
        return ""

    @property
    def prompt_input(self):
        """What stream_generate takes: chat messages, or a raw prompt string."""
        raise NotImplementedError

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        """How many alternatives to report with each token's log-probability; None: no logprobs."""
        raise NotImplementedError

    def _enable_thinking(self) -> bool | None:
        return None

    def _shape(self, chat_template: str | None) -> dict:
        """The structured-output and tool fields of GenerationOptions."""
        given = [n for n in ("response_format", "json_schema", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ApiError(400, f"give one of {' and '.join(map(repr, given))}, not both", param=given[1])
        return {
            "response_format": self.response_format,
            "json_schema": self.json_schema,
            "grammar": self.grammar,
            "logit_bias": self.logit_bias or None,
        }

    def options(self, chat_template: str | None = None) -> GenerationOptions:
        """The request as GenerationOptions (chat_template: the model's, for tools); ApiError if the values
        are invalid together."""
        shape = self._shape(chat_template)
        try:
            return GenerationOptions(
                max_tokens=self._max_tokens(),
                think_budget=self.think_budget,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repeat_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=None if self.seed is None else self.seed % 2**63,
                stop=list(self.stop),
                greedy=self.temperature == 0.0,
                enable_thinking=self._enable_thinking(),
                raw=not self.chat,
                # OpenAI semantics: max_tokens is a hard count, not "stop at a sentence near it".
                sentence_stop=False,
                logprobs=self._logprobs(),
                ignore_eos=bool(self.ignore_eos),
                **shape,
            )
        except QoraError as e:
            raise ApiError(400, str(e)) from None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    chat = True

    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # after `logprobs`: it is read
    chat_template_kwargs: ChatTemplateKwargs | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    modalities: Any = None
    check_modalities = _only("modalities", (["text"],))
    messages: list[ChatMessage] = Field(None, validate_default=True)

    @field_validator("tools")
    @classmethod
    def _tools(cls, value):
        if value is not None:
            try:
                tools.check_tools(value)
            except QoraError as e:
                raise InvalidField(str(e), param="tools") from None
        return value

    @property
    def tool_spec(self) -> tools.ToolSpec | None:
        try:
            return tools.spec(self.tools, self.tool_choice, self.parallel_tool_calls)
        except QoraError as e:
            raise ApiError(400, str(e), param="tool_choice") from None

    def _shape(self, chat_template: str | None) -> dict:
        shape = super()._shape(chat_template)
        spec = self.tool_spec
        if spec is None:
            return shape
        if not tools.supports_tools(chat_template):
            raise ApiError(400, "this model's chat template has no tool support: 'tools' cannot be used", "tools")
        shape["tools"] = tools.template_tools(spec.functions, chat_template)
        if spec.required:
            if any(v is not None for v in (self.response_format, self.json_schema, self.grammar)):
                raise ApiError(
                    400, "tool_choice forcing a call cannot be combined with a response format", "tool_choice"
                )
            try:
                shape["grammar"] = structured.Grammar.lark(tools.forcing_grammar(spec))
            except QoraError as e:  # a function's parameters schema the grammar cannot take
                raise ApiError(400, f"tools: {e}", param="tools") from None
        return shape

    @model_validator(mode="before")
    @classmethod
    def _newer_name_wins(cls, body):
        if isinstance(body, dict) and body.get("max_completion_tokens") is not None:
            return {**body, "max_tokens": None}  # not read at all then, as OpenAI does
        return body

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise InvalidField("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return top

    @field_validator("messages", mode="before")
    @classmethod
    def _chat_messages(cls, messages) -> list[dict]:
        if messages is not None and not isinstance(messages, list):
            raise wrong_type("messages", messages, "an array")
        if not messages:
            raise InvalidField("'messages' must be a non-empty array", param="messages")
        if len(messages) > limits.SERVER_MAX_MESSAGES:
            raise InvalidField(f"'messages' may hold at most {limits.SERVER_MAX_MESSAGES} messages", "messages")
        out = []
        for i, m in enumerate(messages):  # stops at the first bad one: a 1 MiB body holds 300K of them
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise InvalidField(f"{where} must be an object", param="messages")
            role = m.get("role")
            if role == "developer":  # OpenAI's newer name for the system role
                role = "system"
            if role not in ("system", "user", "assistant", "tool"):
                raise InvalidField(f"{where}: unknown role {quote(role)}", param="messages")
            out.append(_message(m, role, where))
        return out

    @property
    def prompt_input(self) -> list[dict]:
        return tools.render_messages([m.model_dump(exclude_none=True) for m in self.messages])

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _enable_thinking(self) -> bool | None:
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None


class CompletionRequest(_Request):
    """POST /v1/completions (a raw prompt, no chat template)."""

    chat = False

    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    prompt: str = Field(None, validate_default=True)
    suffix: str | None = None
    echo: bool | None = None
    best_of: Any = None
    check_best_of = _only("best_of", (1,))

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt) -> str:
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise wrong_type("prompt", prompt, "a string or an array")
        if isinstance(prompt, list):  # a batch of one prompt is fine; more is not supported
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise InvalidField("'prompt' must be a string (or a list of one string)", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidField("'prompt' must be a non-empty string", param="prompt")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise InvalidField("'suffix' is not supported", param="suffix")
        return suffix

    @property
    def prompt_input(self) -> str:
        return self.prompt

    @property
    def echo_text(self) -> str:
        return self.prompt if self.echo else ""

    def _max_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS

    def _logprobs(self) -> int | None:
        return self.logprobs


# the fields of a message besides role and content, by role
_MESSAGE_FIELDS = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}


def _message(m: dict, role: str, where: str) -> dict:
    """One chat message checked: its content as text; tool calls and tool results kept for the template."""
    allowed = {"role", "content", *_MESSAGE_FIELDS.get(role, ())}
    if role == "assistant":
        allowed |= {"refusal"} if m.get("refusal") is None else set()
    extra = sorted(set(m) - allowed)
    if extra:
        raise InvalidField(f"{where}: unsupported field {quote(extra[0])} in a {role} message", param="messages")
    out = {"role": role, "content": _text_content(m.get("content"), where)}
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise InvalidField(f"{where}: '{key}' must be a string", param="messages")
            if m.get(key) is not None:
                out[key] = m[key]
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidField(f"{where}: 'tool_calls' must be an array", param="messages")
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)
            ):
                raise InvalidField(f"{where}: each tool call needs function.name and function.arguments", "messages")
            try:
                tools.call_text(fn["name"], fn["arguments"])
            except QoraError as e:
                raise InvalidField(f"{where}: {e}", param="messages") from None
        out["tool_calls"] = calls
    return out


def _text_content(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        if len(content) > limits.SERVER_MAX_CONTENT_PARTS:
            raise InvalidField(f"{where}: at most {limits.SERVER_MAX_CONTENT_PARTS} content parts", "messages")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidField(f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidField(f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _rank(error: dict) -> int:
    if error["type"] == "extra_forbidden":
        return -1  # an unsupported field is the first thing to say
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc[:2])
    return CHECK_ORDER.index(dotted if dotted in CHECK_ORDER else loc[0])


def _answer(request_type: type[_Request], exc: ValidationError) -> ApiError:
    """The ApiError for the first invalid field, in the words qora's answers have always used."""
    error = min(exc.errors(include_url=False), key=_rank)
    if isinstance(raised := (error.get("ctx") or {}).get("error"), InvalidField):
        return raised.error
    name, value = str(error["loc"][-1]), error["input"]
    if error["type"] == "extra_forbidden":
        dotted = ".".join(str(part) for part in error["loc"])
        return ApiError(400, f"unsupported parameter {quote(dotted)}: qora does not support it", quote(dotted, str))
    if error["type"] in _WANTED:
        return wrong_type(name, value, _WANTED[error["type"]]).error
    if error["type"] in _BOUNDS:
        bounds = {type(c).__name__: c for c in request_type.model_fields[name].metadata}
        low, high = bounds.get("Ge") or bounds.get("Gt"), bounds.get("Le")
        span = f"> {low.gt}" if "Gt" in bounds else f">= {low.ge}"
        span += f" and <= {high.le}" if high is not None else ""
        return ApiError(400, f"'{name}' must be {span}, got {quote(value, str)}", param=name)
    return ApiError(400, f"'{name}': {error['msg']}", param=name)  # no field of ours gets here
