"""One choice's generated tokens -> the text pieces the client sees, incrementally.

    token -> StreamDecoder -> stop strings -> <think> split -> <tool_call> hold -> trimmed pieces

The same object serves streaming and non-streaming responses (the latter just keeps the sum), so
the text assembled from a stream equals the non-streamed text by construction. Each stage holds
back only a tail that could still become a stop string or a tag.
"""

from __future__ import annotations

from typing import Any

from minimind.chatformat import ThinkFilter, tag_prefix
from minimind.serve.tools import TOOL_CALL_OPEN, openai_tool_calls
from minimind.tokenizer import StreamDecoder, Tokenizer


class StopStrings:
    """Cuts the text before the first stop string; holds back a tail that could begin one.

    >>> s = StopStrings(["\\n\\n"])
    >>> s.push("a\\n"), s.push("\\nb")
    (('a', False), ('', True))
    """

    def __init__(self, stops: list[str]):
        self.stops, self.buffer = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to pass on, whether a stop string was reached)."""
        self.buffer += text
        hits = [at for s in self.stops if (at := self.buffer.find(s)) >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = max((tag_prefix(self.buffer, s) for s in self.stops), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Trim:
    """Drops whitespace at the start and end of one part (the model writes `<think>\\n...\\n</think>\\n\\n`)."""

    def __init__(self) -> None:
        self.started, self.pending = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out, self.pending = self.pending + body, text[len(body) :]
        return out


class ChoiceText:
    """Pieces ("reasoning" | "content", text) of one choice, plus tool calls at the end.

    chat: split `<think>` blocks into reasoning (`in_think` when the prompt opened one);
    tools: hold everything from `<tool_call>` on and parse it when the choice ends.
    """

    def __init__(
        self, tokenizer: Tokenizer, stops: list[str], chat: bool = True, in_think: bool = False, tools: bool = False
    ):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.stop_ids = set(tokenizer.stop_ids)
        self.stops = StopStrings(stops) if stops else None
        self.think = ThinkFilter(in_think) if chat else None
        self.tools, self.held, self.tail = tools, None, ""  # held: text from <tool_call> on
        self.trim = {"reasoning": Trim(), "content": Trim()} if chat else None
        self.text = {"reasoning": "", "content": ""}
        self.tool_calls: list[dict[str, Any]] = []
        self.stopped = False  # a stop string was reached

    def push(self, token: int) -> tuple[list[tuple[str, str]], bool]:
        """(new pieces, whether generation of this choice should end here)."""
        if self.stopped or token in self.stop_ids:
            return [], False
        text = self.decoder.push(token)
        if self.stops is not None:
            text, self.stopped = self.stops.push(text)
        return self._route(text), self.stopped

    def finish(self) -> list[tuple[str, str]]:
        """The held-back rest, once the choice has ended; sets `tool_calls` when the reply made any."""
        text = "" if self.stopped else self.decoder.flush()
        if self.stops is not None and not self.stopped:
            text, _ = self.stops.push(text)
            text += self.stops.flush()
        pieces = self._route(text, final=True)
        if self.held is not None:
            content, self.tool_calls = openai_tool_calls(self.held)
            pieces += self._emit("content", content)
        return pieces  # whitespace still held by Trim is the parts' trailing whitespace: dropped

    # ---- stages --------------------------------------------------------------------------------

    def _route(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        if self.think is None:
            return self._emit("content", text)
        split = self.think.push(text) + (self.think.flush() if final else [])
        pieces: list[tuple[str, str]] = []
        for kind, piece in split:
            if kind == "think":
                pieces += self._emit("reasoning", piece)
            else:
                pieces += self._emit("content", self._hold_tools(piece))
        if final and self.tail:
            pieces += self._emit("content", self.tail)
            self.tail = ""
        return pieces

    def _hold_tools(self, text: str) -> str:
        """Content up to a `<tool_call>`; from there on it is kept in `held` for parsing."""
        if not self.tools:
            return text
        if self.held is not None:
            self.held += text
            return ""
        text, self.tail = self.tail + text, ""
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.held = text[at:]
            return text[:at]
        hold = tag_prefix(text, TOOL_CALL_OPEN)
        self.tail = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _emit(self, kind: str, text: str) -> list[tuple[str, str]]:
        if self.trim is not None:
            text = self.trim[kind].push(text)
        if not text:
            return []
        self.text[kind] += text
        return [(kind, text)]
