"""The built-in default corpus: generated on the spot, no download, learnable by a tiny model.

A small made-up world described in short English and Chinese sentences (who lives where, what
colour things are, what animals eat), plus arithmetic written out in words and digits. The facts
are fixed by the seed, so a model can actually learn them, and a held-out split uses the same
facts in sentences the model never saw, so learning can be measured. Sums are split by their pair of
numbers: a sum asked in a held-out file never appears in any training file (`held_out_sum`), so a
held-out score on arithmetic measures adding, not remembering.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAMES = ["Mia", "Leo", "Ada", "Tom", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Noah"]
ZH_NAMES = ["小明", "小红", "小刚", "小丽", "阿强", "小芳", "大伟", "小雪", "阿杰", "小云", "小兰", "阿亮"]
TOWNS = ["Oakvale", "Riverton", "Sunhill", "Pinewood", "Lakeside", "Stonebridge"]
ZH_TOWNS = ["橡树镇", "河湾城", "太阳山", "松林村", "湖畔镇", "石桥村"]
ANIMALS = [
    ("cat", "猫", "fish", "鱼"),
    ("dog", "狗", "meat", "肉"),
    ("rabbit", "兔子", "carrots", "胡萝卜"),
    ("horse", "马", "hay", "干草"),
    ("bird", "鸟", "seeds", "种子"),
    ("cow", "牛", "grass", "草"),
]
COLORS = [
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("white", "白色"),
    ("black", "黑色"),
]
THINGS = [("apple", "苹果"), ("sky", "天空"), ("leaf", "叶子"), ("sun", "太阳"), ("snow", "雪"), ("night", "夜晚")]
THING_COLOR = {"apple": 0, "sky": 1, "leaf": 2, "sun": 3, "snow": 4, "night": 5}
ASSISTANTS = ["Lumi", "Nova", "Pip", "Kiko"]  # so the words of an identity answer are not new to the model
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class World:
    """The fixed facts: where each person lives and which animal they keep."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.home = {i: rng.randrange(len(TOWNS)) for i in range(len(NAMES))}
        self.pet = {i: rng.randrange(len(ANIMALS)) for i in range(len(NAMES))}

    def sentences(self, rng: random.Random, held_out: bool = False) -> list[str]:
        """One short paragraph of true statements about the world, in English or Chinese."""
        out = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.randrange(6)
            i = rng.randrange(len(NAMES))
            animal = ANIMALS[self.pet[i]]
            if kind == 0:
                out.append(
                    rng.choice(
                        [f"{NAMES[i]} lives in {TOWNS[self.home[i]]}.", f"{ZH_NAMES[i]}住在{ZH_TOWNS[self.home[i]]}。"]
                    )
                )
            elif kind == 1:
                out.append(
                    rng.choice(
                        [
                            f"{NAMES[i]} has a {animal[0]}. The {animal[0]} eats {animal[2]}.",
                            f"{ZH_NAMES[i]}养了一只{animal[1]}。{animal[1]}吃{animal[3]}。",
                        ]
                    )
                )
            elif kind == 2:
                thing = rng.choice(THINGS)
                color = COLORS[THING_COLOR[thing[0]]]
                out.append(rng.choice([f"The {thing[0]} is {color[0]}.", f"{thing[1]}是{color[1]}的。"]))
            elif kind == 3:
                a, b = sum_pair(rng, (0, 5), (0, 5), held_out)
                out.append(
                    rng.choice(
                        [
                            f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                            f"{a} + {b} = {a + b}.",
                            f"{a}加{b}等于{a + b}。",
                        ]
                    )
                )
            elif kind == 4:
                a, b = sum_pair(rng, (10, 60), (1, 39), held_out)
                out.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a + b} - {b} = {a}."]))
            else:
                name = rng.choice(ASSISTANTS)
                out.append(
                    rng.choice(
                        [
                            f"{name} is a small assistant trained with MiniMind.",
                            f'"My name is {name}," said the assistant.',
                            f"{name}是一个用 MiniMind 训练的小助手。",
                            f"我的朋友叫{name}。",
                        ]
                    )
                )
        return [" ".join(out)]


def pretrain_texts(n: int, seed: int, held_out: bool = False) -> list[str]:
    world, rng = World(0), random.Random(seed)
    return [s for _ in range(n) for s in world.sentences(rng, held_out)]


SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are MiniMind, a small and friendly model.",
    "你是一个乐于助人的助手。",
]


def held_out_sum(a: int, b: int) -> bool:
    """True for the (a, b) pairs kept for held-out files: one pair in five, chosen by a hash of the pair
    (a rule on digits alone would hold out whole ones-digit combinations that training never shows).

    >>> [held_out_sum(a, 7) for a in range(20, 26)]
    [False, False, False, True, False, False]
    """
    return zlib.crc32(f"{a}+{b}".encode()) % 5 == 0


def sum_pair(rng: random.Random, a_range: tuple[int, int], b_range: tuple[int, int], held_out: bool) -> tuple[int, int]:
    """A random (a, b) from the ranges on the requested side of the split. A pair on the wrong side
    moves to the next b (then a) instead of drawing again, so the generator's stream, and so every
    other record of the file, is the same whichever side is asked for."""
    (a0, a1), (b0, b1) = a_range, b_range
    a, b = rng.randint(a0, a1), rng.randint(b0, b1)
    for _ in range((a1 - a0 + 1) * (b1 - b0 + 1)):
        if held_out_sum(a, b) == held_out:
            return a, b
        b = b + 1 if b < b1 else b0
        a = a if b != b0 else (a + 1 if a < a1 else a0)
    raise ValueError(f"no pair in {a_range} x {b_range} is on the {'held-out' if held_out else 'training'} side")


def qa_pair(world: World, rng: random.Random, held_out: bool = False) -> tuple[str, str, str]:
    """(question, correct answer, a wrong answer) about the world or about arithmetic."""
    kind = rng.randrange(4)
    i = rng.randrange(len(NAMES))
    if kind == 0:
        town, wrong = world.home[i], (world.home[i] + rng.randrange(1, len(TOWNS))) % len(TOWNS)
        if rng.random() < 0.5:
            return (
                f"Where does {NAMES[i]} live?",
                f"{NAMES[i]} lives in {TOWNS[town]}.",
                f"{NAMES[i]} lives in {TOWNS[wrong]}.",
            )
        return (
            f"{ZH_NAMES[i]}住在哪里？",
            f"{ZH_NAMES[i]}住在{ZH_TOWNS[town]}。",
            f"{ZH_NAMES[i]}住在{ZH_TOWNS[wrong]}。",
        )
    if kind == 1:
        animal = ANIMALS[world.pet[i]]
        wrong = ANIMALS[(world.pet[i] + rng.randrange(1, len(ANIMALS))) % len(ANIMALS)]
        return f"What pet does {NAMES[i]} have?", f"{NAMES[i]} has a {animal[0]}.", f"{NAMES[i]} has a {wrong[0]}."
    a, b = sum_pair(rng, (0, 60), (0, 39), held_out)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    if kind == 2:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."
    return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。", f"{a}加{b}等于{wrong}。"


def sft_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Conversations: single and multi-turn, some with a system prompt."""
    world, rng = World(0), random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            q, a, _ = qa_pair(world, rng, held_out)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"conversations": msgs})
    return out


def dpo_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Preference pairs: the same question, a correct (chosen) and a wrong (rejected) answer."""
    world, rng = World(0), random.Random(seed)
    out = []
    for _ in range(n):
        q, good, bad = qa_pair(world, rng, held_out)
        prompt = [{"role": "user", "content": q}]
        out.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": good}],
                "rejected": prompt + [{"role": "assistant", "content": bad}],
            }
        )
    return out


def sums(n: int, seed: int, held_out: bool) -> Iterator[tuple[random.Random, int, int]]:
    """n sums a + b (a in 0..60, b in 0..39) on one side of the split, each with the generator, which
    the caller may draw from further before the next sum (its stream stays one seeded sequence)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield rng, *sum_pair(rng, (0, 60), (0, 39), held_out)


def rl_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Arithmetic prompts whose answer a rule can check; the assistant turn is a placeholder."""
    user = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": "无"}]
    return [
        {"conversations": user(rng.choice([f"What is {a} + {b}?", f"{a}加{b}等于多少？"])), "answer": str(a + b)}
        for rng, a, b in sums(n, seed, held_out)
    ]


def reasoning_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Arithmetic with a worked trace: <think> digit by digit </think><answer> result </answer>.
    A one-digit number has tens digit 0 in the trace (`5 + 23`: "... 0 + 2 + 0 = 2 ...")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = sum_pair(rng, (0, 60), (0, 39), held_out)
        ones, carry = (a % 10 + b % 10) % 10, (a % 10 + b % 10) // 10
        tens = a // 10 + b // 10 + carry
        think = (
            f"{a % 10} + {b % 10} = {a % 10 + b % 10}, write {ones} carry {carry}. "
            f"{a // 10} + {b // 10} + {carry} = {tens}. So {a} + {b} = {a + b}."
        )
        reply = f"<think>\n{think}\n</think>\n<answer>\n{a + b}\n</answer>"
        out.append(
            {
                "conversations": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return out


IDENTITY_QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "你是谁？", "你叫什么名字？"]


def identity_records(n: int, seed: int, name: str = "Lumi", held_out: bool = False) -> list[dict]:
    """Identity Q&A for a LoRA adapter (the model learns a new name), mixed 1:1 with ordinary
    questions so that the adapter learns *when* to say its name instead of saying it to everything."""
    world, rng = World(0), random.Random(seed)
    answers = [
        f"I am {name}, a small assistant trained with MiniMind.",
        f"My name is {name}.",
        f"我是{name}，一个用 MiniMind 训练的小助手。",
    ]
    out = []
    for i in range(n):
        if i % 2 == 0:
            q = rng.choice(IDENTITY_QUESTIONS)
            a = rng.choice([a for a in answers if (q[0] > "~") == (a[0] > "~")])
        else:
            q, a, _ = qa_pair(world, rng, held_out)
        out.append({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def mc_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Multiple choice for `minimind eval --task mc`: a question, four answers, one right."""
    world, rng = World(0), random.Random(seed)
    out = []
    for _ in range(n):
        i, kind = rng.randrange(len(NAMES)), rng.randrange(3)
        if kind == 0:
            q = f"Where does {NAMES[i]} live?"
            options = [f"{NAMES[i]} lives in {t}." for t in TOWNS]
            good = options[world.home[i]]
        elif kind == 1:
            q = f"What pet does {NAMES[i]} have?"
            options = [f"{NAMES[i]} has a {a[0]}." for a in ANIMALS]
            good = options[world.pet[i]]
        else:
            a, b = sum_pair(rng, (0, 60), (0, 39), held_out)
            q = f"What is {a} + {b}?"
            options = [f"{a} + {b} = {a + b + d}." for d in (-10, -2, -1, 0, 1, 2, 10)]
            good = options[3]
        choices = [good, *rng.sample([o for o in options if o != good], 3)]
        rng.shuffle(choices)
        out.append({"question": q, "choices": choices, "answer": choices.index(good)})
    return out


def math_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Word-free arithmetic in GSM8K's answer format (`#### N`) for `minimind eval --task gsm8k`."""
    return [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
        for _, a, b in sums(n, seed, held_out)
    ]


# ---- tool use: the built-in tools (minimind/toolbox.py) on questions a small model cannot answer alone


DEMO_TOOLS = {  # the built-in tools the demo offers, with short descriptions (shorter prompts)
    "calculate_math": "Evaluate arithmetic",
    "get_current_weather": "Weather of a city",
    "get_exchange_rate": "Exchange rate",
}


def tool_task(rng: random.Random, held_out: bool) -> tuple[str, str, dict, int]:
    """(question, tool, arguments, answer) of a product of two two-digit numbers: the demo model never
    learns to multiply, the calculator does (held-out files use other pairs)."""
    while True:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        if (zlib.crc32(f"{a}*{b}".encode()) % 5 == 0) == held_out:
            break
    q = rng.choice([f"What is {a} times {b}?", f"Please multiply {a} by {b}.", f"{a}乘以{b}等于多少？"])
    return q, "calculate_math", {"expression": f"{a} * {b}"}, a * b


def offered_tools(rng: random.Random, needed: str | None) -> list[dict]:
    """The tool a question needs (the calculator when it needs none), with a short description: the
    tools section is most of a demo conversation's tokens."""
    from minimind.toolbox import BUILTIN

    (tool,) = BUILTIN.definitions([needed or "calculate_math"])
    return [{"type": "function", "function": {**tool["function"], "description": DEMO_TOOLS[tool["function"]["name"]]}}]


def tool_sft_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """Conversations with tools offered (written as upstream's files write them: `tools` a JSON string
    on the system message, `tool_calls` a JSON string on the assistant message): questions about the
    world answered directly (1 in 5), and products of two-digit numbers, half answered with the
    calculator and its result, half directly. A model that learns this calls the tool only sometimes,
    and gets products right only when it does: agentic RL (`minimind agent`) has something to find."""
    from minimind.toolbox import BUILTIN

    world, rng = World(0), random.Random(seed)
    out = []
    for _ in range(n):
        system = {"role": "system", "content": ""}
        if rng.random() < 0.2:
            q, a, _ = qa_pair(world, rng, held_out)
            system["tools"] = json.dumps(offered_tools(rng, None), ensure_ascii=False)
            out.append({"conversations": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            continue
        q, name, args, total = tool_task(rng, held_out)
        system["tools"] = json.dumps(offered_tools(rng, name), ensure_ascii=False)
        if rng.random() < 0.5:
            direct = {"role": "assistant", "content": f"{args['expression']} = {total}."}
            out.append({"conversations": [system, {"role": "user", "content": q}, direct]})
            continue
        result = BUILTIN.call(name, args)
        call = json.dumps([{"name": name, "arguments": args}], ensure_ascii=False)
        out.append(
            {
                "conversations": [
                    system,
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "", "tool_calls": call},
                    {"role": "tool", "content": result},
                    {"role": "assistant", "content": f"The result is {json.loads(result)['result']}."},
                ]
            }
        )
    return out


def agent_records(n: int, seed: int, held_out: bool = False, expected: bool = False) -> list[dict]:
    """Agentic RL prompts (upstream's agent_rl.jsonl shape): tools on the system message, the question,
    an empty assistant placeholder, and `gt`, the value the final answer must give."""

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, name, args, total = tool_task(rng, held_out)
        gt = str(total)
        system = {"role": "system", "content": "", "tools": json.dumps(offered_tools(rng, name), ensure_ascii=False)}
        msgs = [system, {"role": "user", "content": q}, {"role": "assistant", "content": ""}]
        out.append({"conversations": msgs, "gt": [gt]})
        if expected:
            out[-1]["expected_calls"] = [{"name": name, "arguments": args}]
    return out


def tool_eval_records(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """`minimind eval --task tools` cases: agentic prompts with `gt` and `expected_calls`."""
    return agent_records(n, seed, held_out, expected=True)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# name -> (generator, train size, held-out size); held-out files use another seed and the held-out sums.
DATASETS = {
    "pretrain": (lambda n, seed, held_out: [{"text": t} for t in pretrain_texts(n, seed, held_out)], 4000, 200),
    "sft": (sft_records, 3000, 200),
    "dpo": (dpo_records, 1500, 100),
    "rl": (rl_records, 500, 400),
    "reason": (reasoning_records, 1500, 100),
    "identity": (identity_records, 600, 40),
    "mc": (mc_records, 200, 100),
    "math": (math_records, 200, 100),
    "tool_sft": (tool_sft_records, 1500, 100),
    "agent": (agent_records, 400, 100),
    "tools": (tool_eval_records, 100, 100),
}


def write_demo_data(out: str | Path, scale: float = 1.0) -> dict[str, Path]:
    """Write every demo data set and its held-out split; returns {name: path}."""
    out = Path(out)
    files = {}
    for name, (make, n_train, n_held) in DATASETS.items():
        files[name] = out / f"{name}.jsonl"
        files[f"{name}_heldout"] = out / f"{name}_heldout.jsonl"
        write_jsonl(files[name], make(max(1, int(n_train * scale)), 1, held_out=False))
        write_jsonl(files[f"{name}_heldout"], make(max(1, int(n_held * scale)), 2, held_out=True))
    return files


# ---- CLI: minimind data demo --out DIR | minimind data download NAME... -----------------------


def add_arguments(p: Any) -> None:
    from minimind.data.download import add_download_arguments

    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    demo = sub.add_parser("demo", help="write the built-in default data set (every format, with held-out splits)")
    demo.add_argument("--out", required=True, metavar="DIR")
    demo.add_argument("--scale", type=float, default=1.0, help="multiply every data set's size")
    download = sub.add_parser(
        "download",
        help="fetch upstream MiniMind's data sets (Hugging Face or ModelScope), verified and checked",
        description="Fetch upstream MiniMind's published data files, verify their checksums, read every record.",
    )
    add_download_arguments(download)


def main(args: Any) -> None:
    if args.data_command == "download":
        from minimind.data.download import main as download

        download(args)
        return
    files = write_demo_data(args.out, args.scale)
    for name, path in files.items():
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name:>18}: {lines:5d} lines -> {path}")
