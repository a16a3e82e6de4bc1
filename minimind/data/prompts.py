"""Prompts for the RL stages (PPO, GRPO, SPO): SFT-format conversations whose final reply is left out.

One JSON object per line, upstream's RLAIF format plus an optional reference answer:

    {"conversations": [{"role": "user", "content": "What is 2 + 3?"},
                       {"role": "assistant", "content": "无"}],
     "answer": "5"}

The final assistant turn is a placeholder and is dropped whatever it holds (upstream writes "无",
other copies "空", some nothing at all); a conversation that already ends with a user turn is a
prompt as it is. An optional system message may come first, and earlier assistant turns of a
multi-turn prompt are kept: the policy writes the next reply. `answer` (a string or a number, kept
as a string) is what rule rewards such as `rule:math` check the reply against. Every other check is
SFT's (minimind/data/messages.py): known roles, alternating turns, no control tokens in the text;
tools on the system message and tool calls/results in earlier turns are read as SFT reads them.

Agentic RL (`minimind agent`, upstream's agent_rl.jsonl) adds the tools on the system message and
`gt`, a list of values the final answer must contain (numbers compare as numbers):

    {"conversations": [{"role": "system", "content": "", "tools": "[...]"},
                       {"role": "user", "content": "What is 17 * 23?"}, {"role": "assistant", "content": ""}],
     "gt": ["391"]}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.data.messages import parse_conversation
from minimind.data.readers import iter_jsonl
from minimind.errors import ConfigError, DataError
from minimind.tokenizer import BOS, Tokenizer


@dataclass
class Prompt:
    """A conversation that ends with a user turn, waiting for the policy's reply."""

    messages: list[dict]  # [{"role", "content"}], validated, ending with the user turn
    answer: str | None  # reference answer for rule rewards, or None
    where: str  # FILE:LINE, for errors about this prompt
    tools: list[dict] | None = None  # the tools offered (their section is already in `messages`)
    gt: list[str] | None = None  # values the final answer must contain (agentic RL)

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or ()}


class Prompts(list[Prompt]):
    """The prompts of some files (a list of `Prompt`), with the bad lines skipped on the way."""

    def __init__(self, prompts: list[Prompt], skipped: list[str]):
        super().__init__(prompts)
        self.skipped = skipped

    def report(self) -> str:
        with_answer = sum(p.answer is not None for p in self)
        text = f"{len(self):,} prompts ({with_answer:,} with a reference answer)"
        return text + (f", {len(self.skipped):,} bad lines skipped" if self.skipped else "")


def check_prompt(obj: dict[str, Any], where: str) -> Prompt:
    """The prompt of one JSONL record, or DataError naming `where`."""
    if "conversations" not in obj:
        raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
    messages = obj["conversations"]
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the placeholder for the reply to generate
            if not messages:
                raise DataError(f"{where}: 'conversations' holds only the assistant placeholder, no prompt")
    conversation = parse_conversation(messages, where, final="user")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise DataError(f"{where}: 'answer' must be a string or a number, got {answer!r}")
    if answer is not None:
        answer = str(answer).strip()
        if not answer:
            raise DataError(f"{where}: 'answer' is empty (leave the key out for prompts without one)")
    gt = obj.get("gt")
    if gt is not None:
        gt = [gt] if isinstance(gt, (str, int, float)) and not isinstance(gt, bool) else gt
        if not isinstance(gt, list) or any(isinstance(g, bool) or not isinstance(g, (str, int, float)) for g in gt):
            raise DataError(f"{where}: 'gt' must be a list of strings or numbers, got {obj['gt']!r}")
        gt = [str(g).strip() for g in gt if str(g).strip()]
    return Prompt(conversation.chatml(), answer, where, conversation.tools, gt)


def read_prompts(paths: list[str | Path], skip_bad_lines: bool = False) -> Prompts:
    """Every prompt of the files, in order. A malformed line is a DataError `FILE:LINE: reason`, or
    with `skip_bad_lines` is left out and its message kept in `.skipped`."""
    skipped: list[str] = []
    out = []
    for path in paths:
        count = 0
        for lineno, obj in iter_jsonl(path, skipped if skip_bad_lines else None):
            try:
                out.append(check_prompt(obj, f"{path}:{lineno}"))
            except DataError as e:
                if not skip_bad_lines:
                    raise
                skipped.append(str(e))
                continue
            count += 1
        if not count:
            raise DataError(f"{path}: no usable prompts")
    return Prompts(out, skipped)


def render_prompt(
    tokenizer: Tokenizer, prompt: Prompt | list[dict] | str, think: bool | None = None, chat: bool = True
) -> str:
    """The prompt as the model reads it. Chat: the messages (of a `Prompt`, a list, or a string as one
    user turn) in the chat template with the assistant header opened; think=True opens a `<think>`
    block (the model reasons first), False inserts an empty one (it answers directly), None leaves it to
    the template (ours: nothing; upstream's: an empty block). Not chat: the text as it is."""
    if not chat:
        if not isinstance(prompt, str):
            raise ConfigError("a plain prompt is text, not messages (score it with chat=True)")
        return prompt
    messages = prompt.messages if isinstance(prompt, Prompt) else prompt
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    return tokenizer.render_chat(messages, add_generation_prompt=True, enable_thinking=think)


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt | list[dict] | str, think: bool | None = None, chat: bool = True
) -> list[int]:
    """The ids the model continues (`render_prompt`); a plain prompt starts with BOS, as every
    pretraining document does."""
    ids = tokenizer.encode(render_prompt(tokenizer, prompt, think, chat))
    return ids if chat else [tokenizer.bos_id] + ids


def reply_prefix(tokenizer: Tokenizer, think: bool | None = None) -> str:
    """The text of the reply that the generation prompt already wrote after `<|im_start|>assistant\\n`:
    "" or "<think>\\n" or "<think>\\n\\n</think>\\n\\n" with our template. Rewards judge whole replies,
    so the RL stages put this in front of each decoded completion before scoring it.
    """
    text = tokenizer.render_chat([{"role": "user", "content": "?"}], add_generation_prompt=True, enable_thinking=think)
    return text.rpartition(f"{BOS}assistant\n")[2]
