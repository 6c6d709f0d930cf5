"""Tool calling: tools into the prompt, the constraint that forces a call, tool calls parsed back out.

A chat template that knows tools (it reads ``tools``) gets them, the assistant's earlier calls and the
tool results in Hugging Face's message shape. Any other template gets quantchat's fallback: a system
message listing the tools as JSON Schemas and asking for calls written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the Hermes / Qwen format), earlier calls written the same way in the assistant's turn and tool results
as a user turn wrapped in ``<tool_response>``. Calls are parsed back from that format (or a bare
``{"name": ..., "arguments": ...}`` answer); ``tool_choice`` required or a named function constrains the
output to it (a Lark grammar whose calls are JSON objects under the tools' parameter schemas).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)

FALLBACK_SYSTEM = (
    "You can call functions (tools). The available tools, as JSON Schemas of their arguments:\n"
    "{tools}\n"
    "To call a tool, answer only with one block per call, in this form:\n"
    + OPEN + '\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n' + CLOSE + "\n"
    "The results come back in <tool_response> blocks; then answer the user."
)


def template_knows_tools(source: str) -> bool:
    """Whether a chat template renders ``tools`` (else quantchat's fallback format is used)."""
    return re.search(r"\btools\b", source) is not None


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object (OpenAI sends them as a JSON string)."""
    args = call.get("function", {}).get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
    return args


def call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    return f"{OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': _arguments(call)}, ensure_ascii=False)}\n{CLOSE}"


def prepare_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     template_source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and extra template context) to render for a chat with ``tools`` (None: no tools
    offered; earlier tool calls and results in the history are rendered all the same)."""
    if template_knows_tools(template_source):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                    "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):  # results of parallel calls: one turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        elif m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool", None)
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = FALLBACK_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of one call to any of ``tools``."""
    options = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # JSON as quantchat's other constraints write it (quantchat/sampling/constraints.py: JSON_OPTIONS)
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def forced_grammar(tools: list[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) for an answer made only of tool calls (one unless
    ``parallel``)."""
    more = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{more}\n"
            f'call: "{OPEN}\\n" obj "\\n{CLOSE}"\n'
            f"obj: %json {json.dumps(call_schema(tools))}\n")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(body: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(the text outside calls, or None when nothing is left; the calls) from a model's answer. Blocks
    that are not a JSON call to a known tool stay in the text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    if not calls:
        call = _call(text.strip(), names) if text.strip().startswith("{") else None
        if call is not None:
            return None, [call]
        return text, []
    rest = "".join(kept).strip()
    return rest or None, calls


class ToolStream:
    """Splits a streamed answer into plain text and finished tool calls: text that could start a
    ``<tool_call>`` block is held back until it is clearly not one."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buf = ""
        self.calls: list[ToolCall] = []
        self._after_call = False  # nothing but whitespace since the last call

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """(text to send now, calls completed by ``text``). Whitespace right after a call is dropped, as
        ``parse_tool_calls`` drops it."""
        self.buf += text
        out, calls = "", []
        while True:
            if self._after_call:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self._after_call = False
            start = self.buf.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self.buf, OPEN)
                out += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            end = self.buf.find(CLOSE, start)
            if end < 0:
                out += self.buf[:start]
                self.buf = self.buf[start:]
                break
            block = self.buf[start:end + len(CLOSE)]
            call = _call(block[len(OPEN):-len(CLOSE)].strip(), self.names)
            out += self.buf[:start] + (block if call is None else "")
            self.buf = self.buf[end + len(CLOSE):]
            if call is not None:
                calls.append(call)
                self._after_call = True
        self.calls += calls
        return out, calls

    def flush(self) -> str:
        """The held-back text at the end (an unfinished block is text)."""
        out, self.buf = self.buf, ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
