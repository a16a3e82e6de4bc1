"""Tool calling in the OpenAI API: a request's messages and tools become the rich conversation of
minimind/toolcalls.py (rendered by the one chat template), and a reply's `<tool_call>` blocks become
OpenAI `tool_calls`. Nothing the model writes is ever executed by the server.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from minimind.serve.protocol import APIError, Message, ToolDef
from minimind.toolcalls import TOOL_CALL_OPEN, dumps, flatten, parse_tool_calls

__all__ = ["TOOL_CALL_OPEN", "openai_tool_calls", "to_chatml"]


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


def _arguments(args: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"{where}.function.arguments is not valid JSON", "messages") from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}.function.arguments is not a JSON object", "messages")
    return args


def to_chatml(messages: list[Message], tools: list[ToolDef] | None = None) -> list[dict[str, str]]:
    """OpenAI messages (+ tools) as [{"role": system|user|assistant, "content": str}] for the template:
    checked here (arguments are JSON objects, a tool result answers an earlier call), then `flatten`ed."""
    if not messages:
        raise APIError(400, "messages must contain at least one message", "messages")
    rich: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        text = _text(m, i)
        if m.role == "assistant":
            calls = []
            for j, c in enumerate(m.tool_calls or []):
                where = f"messages[{i}].tool_calls[{j}]"
                calls.append({"name": c.function.name, "arguments": _arguments(c.function.arguments, where)})
                if c.id:
                    call_ids.add(c.id)
            rich.append({"role": "assistant", "content": text, "tool_calls": calls})
            if m.reasoning_content is not None:
                rich[-1]["reasoning_content"] = m.reasoning_content
        elif m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs 'tool_call_id'", f"messages.{i}.tool_call_id")
            if m.tool_call_id not in call_ids:
                raise APIError(
                    400,
                    f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no earlier assistant tool call",
                    f"messages.{i}.tool_call_id",
                )
            rich.append({"role": "tool", "content": text})
        else:
            rich.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return flatten(rich, [t.model_dump(exclude_none=True) for t in tools] if tools else None)


def openai_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(text outside the calls, OpenAI `tool_calls` with fresh ids) of a reply; no calls unless every
    `<tool_call>` block is a valid call (see `minimind.toolcalls.parse_tool_calls`)."""
    rest, calls = parse_tool_calls(text)
    return rest, [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": c.name, "arguments": dumps(c.arguments)},
        }
        for c in calls
    ]
