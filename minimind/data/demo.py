"""The built-in default corpus: generated on the spot, no download, learnable by a tiny model.

A small made-up world described in short English and Chinese sentences (who lives where, what
colour things are, what animals eat), plus arithmetic written out in words and digits. The facts
are fixed by the seed, so a model can actually learn them, and a held-out split uses the same
facts in sentences the model never saw, so learning can be measured.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class World:
    """The fixed facts: where each person lives and which animal they keep."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.home = {i: rng.randrange(len(TOWNS)) for i in range(len(NAMES))}
        self.pet = {i: rng.randrange(len(ANIMALS)) for i in range(len(NAMES))}

    def sentences(self, rng: random.Random) -> list[str]:
        """One short paragraph of true statements about the world, in English or Chinese."""
        out = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.randrange(5)
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
                a, b = rng.randint(0, 5), rng.randint(0, 5)
                out.append(
                    rng.choice(
                        [
                            f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                            f"{a} + {b} = {a + b}.",
                            f"{a}加{b}等于{a + b}。",
                        ]
                    )
                )
            else:
                a, b = rng.randint(10, 60), rng.randint(1, 39)
                out.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a + b} - {b} = {a}."]))
        return [" ".join(out)]


def pretrain_texts(n: int, seed: int) -> list[str]:
    world, rng = World(0), random.Random(seed)
    return [s for _ in range(n) for s in world.sentences(rng)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_demo_data(out: str | Path, n_pretrain: int = 4000, n_heldout: int = 200) -> dict[str, Path]:
    """Write the demo corpus; returns {name: path}. Held-out text uses a different sentence seed."""
    out = Path(out)
    files = {"pretrain": out / "pretrain.jsonl", "pretrain_heldout": out / "pretrain_heldout.jsonl"}
    write_jsonl(files["pretrain"], [{"text": t} for t in pretrain_texts(n_pretrain, seed=1)])
    write_jsonl(files["pretrain_heldout"], [{"text": t} for t in pretrain_texts(n_heldout, seed=2)])
    return files
