"""Reading a model's reply in the chat format: the `<think>…</think>` reasoning split from the answer
(also while it streams, a tag spread over several tokens included), and the reasoning format
`<think>…</think><answer>…</answer>` that `minimind reason` trains and `eval --task format` and the
RL format reward check. Used by chat, serve, eval and the rewards alike.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


class ThinkFilter:
    """Splits streamed text into ("think", text) and ("answer", text) pieces at the think tags.

    Pure and incremental: the tags are removed (a stray one too, such as `</think>` outside a
    block), and a tail that could be the start of a tag is held back until the next chunk decides
    it, so no partial tag is ever emitted.

    >>> f = ThinkFilter()
    >>> f.push("<th") + f.push("ink>hm</think>ok") + f.flush()
    [('think', 'hm'), ('answer', 'ok')]
    """

    def __init__(self, in_think: bool = False):
        self.in_think = in_think  # True when the prompt already opened the block
        self.buffer = ""

    @property
    def kind(self) -> str:
        return "think" if self.in_think else "answer"

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            found = [(at, tag) for tag in (THINK_OPEN, THINK_CLOSE) if (at := self.buffer.find(tag)) >= 0]
            if not found:
                break
            at, tag = min(found)
            if at:
                out.append((self.kind, self.buffer[:at]))
            self.buffer = self.buffer[at + len(tag) :]
            self.in_think = tag == THINK_OPEN  # a stray tag (</think> outside a block) is just dropped
        hold = max(tag_prefix(self.buffer, tag) for tag in (THINK_OPEN, THINK_CLOSE))
        ready, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        if ready:
            out.append((self.kind, ready))
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is still held back (the end of the text was not a tag after all)."""
        text, self.buffer = self.buffer, ""
        return [(self.kind, text)] if text else []


def split_think(text: str, in_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply, each stripped."""
    f = ThinkFilter(in_think)
    parts = {"think": "", "answer": ""}
    for kind, piece in f.push(text) + f.flush():
        parts[kind] += piece
    return parts["think"].strip(), parts["answer"].strip()


THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)


def follows_format(reply: str) -> bool:
    """Whether a reply is `<think>…</think>` then `<answer>…</answer>`, both non-empty, no stray tags.

    >>> follows_format("<think>\\n2 + 2 = 4\\n</think>\\n<answer>\\n4\\n</answer>")
    True
    >>> follows_format("<answer>4</answer>"), follows_format("<think> </think><answer>4</answer>")
    (False, False)
    """
    m = THINK_ANSWER.fullmatch(reply)
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return bool(m) and all(part.strip() and not any(t in part for t in tags) for part in m.groups())
