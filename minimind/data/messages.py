"""Conversations as data files hold them, checked: ChatML messages plus tools, tool calls, tool results
and reasoning, in every shape upstream's files (and OpenAI-style data) write them.

A message has `role` (system | user | assistant | tool) and `content`, and may carry:

- on the first (system) message, `tools`: a JSON string or a list of function definitions, with or
  without the `{"type": "function", "function": {...}}` wrapper;
- on an assistant message, `tool_calls`: a JSON string or a list of `{"name", "arguments"}` or
  `{"id", "type": "function", "function": {"name", "arguments"}}`, the arguments an object or a JSON
  string of one; its `content` may then be empty;
- on an assistant message, `reasoning_content`: its thinking (rendered in a `<think>` block);
- `role: "tool"` messages hold results; consecutive ones answer the calls of the assistant turn before.

Keys a message does not use may be present as `""` or null (some files fill all five on every
message). The checked conversation is in the rich form of minimind/toolcalls.py; `Conversation.chatml`
flattens it to the plain ChatML messages that SFT assembles and the chat template renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from minimind.errors import DataError
from minimind.tokenizer import BOS, EOS, PAD
from minimind.toolcalls import flatten

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # rich form: role, content, [reasoning_content], [tool_calls]
    tools: list[dict[str, Any]] | None  # [{"type": "function", "function": {"name", ...}}]

    def chatml(self) -> list[dict[str, str]]:
        return flatten(self.messages, self.tools)

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or ()}


def _json(value: Any, what: str, where: str) -> Any:
    """A value that may be written as a JSON string: parsed, or DataError."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {what} is not valid JSON ({e.msg} at column {e.colno})") from None


def check_tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """The tool list in OpenAI's wrapped form, or None when there is none."""
    if value in (None, "", []):
        return None
    tools = _json(value, "'tools'", where)
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' is a {type(tools).__name__}, not a list of function definitions")
    out = []
    for k, t in enumerate(tools, start=1):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(f"{where}: tool {k} has no function name")
        out.append({"type": "function", "function": fn})
    return out or None


def check_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as [{"name": str, "arguments": dict}] ([] when there are none)."""
    if value in (None, "", []):
        return []
    calls = _json(value, "'tool_calls'", where)
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list):
        raise DataError(f"{where}: 'tool_calls' is a {type(calls).__name__}, not a list of calls")
    out = []
    for k, c in enumerate(calls, start=1):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(f"{where}: tool call {k} has no name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = _json(args, f"the arguments of tool call {k} ({fn['name']})", where) if args.strip() else {}
        if not isinstance(args, dict):
            raise DataError(f"{where}: the arguments of tool call {k} ({fn['name']}) are not a JSON object")
        out.append({"name": fn["name"], "arguments": args})
    return out


def _unused(m: dict, keys: tuple[str, ...], where: str, role: str) -> None:
    for key in keys:
        if m.get(key) not in (None, "", []):
            raise DataError(f"{where}: a {role} message cannot carry '{key}'")


def parse_conversation(
    messages: Any, where: str, key: str = "conversations", final: str | None = "assistant"
) -> Conversation:
    """The checked conversation, or DataError naming `where`.

    Rules: a list of objects with a known role; an optional system message first (the only one that
    may carry tools), then a user turn; a user turn is answered by an assistant turn; an assistant turn
    with tool calls may be followed by as many tool results as it made calls, and those by an assistant
    turn; text must not hold the ChatML control tokens; the last turn is `final` ("assistant": an
    assistant reply; "user": a user turn or tool results, what the policy answers next; None: any).
    """
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{key}' is a {type(messages).__name__}, not a list of messages")
    if not messages:
        raise DataError(f"{where}: '{key}' is empty")
    out: list[dict[str, Any]] = []
    tools = None
    open_calls = 0  # calls of the latest assistant turn not yet answered by a tool message
    for i, m in enumerate(messages, start=1):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at} is a {type(m).__name__}, not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at} has role {role!r} (expected system, user, assistant, tool)")
        if role == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if content is None and role in ("assistant", "tool"):
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}) has no string 'content'")
        reasoning = m.get("reasoning_content")
        if reasoning not in (None, "") and not isinstance(reasoning, str):
            raise DataError(f"{at} (assistant) has a 'reasoning_content' that is not a string")
        for text in (content, reasoning or ""):
            control = next((t for t in (BOS, EOS, PAD) if t in text), None)
            if control:
                raise DataError(f"{at} ({role}) contains the control token {control} in its text")
        prev = out[-1]["role"] if out else None
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "system":
            if out:
                expected = "assistant" if prev == "user" else "user"
                raise DataError(f"{at} is system, expected {expected} (only the first message may be system)")
            _unused(m, ("tool_calls", "reasoning_content"), at, role)
            tools = check_tools(m.get("tools"), at)
            if not content.strip() and not tools:
                raise DataError(f"{at} (system) has empty content")
        elif role == "user":
            if prev not in (None, "system", "assistant"):
                raise DataError(f"{at} is user, expected assistant (turns must alternate)")
            _unused(m, ("tools", "tool_calls", "reasoning_content"), at, role)
            if not content.strip():
                raise DataError(f"{at} (user) has empty content")
            open_calls = 0
        elif role == "assistant":
            if prev not in ("user", "tool"):
                raise DataError(f"{at} is assistant, expected user (turns must alternate)")
            _unused(m, ("tools",), at, role)
            calls = check_calls(m.get("tool_calls"), at)
            if not content.strip() and not calls:
                raise DataError(f"{at} (assistant) has empty content and no tool calls")
            if reasoning:
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = calls
            open_calls = len(calls)
        else:  # tool
            if prev not in ("assistant", "tool") or open_calls == 0:
                why = "more results than calls" if prev == "tool" else "no tool call before it"
                raise DataError(f"{at} is a tool result with {why}")
            _unused(m, ("tools", "tool_calls", "reasoning_content"), at, role)
            open_calls -= 1
        out.append(msg)
    if out[-1]["role"] == "system":
        raise DataError(f"{where}: '{key}' has only a system message")
    last = out[-1]["role"]
    if final == "assistant" and last != "assistant":
        raise DataError(f"{where}: the conversation ends on a {last} turn; it must end with an assistant reply")
    if final == "user" and last == "assistant":
        raise DataError(f"{where}: the conversation ends on an assistant turn; a prompt ends with a user turn")
    return Conversation(out, tools)


def check_messages(
    messages: Any, where: str, key: str = "conversations", final: str | None = "assistant"
) -> list[dict[str, str]]:
    """The checked conversation as plain ChatML messages [{"role", "content"}] (see `parse_conversation`)."""
    return parse_conversation(messages, where, key, final).chatml()
