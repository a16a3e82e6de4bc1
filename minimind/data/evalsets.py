"""Evaluation data sets: multiple-choice files (C-Eval/CMMLU CSV, JSONL) and GSM8K-style math, read
with `FILE:LINE` errors, and the number extraction that GSM8K scoring uses."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from minimind.data.readers import iter_jsonl
from minimind.errors import DataError

# ---- answer extraction --------------------------------------------------------------------------

# A minus sign belongs to the number unless a digit stands right before it ("5-3" is 5 and 3).
NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
BARE_NUMBER = re.compile(rf"\s*\$?\s*{NUMBER.pattern}\s*\.?\s*")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_number(text: str) -> str | None:
    """The final number of a reply: the first after the last `####`, else the last inside
    `<answer>...</answer>`, else the last in the text; thousands commas, `$` and a trailing "."
    dropped, the rest as written ("#### $1,000." -> "1000"). None when there is no number.

    >>> extract_number("48+24 = <<48+24=72>>72 clips.\\n#### 72")
    '72'
    """
    text = text.replace("\u2212", "-")  # Unicode minus
    if "####" in text and (found := NUMBER.findall(text.rpartition("####")[2])):
        return found[0].replace(",", "")
    for inside in reversed(ANSWER_TAG.findall(text)):
        if found := NUMBER.findall(inside):
            return found[-1].replace(",", "")
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: str | None) -> bool:
    """Equal as numbers: "72.0" == "72", "-3.50" == "-3.5"."""
    try:
        return a is not None and b is not None and Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
    except InvalidOperation:
        return False


# ---- reading: multiple choice and GSM8K ---------------------------------------------------------


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    letters: list[str]  # the label of each choice (A, B, ...)
    where: str  # FILE:LINE


def read_mc(path: str | Path) -> list[MCItem]:
    """C-Eval/CMMLU-style CSV (header with Question, option letters, Answer; other columns such as
    an id are ignored) or JSONL `{"question", "choices": [...], "answer": index or letter}`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return read_mc_csv(path) if path.suffix.lower() == ".csv" else read_mc_jsonl(path)


def _mc_item(where: str, question: Any, choices: list[Any], letters: list[str], answer: str) -> MCItem:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' is missing or empty")
    kept = [(letter, c) for letter, c in zip(letters, choices) if isinstance(c, str) and c.strip()]
    if len(kept) < 2:
        raise DataError(f"{where}: needs at least 2 non-empty choices, has {len(kept)}")
    labels = [letter for letter, _ in kept]
    if answer not in labels:
        raise DataError(f"{where}: answer {answer!r} is not among the options {', '.join(labels)}")
    return MCItem(question.strip(), [c.strip() for _, c in kept], labels.index(answer), labels, where)


def read_mc_csv(path: Path) -> list[MCItem]:
    items = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            cols = [h.strip().lower() for h in header or []]
            letter_cols = [i for i, h in enumerate(cols) if len(h) == 1 and h.isalpha()]
            if "question" not in cols or "answer" not in cols or len(letter_cols) < 2:
                raise DataError(f"{path}:1: header needs Question, option letters (A, B, ...) and Answer")
            q, a = cols.index("question"), cols.index("answer")
            letters = [cols[i].upper() for i in letter_cols]
            line = reader.line_num + 1
            for row in reader:
                where, line = f"{path}:{line}", reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(cols):
                    raise DataError(f"{where}: {len(row)} columns, expected {len(cols)} ({','.join(header or [])})")
                choices = [row[i] for i in letter_cols]
                items.append(_mc_item(where, row[q], choices, letters, row[a].strip().upper()))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if not items:
        raise DataError(f"{path}: no questions")
    return items


def read_mc_jsonl(path: Path) -> list[MCItem]:
    items = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        choices, answer = obj.get("choices"), obj.get("answer")
        if not isinstance(choices, list):
            raise DataError(f"{where}: 'choices' must be a list of option strings")
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            answer = letters[answer]
        elif not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a choice index or letter, got {answer!r}")
        items.append(_mc_item(where, obj.get("question"), choices, letters, answer.strip().upper()))
    return items


@dataclass
class MathItem:
    question: str
    answer: str  # the full reference solution
    reference: str  # its final number
    where: str


def read_gsm8k(path: str | Path) -> list[MathItem]:
    """JSONL `{"question", "answer"}`; the reference is the number after `####`, or a bare number."""
    items = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question, answer = obj.get("question"), obj.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' is missing or empty")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string ending in '#### N', or a number")
        final = answer.rpartition("####")[2] if "####" in answer else answer
        found = NUMBER.findall(final) if "####" in answer or BARE_NUMBER.fullmatch(answer) else []
        if not found:
            raise DataError(f"{where}: no number in 'answer' (expected '... #### N' or a bare number)")
        items.append(MathItem(question.strip(), answer, found[0].replace(",", ""), where))
    return items
