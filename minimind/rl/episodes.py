"""Multi-turn episodes with tools: the policy writes, its `<tool_call>`s run in the sandboxed toolbox,
the results come back as a tool turn, up to `max_turns` turns. Used by `minimind agent` (sampled,
for training), its held-out check and `minimind eval --task tools` (greedy).

All episodes of a batch advance turn by turn together through the one sampling engine: each turn is
one batched `generate` call over the episodes still running, continuing the batch's KV cache
(`generate.Continuation`): a turn prefills only what is new (the tool results and the next reply's
opening), never the conversation again; episodes that ended leave the batch. The tokens of an episode
are kept as ids, never re-tokenized: what the policy sampled is exactly what training scores, and
a tool turn's ids are laid out as SFT lays out a user turn (`minimind/data/chat.py`):

    ... <|im_end|> \\n <|im_start|>user\\n <tool_response>...</tool_response> <|im_end|> \\n
        <|im_start|>assistant\\n [prefix]

so only the policy's own tokens (its turns and their closing `<|im_end|>`) are trained.

An episode ends when a turn has no tool call (its final answer), when a turn stops otherwise than by
`<|im_end|>` (at `<|endoftext|>`, or cut at `max_new_tokens`), when the last allowed turn still calls
a tool, or when the next turn would not fit in the context. It is *unfinished* (no final answer) when
its last turn calls a tool, was cut at `max_new_tokens`, or never came (no room).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from minimind.chatformat import split_think
from minimind.data.prompts import Prompt, encode_prompt, reply_prefix
from minimind.generate import Continuation, SamplingParams, generate, row_key
from minimind.tokenizer import BOS, Tokenizer
from minimind.toolbox import Toolbox, check_arguments
from minimind.toolcalls import TOOL_CALL_CLOSE, Call, dumps, find_calls, tool_name, tool_turn


class Episode(str):
    """An episode, as text its final reply (what `rule:` and reward-model terms judge: the generation
    prompt's prefix + the last turn), with the whole of it in attributes (what `tool:` terms read)."""

    turns: list[str]  # each turn the policy wrote, decoded, prefix included
    calls: list[Call]  # every <tool_call> block of every turn, valid or not
    results: list[str]  # the tool results handed back, in order
    unfinished: bool  # no final answer: out of turns, tokens or context
    ids: list[int]  # everything after the prompt: the policy's turns and the tool turns
    trained: list[bool]  # per id: written by the policy
    logps: list[float]  # per id: log-prob under the sampling distribution (0 for tool-turn ids)

    @classmethod
    def of(cls, state: EpisodeState) -> Episode:
        e = cls(state.turns[-1] if state.turns else "")
        e.turns, e.calls, e.results, e.unfinished = state.turns, state.calls, state.results, state.unfinished
        e.ids, e.trained, e.logps = state.ids, state.trained, state.logps
        return e

    @classmethod
    def single(cls, reply: str) -> Episode:
        """A plain one-turn reply seen as an episode (tool terms on GRPO's replies)."""
        e = cls(reply)
        e.turns, e.calls, e.results, e.unfinished = [reply], find_calls(reply), [], False
        e.ids, e.trained, e.logps = [], [], []
        return e

    @property
    def answer(self) -> str:
        """The final answer a user sees: the last turn after its reasoning and calls ("" if unfinished)."""
        if self.unfinished:
            return ""
        text = split_think(self.turns[-1] if self.turns else str(self))[1]
        return text.rpartition(TOOL_CALL_CLOSE)[2].strip()


def as_episode(reply: str) -> Episode:
    return reply if isinstance(reply, Episode) else Episode.single(reply)


@dataclass(eq=False)
class EpisodeState:
    context: list[int]  # prompt + everything so far: what the next turn continues
    key: int = 0  # sampling key of the episode (its turns use key, turn)
    offered: set[str] | None = None  # the tools its prompt offers (None: any in the toolbox)
    turns: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    unfinished: bool = False
    done: bool = False


def tool_turn_ids(tok: Tokenizer, results: list[str], prefix: str) -> list[int]:
    """The ids after a turn's `<|im_end|>` that hand its results back and open the next reply."""
    newline = tok.encode("\n")
    return (
        newline
        + tok.encode(f"{BOS}user\n")
        + tok.encode(tool_turn(results))
        + [tok.eos_id]
        + newline
        + tok.encode(f"{BOS}assistant\n")
        + (tok.encode(prefix) if prefix else [])
    )


def run_tools(toolbox: Toolbox, calls: list[Call], offered: set[str] | None = None) -> list[str]:
    """Each call's result; a malformed call, or one of a tool not `offered` in the prompt, gets an
    error instead, so the model sees what went wrong."""
    out = []
    for c in calls:
        if c.error:
            out.append(dumps({"error": f"malformed tool call: {c.error}"}))
        elif offered is not None and c.name not in offered:
            out.append(dumps({"error": f"tool {c.name!r} is not offered here"}))
        else:
            out.append(toolbox.call(c.name, c.arguments))
    return out


def run_episodes(
    model: nn.Module,
    tok: Tokenizer,
    prompts: list[Prompt],
    toolbox: Toolbox,
    params: SamplingParams,
    max_turns: int,
    limit: int,
    think: bool | None = None,
    keys: list[int] | None = None,
    prompt_ids: list[list[int]] | None = None,
    batch_size: int = 64,
) -> list[Episode]:
    """One episode per prompt (repeat a prompt for several). `limit`: the most positions an episode may
    fill (the context, or the training rows); `keys`: one sampling key per episode (its turn t samples
    with row_key(key, t)), else `params.seed` or greedy. Batches of at most `batch_size` episodes."""
    prefix = reply_prefix(tok, think)
    ids = prompt_ids or [encode_prompt(tok, p, think) for p in prompts]
    states = [
        EpisodeState(list(x), keys[i] if keys else 0, p.tool_names or None)
        for i, (x, p) in enumerate(zip(ids, prompts))
    ]
    for start in range(0, len(states), batch_size):
        part = states[start : start + batch_size]
        continuation = Continuation()  # the part's KV cache, kept from turn to turn
        new_ids = [s.context for s in part]  # what each episode's next turn adds to it
        alive: list[int] = []  # the episodes the continuation holds, in its row order
        for turn in range(max_turns):
            for s in part:
                if not s.done and len(s.context) + params.max_new_tokens > limit:  # the next turn would not fit
                    s.done = s.unfinished = True
            rows = [i for i, s in enumerate(part) if not s.done]
            if not rows:
                break
            if alive:
                continuation.keep([alive.index(i) for i in rows])  # drop the episodes that ended
            alive = rows
            turn_keys = [row_key(part[i].key, turn) for i in rows] if keys else None
            out = generate(model, [new_ids[i] for i in rows], params, keys=turn_keys, continuation=continuation)
            for i, g in zip(rows, out.generations):
                s = part[i]
                s.ids += g.tokens
                s.trained += [True] * len(g.tokens)
                s.logps += g.logprobs
                s.context += g.tokens
                ended = bool(g.tokens) and g.tokens[-1] == tok.eos_id
                text = prefix + tok.decode(g.tokens, skip_special_tokens=True)
                s.turns.append(text)
                calls = find_calls(text)
                s.calls += calls
                if not calls or not ended or turn == max_turns - 1:
                    s.done = True
                    s.unfinished = bool(calls) or g.finish_reason == "length"
                    continue
                results = run_tools(toolbox, calls, s.offered)
                s.results += results
                more = tool_turn_ids(tok, results, prefix)
                s.ids += more
                s.trained += [False] * len(more)
                s.logps += [0.0] * len(more)
                s.context += more
                new_ids[i] = more
    return [Episode.of(s) for s in states]


# ---- what an episode did with its tools ---------------------------------------------------------

NUMBER = re.compile(r"(?<!\w)(?<!\d\.)[-+]?\d+(?:\.\d+)?(?!\w|\.\d)")  # whole numbers, not parts of 1.5 or x2


def contains_value(text: str, value: str) -> bool:
    """Whether `text` gives `value`: as a number when it is one (commas ignored, equal to 1e-6
    relative), else as a case-insensitive substring.

    >>> contains_value("17 * 23 = 391.", "391"), contains_value("It is 1,250.0 yuan", "1250")
    (True, True)
    >>> contains_value("Tokyo: 12°C", "12°c"), contains_value("3910", "391")
    (True, False)
    """
    v = value.strip().replace(",", "")
    if NUMBER.fullmatch(v):
        want = float(v)
        return any(abs(float(n) - want) <= 1e-6 * max(1.0, abs(want)) for n in NUMBER.findall(text.replace(",", "")))
    return bool(v) and v.lower() in text.lower()


def answer_share(episode: Episode, gt: list[str]) -> float:
    """Share of the expected values that the final answer gives (0 without a final answer or gt)."""
    answer = episode.answer
    return sum(contains_value(answer, g) for g in gt) / len(gt) if gt and answer else 0.0


def valid_call(call: Call, prompt: Prompt) -> bool:
    """Well-formed and closed, a tool the prompt offers, arguments that fit that tool's schema."""
    if call.error or not call.closed:
        return False
    tool = next((t for t in prompt.tools or () if tool_name(t) == call.name), None)
    return tool is not None and not check_arguments(tool["function"].get("parameters") or {}, call.arguments)


def tool_metrics(prompts: list[Prompt], episodes: list[Episode], expected: list[list[dict]] | None = None) -> dict:
    """Shares over episodes: `valid_calls` (of all calls: `valid_call`), `used_tools` (episodes that
    called a tool), `answered` (with a final answer), `correct` (every `gt` value in the final answer).
    With `expected` calls per prompt ([{"name", "arguments"}]): `right_tool` (the first call names the
    first expected tool) and `arguments` (the calls, names and arguments, are exactly the expected ones)."""
    n = len(episodes)
    calls = [(c, p) for p, e in zip(prompts, episodes) for c in e.calls]
    out = {
        "valid_calls": sum(valid_call(c, p) for c, p in calls) / len(calls) if calls else 0.0,
        "used_tools": sum(bool(e.calls) for e in episodes) / n,
        "answered": sum(not e.unfinished for e in episodes) / n,
        "correct": sum(bool(p.gt) and answer_share(e, p.gt) == 1.0 for p, e in zip(prompts, episodes)) / n,
    }
    if expected is not None:
        got = [[(c.name, c.arguments) for c in e.calls] for e in episodes]
        want = [[(x["name"], x["arguments"]) for x in calls] for calls in expected]
        out["right_tool"] = sum(bool(g) and bool(w) and g[0][0] == w[0][0] for g, w in zip(got, want)) / n
        out["arguments"] = sum(g == w for g, w in zip(got, want)) / n
    return out
