"""Tools, tool calls, tool results and thinking in a conversation: how they are written as ChatML
text (the one rendering that training, `chat`, `serve`, the HF template and GGUF share) and how a
reply's tool calls are read back. Hermes/Qwen style, as upstream MiniMind's minimind-3 writes them.

A conversation in its *rich* form has messages with role system | user | assistant | tool, where an
assistant message may carry `reasoning_content` (its thinking) and `tool_calls`
([{"name", "arguments": {...}}]), and a list of tools (function definitions in OpenAI's
`{"type": "function", "function": {...}}` form). `flatten` writes it as plain ChatML messages:

- the tools become a `# Tools` section at the end of the system message (one is made when there is
  none): one JSON line per tool inside `<tools></tools>`, and how to answer with a call;
- an assistant turn is `<think>\\n{reasoning}\\n</think>\\n\\n` (when it has reasoning, possibly empty)
  + its text + each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per
  line (a newline between the text and the first call only when there is text);
- consecutive tool results form one *user* turn of `<tool_response>\\n{result}\\n</tool_response>`
  blocks, one per line, so turns still alternate and a result is never trained on.

The Jinja chat template (minimind/tokenizer.py) renders the rich form to the same text, so
`apply_chat_template(messages, tools=...)` in transformers agrees with all of this (tested).
Nothing here executes anything: parsing a call only reads JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call functions to answer. Their signatures, one JSON object per line, are inside <tools></tools>:\n"
)
TOOLS_FOOTER = (
    "To call a function, reply with its name and arguments as a JSON object inside <tool_call></tool_call>:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
)


def dumps(value: Any) -> str:
    """JSON as the chat template's `tojson` writes it (transformers' and ours): `, ` and `: `, UTF-8 kept."""
    return json.dumps(value, ensure_ascii=False)


def tool_name(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def tools_section(tools: list[dict[str, Any]]) -> str:
    lines = [dumps(t) for t in tools]
    return TOOLS_HEADER + "<tools>\n" + "\n".join(lines) + "\n</tools>\n\n" + TOOLS_FOOTER


def render_call(name: str, arguments: dict[str, Any]) -> str:
    return f'{TOOL_CALL_OPEN}\n{{"name": {dumps(name)}, "arguments": {dumps(arguments)}}}\n{TOOL_CALL_CLOSE}'


def think_block(reasoning: str) -> str:
    """`<think>\\n...\\n</think>\\n\\n`; an empty reasoning gives what `enable_thinking=False` writes."""
    return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"


def assistant_text(content: str, reasoning: str | None = None, calls: list[dict[str, Any]] = ()) -> str:
    """The whole of an assistant turn's text: what SFT trains and the policy writes."""
    text = think_block(reasoning) + content.lstrip("\n") if reasoning is not None else content
    rendered = [render_call(c["name"], c["arguments"]) for c in calls]
    return text + ("\n" if content and rendered else "") + "\n".join(rendered)


def tool_turn(results: list[str]) -> str:
    """The user turn that hands tool results back to the model."""
    return "\n".join(f"{TOOL_RESPONSE_OPEN}\n{r}\n{TOOL_RESPONSE_CLOSE}" for r in results)


def flatten(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Rich messages (+ tools) as [{"role": system | user | assistant, "content": str}] for ChatML."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant":
            text = assistant_text(m.get("content") or "", m.get("reasoning_content"), m.get("tool_calls") or ())
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = tool_turn([m.get("content") or ""])
            if i and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    if tools:
        section = tools_section(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


# ---- reading calls back from a reply ------------------------------------------------------------

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


@dataclass
class Call:
    """One `<tool_call>` block of a reply: its name and arguments, or why it is not a valid call."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # "" for a well-formed call
    closed: bool = True  # False: the block ran to the end of the reply without `</tool_call>`
    span: tuple[int, int] = (0, 0)


def read_call(body: str) -> tuple[str, dict[str, Any], str]:
    """(name, arguments, error) of a call's JSON body; arguments may be an object or a JSON string of one."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return "", {}, "not valid JSON"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return "", {}, 'not {"name": ..., "arguments": {...}}'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return obj["name"], {}, "arguments are not valid JSON"
    if not isinstance(args, dict):
        return obj["name"], {}, "arguments are not a JSON object"
    return obj["name"], args, ""


def find_calls(text: str) -> list[Call]:
    """Every `<tool_call>` block of a reply, valid or not, in order.

    >>> reply = '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call><tool_call>{"name": 2}'
    >>> [(c.name, c.arguments, c.error, c.closed) for c in find_calls(reply)]
    [('f', {'x': 1}, '', True), ('', {}, 'not {"name": ..., "arguments": {...}}', False)]
    """
    calls = []
    for m in _CALL.finditer(text):
        name, args, error = read_call(m.group(1))
        calls.append(Call(name, args, error, bool(m.group(2)), m.span()))
    return calls


def parse_tool_calls(text: str) -> tuple[str, list[Call]]:
    """(text outside the calls, the calls) of a reply, all or nothing: if any block is not a valid
    call, no call is taken and the whole text stays content (a user sees what the model wrote). A
    call left unclosed at the end (a length cut) still counts when its JSON is whole."""
    calls = find_calls(text)
    if not calls or any(c.error for c in calls):
        return text, []
    rest, last = [], 0
    for c in calls:
        rest.append(text[last : c.span[0]])
        last = c.span[1]
    rest.append(text[last:])
    return "".join(rest), calls
