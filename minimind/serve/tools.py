"""Tool calling, rendered in the prompt and parsed from the reply (Qwen/Hermes style).

Our chat template knows only `role` and `content`, so the server turns an OpenAI conversation with
tools into plain ChatML messages before the template sees it:

- `tools` become a `# Tools` section at the end of the system message (one is created when there
  is none), listing each function as one JSON line inside `<tools></tools>`, and telling the model
  to answer `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- an assistant message's `tool_calls` are written back in that same form after its text;
- `tool` results become a user turn of `<tool_response>...</tool_response>` blocks (consecutive
  results share one turn), which keeps turns alternating as SFT data expects.

A model fine-tuned on conversations rendered this way (tests/test_serve.py does so) answers with
tool calls the server can parse. Nothing the model writes is ever executed by the server.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from minimind.serve.protocol import APIError, Message, ToolDef

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call functions to answer. Their signatures, one JSON object per line, are inside <tools></tools>:\n"
)
TOOLS_FOOTER = (
    "To call a function, reply with its name and arguments as a JSON object inside <tool_call></tool_call>:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
)


def tools_section(tools: list[ToolDef]) -> str:
    lines = [json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools]
    return TOOLS_HEADER + "<tools>\n" + "\n".join(lines) + "\n</tools>\n\n" + TOOLS_FOOTER


def _text(m: Message, i: int) -> str:
    """A message's content as one string (text parts joined; other parts refused)."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise APIError(
                400, f"messages[{i}].content[{j}]: only text parts are supported, not {part.type!r}", "messages"
            )
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(args: str | dict[str, Any], where: str) -> Any:
    if isinstance(args, dict):
        return args
    try:
        return json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
        raise APIError(400, f"{where}.function.arguments is not valid JSON", "messages") from None


def render_call(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def to_chatml(messages: list[Message], tools: list[ToolDef] | None = None) -> list[dict[str, str]]:
    """OpenAI messages (+ tools) as [{"role": system|user|assistant, "content": str}] for the template."""
    if not messages:
        raise APIError(400, "messages must contain at least one message", "messages")
    out: list[dict[str, str]] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        text = _text(m, i)
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text})
        elif m.role == "user":
            out.append({"role": "user", "content": text})
        elif m.role == "assistant":
            calls = []
            for j, c in enumerate(m.tool_calls or []):
                calls.append(
                    render_call(c.function.name, _arguments(c.function.arguments, f"messages[{i}].tool_calls[{j}]"))
                )
                if c.id:
                    call_ids.add(c.id)
            out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + calls)})
        else:  # tool
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs 'tool_call_id'", f"messages.{i}.tool_call_id")
            if m.tool_call_id not in call_ids:
                raise APIError(
                    400,
                    f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no earlier assistant tool call",
                    f"messages.{i}.tool_call_id",
                )
            block = f"<tool_response>\n{text}\n</tool_response>"
            if i and messages[i - 1].role == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
    if tools:
        section = tools_section(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(text outside the calls, OpenAI tool_calls) from a reply that starts a `<tool_call>` somewhere.

    A call left unclosed at the end (a length cut, or the model stopped) still counts when its JSON
    is whole. If any block is not `{"name": str, "arguments": object}` JSON, nothing is parsed and
    the whole text stays content (the client sees what the model wrote).
    """
    calls, rest, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string already
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return text, []
        if not isinstance(args, dict):
            return text, []
        rest.append(text[last : match.start()])
        last = match.end()
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    rest.append(text[last:])
    return "".join(rest), calls
