"""Rewards for the RL stages: rules, reward models, and weighted sums of them (`--reward SPEC`).

    --reward "rule:math + 0.2*rule:format"      --reward "0.5*rm:runs/rm + rule:length"

A spec is a sum of terms `[W*]KIND:ARG[@KEY=VALUE,...]` joined by `+` or `-` (W a float, default 1):

    rule:math          1 if the reply's final number equals the prompt's `answer`, else 0
    rule:format        think/answer structure, 0..1 (0.5 for the exact shape, 0.125 per tag used once)
    rule:length        -0.5 for a reply outside [min, max] characters, -0.5 for reasoning outside
                       [think_min, think_max] (upstream's windows 20..800 and 20..300): -1..0
    rule:repetition    -min(1, 2 * share of repeated n-grams) (n=3): -1..0
    tool:answer        share of the prompt's `gt` values that the episode's final answer gives, 0..1
    tool:calls         share of the episode's tool calls that are valid (well-formed, closed, a tool the
                       prompt offers, arguments fitting its schema); 0 without calls
    tool:format        -0.5 for each turn whose <tool_call> or <think> tags do not close: -1..0
    tool:finished      -1 for an episode left without a final answer (out of turns or tokens), else 0
    rm:RUN_DIR         our reward model (`minimind reward`), optional @clip=C
    hf:PATH            a local Hugging Face sequence-classification reward model, clipped to ±10 (@clip=C)

    total = sum_i w_i * r_i        parts = {term: r_i}  (unweighted, for logging)

What a reward sees: the *whole reply* as text, decoded with `skip_special_tokens=True` (the ChatML
ids `<|im_end|>`, `<|endoftext|>` are gone; `<think> </think> <answer> </answer>` are not special in
our tokenizer, so they stay, and upstream's tokenizer spells them out in plain text anyway), with
what the generation prompt already opened in front (`reply_prefix`, e.g. `<think>\\n` with --think).
Rules read the tags; reward models judge what a user is shown, the reply with its reasoning removed
(`minimind.chatformat.split_think`), as upstream scores only the text after `</think>`.

`tool:` terms read a whole multi-turn episode of `minimind agent` (minimind/rl/episodes.py); on a
plain reply they see one turn. `rule:` and model terms see an episode's final reply.

Scores are per completion. `prompts` holds one prompt per completion, or one per group of k
consecutive completions (GRPO's G samples of each prompt). Reward models load on first use, once
per process and device, on the device the reward is bound to: `parse_reward(spec, device)` or
`reward.to(device)` (the RL stages bind the trainer's device; the default is the CPU).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minimind.chatformat import follows_format, split_think
from minimind.data.evalsets import ANSWER_TAG, extract_number, same_number
from minimind.data.prompts import Prompt
from minimind.errors import ConfigError, DataError
from minimind.rl.episodes import answer_share, as_episode, valid_call

TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# ---- rules: small pure functions of one reply ---------------------------------------------------


def final_answer(reply: str) -> str | None:
    """The number a reply gives as its answer: the last one inside its last `<answer>…</answer>`
    (no number there: None), else as `extract_number` finds it (`#### N`, else the last number).

    >>> final_answer("<think>7 - 2 = 5, plus 3 is 8</think><answer>8</answer> (checked 9 times)")
    '8'
    >>> final_answer("答案是 -1,250。"), final_answer("<answer>eight</answer> 8")
    ('-1250', None)
    """
    blocks = ANSWER_TAG.findall(reply)
    return extract_number(blocks[-1]) if blocks else extract_number(reply)


def math_reward(reply: str, answer: str) -> float:
    """1.0 when the reply's final answer equals the reference as a number ("72.0" == "72"), else 0.0.

    >>> math_reward("3 + 4 = 7, so the answer is 7.", "7"), math_reward("<answer>6</answer> 7", "7")
    (1.0, 0.0)
    """
    return float(same_number(final_answer(reply), extract_number(answer)))


def close_reward(reply: str, answer: str, scale: float = 10.0) -> float:
    """Partial credit for arithmetic: 1 - |final answer - reference| / scale, at least 0 (0 without a
    number). Near misses earn something, so most groups of samples differ and carry a signal.

    >>> close_reward("12 + 30 = 42.", "42"), close_reward("12 + 30 = 45.", "42"), close_reward("no idea", "42")
    (1.0, 0.7, 0.0)
    """
    got, want = final_answer(reply), extract_number(answer)
    if got is None or want is None:
        return 0.0
    return max(0.0, 1.0 - abs(float(got) - float(want)) / scale)


def format_reward(reply: str) -> float:
    """0.5 when the reply is exactly `<think>…</think><answer>…</answer>` (both non-empty, see
    `minimind.chatformat.follows_format`), plus 0.125 for each of the four tags that occurs exactly once:
    partial credit, so that a model far from the format still sees which way is up (upstream's
    format + "mark" rewards, scaled to 0..1).

    >>> format_reward("<think>\\n2 + 2 = 4\\n</think>\\n<answer>\\n4\\n</answer>")
    1.0
    >>> format_reward("<think>\\nhm\\n</think>\\n4"), format_reward("4")
    (0.25, 0.0)
    """
    return 0.5 * follows_format(reply) + 0.125 * sum(reply.count(t) == 1 for t in TAGS)


def length_penalty(reply: str, min: int = 20, max: int = 800, think_min: int = 20, think_max: int = 300) -> float:
    """-0.5 when the reply (stripped, in characters: a Chinese character counts one) is shorter than
    `min` or longer than `max`; another -0.5 when it has a think block whose reasoning is outside
    [think_min, think_max]. Upstream's length rewards (±0.5 and +1/-0.5), as a penalty in -1..0.

    >>> length_penalty("The answer is 42, since 6 * 7 = 42."), length_penalty("42")
    (0.0, -0.5)
    >>> length_penalty("<think>\\nok\\n</think>\\n" + "x" * 900)
    -1.0
    """
    text = reply.strip()
    penalty = -0.5 if not min <= len(text) <= max else 0.0
    if "<think>" in text or "</think>" in text:
        thinking, _ = split_think(text)
        penalty -= 0.5 if not think_min <= len(thinking) <= think_max else 0.0
    return penalty


WORDS = re.compile(r"[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")  # latin words and numbers; any other character alone


def repetition_penalty(reply: str, n: int = 3) -> float:
    """-min(1, 2 * repeated share) over the reply's word n-grams, where the repeated share is
    1 - distinct / all; a Chinese character, a punctuation mark or a tag's `<` is a word of its own.
    Half of all n-grams repeated already costs the full -1; upstream's `rep_penalty` is this / 2.

    >>> repetition_penalty("The cat sat on the mat."), repetition_penalty("好的好的好的好的")
    (0.0, -1.0)
    """
    words = WORDS.findall(reply.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 - min(1.0, 2 * (1 - len(set(grams)) / len(grams))) if grams else 0.0


# ---- reward models ------------------------------------------------------------------------------


def visible_conversation(prompt: Prompt, reply: str) -> list[dict]:
    """The prompt with the reply, reasoning removed, as its final assistant turn."""
    return prompt.messages + [{"role": "assistant", "content": split_think(reply)[1]}]


@functools.cache
def load_rm(run_dir: str, device: str):  # once per process and device
    from minimind.reward_model import load_reward_model

    return load_reward_model(run_dir, device)


@functools.cache
def load_hf(path: str, device: str):
    """(model, tokenizer) of a local sequence-classification model: offline, eval, fp32 on CPU and
    bf16 on a GPU; the padding id is the model's, else the tokenizer's, else none (batches of one)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"hf:{path}: cannot load a sequence-classification model with one label ({e})") from None
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def hf_text(tok, messages: list[dict]) -> tuple[str, bool]:
    """(text, add_special_tokens): the tokenizer's own chat template when it has one, else plain
    "role: content" lines, tokenized with the tokenizer's BOS/EOS as for any plain text."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False), False
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages), True


@torch.no_grad()
def hf_scores(model, tok, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The model's score of each conversation, in right-padded batches; a conversation longer than
    the model's positions keeps its last tokens."""
    limit = getattr(model.config, "max_position_embeddings", None) or tok.model_max_length
    seqs = []
    for messages in conversations:
        text, special = hf_text(tok, messages)
        seqs.append(tok(text, add_special_tokens=special)["input_ids"][-limit:])
    pad = model.config.pad_token_id
    size = batch_size if pad is not None else 1
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(seqs), size):
        chunk = seqs[start : start + size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += logits[:, 0].float().tolist()
    return out


# ---- the composite ------------------------------------------------------------------------------

Component = Callable[[list[Prompt], list[str]], list[float]]  # (one prompt per reply, replies) -> scores


def per_reply(fn: Callable[..., float], **options: float) -> Component:
    return lambda prompts, replies: [fn(r, **options) for r in replies]


def math_component(prompts: list[Prompt], replies: list[str]) -> list[float]:
    return [math_reward(r, p.answer) for p, r in zip(prompts, replies)]  # type: ignore[arg-type]


def close_component(scale: float) -> Component:
    return lambda prompts, replies: [close_reward(r, p.answer, scale) for p, r in zip(prompts, replies)]  # type: ignore[arg-type]


def check_math_prompts(prompts: Sequence[Prompt]) -> None:
    """rule:math needs a reference answer with a number in every prompt."""
    for p in prompts:
        if p.answer is None:
            raise ConfigError(f"{p.where}: rule:math needs a reference answer, this prompt has no 'answer'")
        if extract_number(p.answer) is None:
            raise DataError(f"{p.where}: rule:math needs a numeric answer, got {p.answer!r}")


@dataclass
class ModelComponent:
    """A reward model's score of each reply (clipped to ±clip), loaded on `device` at the first call."""

    load: Callable  # (path, device) -> (model, tokenizer), cached per process and device
    scores: Callable  # (model, tokenizer, conversations) -> scores
    path: str
    device: str
    clip: float | None

    def model(self) -> tuple:
        return self.load(self.path, self.device)

    def __call__(self, prompts: list[Prompt], replies: list[str]) -> list[float]:
        model, tok = self.model()
        values = self.scores(model, tok, [visible_conversation(p, r) for p, r in zip(prompts, replies)])
        clip = self.clip
        return [min(max(v, -clip), clip) for v in values] if clip is not None else values


# rule name -> (its options with their defaults, the component made from the options given)
RULES: dict[str, tuple[dict[str, float], Callable[[dict], Component]]] = {
    "math": ({}, lambda o: math_component),
    "close": (dict(scale=10.0), lambda o: close_component(o["scale"])),
    "format": ({}, lambda o: per_reply(format_reward)),
    "length": (dict(min=20, max=800, think_min=20, think_max=300), lambda o: per_reply(length_penalty, **o)),
    "repetition": (dict(n=3), lambda o: per_reply(repetition_penalty, n=int(o["n"]))),
}
MODEL_OPTIONS = {"rm": {"clip": None}, "hf": {"clip": 10.0}}


def unclosed_turns(reply: str) -> float:
    """-0.5 for each turn whose `<tool_call>` or `<think>` tags are unbalanced, at least -1.

    >>> unclosed_turns("<tool_call>{}</tool_call>"), unclosed_turns("<think>hm <tool_call>{")
    (0.0, -0.5)
    """
    bad = sum(any(turn.count(a) != turn.count(b) for a, b in TAG_PAIRS) for turn in as_episode(reply).turns)
    return max(-1.0, -0.5 * bad) + 0.0  # + 0.0: no -0.0


TAG_PAIRS = (("<tool_call>", "</tool_call>"), ("<think>", "</think>"))


def per_episode(fn: Callable[[Prompt, str], float]) -> Component:
    return lambda prompts, replies: [fn(p, r) for p, r in zip(prompts, replies)]


TOOL_RULES: dict[str, Component] = {
    "answer": per_episode(lambda p, r: answer_share(as_episode(r), p.gt or [])),
    "calls": per_episode(
        lambda p, r: sum(valid_call(c, p) for c in as_episode(r).calls) / max(len(as_episode(r).calls), 1)
    ),
    "format": per_reply(unclosed_turns),
    "finished": per_reply(lambda r: -1.0 if as_episode(r).unfinished else 0.0),
}


@dataclass
class Rewards:
    """Rewards of a batch of replies: the weighted sum, and each term's own (unweighted) values."""

    total: torch.Tensor  # (N,) float32
    parts: dict[str, torch.Tensor]  # term (as written in the spec) -> (N,) float32


@dataclass
class Term:
    name: str  # e.g. "rule:length@max=400"
    weight: float
    component: Component


class RewardFn:
    """A parsed `--reward` spec: call it with prompts and replies; `check` prompts before training."""

    def __init__(self, terms: list[Term], spec: str):
        self.terms, self.spec = terms, spec

    def to(self, device: str | torch.device) -> RewardFn:
        """Score with the reward models on `device` (the trainer's); rules run on the host either way."""
        for t in self.terms:
            if isinstance(t.component, ModelComponent):
                t.component.device = str(device)
        return self

    def check(self, prompts: Sequence[Prompt]) -> None:
        """Raise now, not at step 500, when the prompts lack what a term needs (rule:math: answers)."""
        if any(t.name.split("@")[0] in ("rule:math", "rule:close") for t in self.terms):
            check_math_prompts(prompts)
        if any(t.name == "tool:answer" for t in self.terms):
            for p in prompts:
                if not p.gt:
                    raise ConfigError(f"{p.where}: tool:answer needs the expected values, this prompt has no 'gt'")

    def __call__(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> Rewards:
        if not prompts or len(replies) % len(prompts):
            raise ValueError(f"{len(replies)} replies for {len(prompts)} prompts: need k replies per prompt")
        k = len(replies) // len(prompts)
        each = [p for p in prompts for _ in range(k)]
        self.check(prompts)
        parts = {t.name: torch.tensor(t.component(each, list(replies)), dtype=torch.float32) for t in self.terms}
        total = torch.zeros(len(replies), dtype=torch.float32)
        for t in self.terms:
            total += t.weight * parts[t.name]
        return Rewards(total, parts)

    def __repr__(self) -> str:
        return " + ".join(f"{t.weight:g}*{t.name}" for t in self.terms).replace("+ -", "- ")


NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# A term: sign, weight, then its body up to a `+`/`-` that starts another term (a weight and `*`, or
# `kind:`), so that `rm:runs/rm-v2` and `hf:Llama-3.1-8B` keep their dashes.
TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>{NUMBER})\s*\*)?\s*(?P<body>.*?)"
    rf"\s*(?=[+-]\s*(?:{NUMBER}\s*\*|[A-Za-z]\w*:|[+-]|$)|$)"
)
OPTIONS = re.compile(r"@(\w+=[^,@]*(?:,\w+=[^,@]*)*)$")


def parse_options(arg: str, allowed: dict[str, float | None], body: str) -> tuple[str, dict]:
    """(arg without its `@k=v,...` tail, allowed options with the given ones as floats)."""
    m = OPTIONS.search(arg)
    options = dict(allowed)
    if not m:
        return arg, options
    for item in m.group(1).split(","):
        key, _, value = item.partition("=")
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ConfigError(f"--reward: {body!r} has an unknown option {key!r} (options: {known})")
        try:
            options[key] = float(value)
        except ValueError:
            raise ConfigError(f"--reward: option {key}={value!r} of {body!r} is not a number") from None
    return arg[: m.start()], options


def parse_term(body: str, device: str) -> Component:
    kind, colon, arg = body.partition(":")
    if "*" in body:
        raise ConfigError(f"--reward: bad weight in {body!r} (write W*KIND:ARG with W a number, e.g. 0.5*rule:format)")
    if re.match(rf"{NUMBER}\s+[A-Za-z]\w*:", body):
        raise ConfigError(f"--reward: weight without '*' in {body!r} (write W*KIND:ARG, e.g. 0.5*rule:format)")
    if re.search(r"\s[A-Za-z]\w*:", body):
        raise ConfigError(f"--reward: {body!r} holds two terms: join them with + or -")
    if not colon or kind not in ("rule", "tool", "rm", "hf"):
        raise ConfigError(f"--reward: unknown reward {body!r} (expected rule:NAME, tool:NAME, rm:RUN_DIR or hf:PATH)")
    if kind == "tool":
        if arg not in TOOL_RULES:
            raise ConfigError(f"--reward: unknown tool reward {arg!r} (tool rewards: {', '.join(TOOL_RULES)})")
        return TOOL_RULES[arg]
    if kind == "rule":
        rule = arg.split("@")[0]
        if rule not in RULES:
            raise ConfigError(f"--reward: unknown rule {rule!r} (rules: {', '.join(RULES)})")
        name, options = parse_options(arg, RULES[rule][0], body)
        if name != rule:
            raise ConfigError(f"--reward: bad options in {body!r} (write @KEY=VALUE,KEY=VALUE)")
        return RULES[rule][1](options)
    path, options = parse_options(arg, MODEL_OPTIONS[kind], body)
    if not path:
        raise ConfigError(f"--reward: {kind}: needs a path ({kind}:{'RUN_DIR' if kind == 'rm' else 'PATH'})")
    if not Path(path).is_dir():
        raise ConfigError(f"--reward: {kind}:{path}: no such directory")
    load, scores = (load_rm, rm_scores) if kind == "rm" else (load_hf, hf_scores)
    return ModelComponent(load, scores, str(Path(path).resolve()), str(device), options["clip"])


def rm_scores(model, tok, conversations: list[list[dict]]) -> list[float]:
    from minimind.reward_model import score

    return score(model, tok, conversations)


def parse_reward(spec: str, device: str | torch.device = "cpu") -> RewardFn:
    """The reward function of a `--reward` spec; ConfigError for a spec that cannot work. Reward
    models are checked to exist now and loaded on `device` at the first call."""
    if not spec or not spec.strip():
        raise ConfigError("--reward: empty spec (e.g. rule:math + 0.2*rule:format)")
    terms: dict[str, Term] = {}
    pos = 0
    while pos < len(spec):
        m = TERM.match(spec, pos)
        assert m is not None  # every part of the pattern is optional
        pos = m.end()
        body = m.group("body")
        if not body:
            raise ConfigError(f"--reward: missing term at column {m.start('body') + 1} of {spec!r}")
        if m.start() > 0 and not m.group("sign"):
            raise ConfigError(f"--reward: expected + or - before {body!r} in {spec!r}")
        weight = float(m.group("weight") or 1.0) * (-1.0 if m.group("sign") == "-" else 1.0)
        if body in terms:  # the same term twice: one term, weights added
            terms[body].weight += weight
        else:
            terms[body] = Term(body, weight, parse_term(body, str(device)))
    return RewardFn(list(terms.values()), spec)
