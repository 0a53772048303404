"""Tool calls (OpenAI's `tools` / `tool_choice`) for chat templates that render tools and whose models
answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (SmolLM3's format, also
Hermes' and Qwen's).

In: the tool definitions are checked (`check_tools`) and handed to the template (`template_tools`:
SmolLM3's template prints each entry of `xml_tools` as it is, and its model card passes the function
objects, so those are what it gets); an assistant message's `tool_calls` become the `<tool_call>`
blocks the model wrote (`render_messages`), since the template prints only `content`; `tool`
messages go to the template as they are (SmolLM3's renders them as a user turn).

Out: `parse(text)` finds the blocks in an answer. Anything malformed (a block that is not closed, not
JSON, an unknown function name, arguments that are not an object) makes the whole answer plain text,
never an error. With tool_choice "required" or a named function, the answer is held to the blocks by
a grammar (`forcing_grammar`, through structured output), so it cannot be malformed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from qora.errors import QoraError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)
MAX_TOOLS = 128  # OpenAI's limit for one request
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function names


class ToolError(QoraError):
    """Tool definitions or a tool_choice that cannot be used."""


def supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders tools and speaks the <tool_call> format."""
    t = chat_template or ""
    return ("tools" in t) and OPEN in t


def check_tools(tools) -> list[dict]:
    """OpenAI's tools list: [{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}]; returns the function objects."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty array")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' may hold at most {MAX_TOOLS} functions")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if set(tool) - {"type", "function"}:
            raise ToolError(f"tools[{i}]: unsupported field {sorted(set(tool) - {'type', 'function'})[0]!r}")
        fn = tool["function"]
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise ToolError(f"tools[{i}].function: unsupported field {sorted(extra)[0]!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ToolError(f"tools[{i}]: the function name {name!r} is used twice")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append(fn)
    return functions


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools as generation needs them: the functions, which one must be called (None: any or
    none), whether calling is required, whether several calls may come at once."""

    functions: tuple
    required: bool = False
    name: str | None = None
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}


def spec(tools, tool_choice=None, parallel_tool_calls=None) -> ToolSpec | None:
    """The ToolSpec of a request (None: no tools are offered, or tool_choice "none")."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'")
        return None
    functions = tuple(check_tools(tools))
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice in (None, "auto"):
        return ToolSpec(functions, parallel=parallel)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolSpec(functions, required=True, parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in {f["name"] for f in functions}:
            raise ToolError(f"tool_choice names {name!r}, which is not in 'tools'")
        return ToolSpec(functions, required=True, name=name, parallel=False)
    raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}")


def template_tools(functions, chat_template: str | None) -> list[dict]:
    """What the template's `tools` gets: SmolLM3's (xml_tools) the function objects, as its model card
    passes them; other templates OpenAI's {"type": "function", "function": ...} entries, as
    transformers passes them."""
    if "xml_tools" in (chat_template or ""):
        return [dict(f) for f in functions]
    return [{"type": "function", "function": dict(f)} for f in functions]


def call_text(name: str, arguments) -> str:
    """One call as the model writes it."""
    if isinstance(arguments, str):  # OpenAI's messages carry arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ToolError(f"the arguments of the call to {name!r} are not JSON") from None
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def render_messages(messages: list[dict]) -> list[dict]:
    """Messages for the template: an assistant message's tool_calls written into its content as the
    model wrote them; tool results and everything else as they are."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name") and v is not None}
        if calls:
            text = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            m["content"] = f"{m.get('content') or ''}\n{text}".lstrip("\n")
        m.setdefault("content", "")
        out.append(m)
    return out


def parse(text: str, tools: ToolSpec) -> tuple[str | None, list[dict]] | None:
    """(content outside the blocks or None, OpenAI tool_calls) when `text` holds well-formed calls to
    known functions; None when it holds none or anything malformed (then it is plain text)."""
    if OPEN not in text:
        return None
    calls, pos, rest = [], 0, []
    for m in _BLOCK.finditer(text):
        rest.append(text[pos : m.start()])
        pos = m.end()
        try:
            call = json.loads(m.group(1))
        except ValueError:
            return None
        if not isinstance(call, dict) or set(call) - {"name", "arguments"} or call.get("name") not in tools.names:
            return None
        args = call.get("arguments", {})
        if not isinstance(args, dict):
            return None
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    rest.append(text[pos:])
    content = "".join(rest).strip()
    if not calls or OPEN in content or CLOSE in content:  # an unclosed or stray tag: malformed
        return None
    if not tools.parallel:
        calls = calls[:1]
    return (content or None), calls


def _closed(parameters: dict | None) -> dict:
    """A function's parameters schema for a forced call: no parameters is an empty object (OpenAI's
    meaning), and arguments the schema does not declare are not invented (as OpenAI's strict mode)."""
    schema = dict(parameters or {"type": "object", "properties": {}})
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def forcing_grammar(tools: ToolSpec) -> str:
    """A Lark grammar (llguidance's, with inline %json schemas) for answers made of tool calls only:
    one call to the named function, or one or more (one when parallel is off) to any of them."""
    fns = [f for f in tools.functions if tools.name is None or f["name"] == tools.name]
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": _closed(f.get("parameters")),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in fns
        ],
        "x-guidance": {"whitespace_flexible": False},  # compact: no room to pad until the length limit
    }
    more = ' ("\\n" call)*' if tools.parallel and tools.name is None else ""
    return f'start: call{more}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'
