"""lm-evaluation-harness (`lm-eval --model hf`) on a `minimind export --format hf` folder, offline, on a local
multiple-choice task: every choice gets the log-likelihood `minimind eval --task mc` gives it, so the same
items come out right and the accuracies are equal.

The task YAML aligns lm-eval's strings with ours (see minimind/eval.py, "mc"):
- chat (`--apply_chat_template`): the question is the user turn and each choice is the assistant's reply
  with its closing `<|im_end|>` appended (our chat scoring counts it). lm-eval moves the context's trailing
  whitespace into the continuation, so its scores also hold log p("\\n" | ...<|im_start|>assistant), a
  token SFT never trains; that one number per question is the whole difference, and rankings are equal.
- plain (a pretrain run): "Question: q\\nAnswer:" with lm-eval's default " " target delimiter is exactly
  our prompt; `add_bos_token=True` gives the BOS that our plain prompts (like pretraining documents) start with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")

from minimind.checkpoint import load_run  # noqa: E402
from minimind.cli import main  # noqa: E402
from minimind.data.prompts import encode_prompt  # noqa: E402
from minimind.eval import evaluate, token_logprobs  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
  cache_dir: "{cache}"
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{choice}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CHAT = dict(text="{{question}}", choice="{{ choices | map('regex_replace', '$', '<|im_end|>') | list }}")
PLAIN = dict(text="Question: {{question}}\\nAnswer:", choice="choices")


def write_task(folder: Path, name: str, data: Path, style: dict[str, str]) -> Path:
    """A task directory for `--include_path` holding one local multiple-choice task over `data`."""
    folder.mkdir(parents=True)
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, cache=folder / "cache", **style))
    return folder


def export_hf(run_dir: Path, out: Path) -> Path:
    main(["export", str(run_dir), "--format", "hf", "--out", str(out)])
    return out


def check_same_scores(samples: list[dict], ours: dict, offsets: list[float]) -> None:
    """lm-eval's log-likelihood of every choice is ours plus the item's offset; the same items are right."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    assert len(samples) == len(ours["items"]) == len(offsets)
    for sample, item, offset in zip(samples, ours["items"], offsets):
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        # Tight on purpose: a trained model ends a reply with <|im_end|> almost surely, so choices scored
        # without it differ by only ~3e-4; honest float32 differences stay near 3e-5.
        assert theirs == pytest.approx([s + offset for s in item["scores"]], rel=0, abs=1e-4), item["where"]
        assert bool(sample["acc"]) == item["correct"], item["where"]


def test_lm_eval_cli_on_chat_export_scores_like_minimind_eval(pipeline, tmp_path):
    data = pipeline["files"]["mc_heldout"]
    hf = export_hf(pipeline["sft"], tmp_path / "hf")
    tasks = write_task(tmp_path / "tasks", "minimind_mc", data, CHAT)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32"]
    cmd += ["--tasks", "minimind_mc", "--include_path", str(tasks), "--apply_chat_template", "--device", "cpu"]
    cmd += ["--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    (samples,) = (tmp_path / "out").rglob("samples_minimind_mc_*.jsonl")
    acc = json.loads(results.read_text())["results"]["minimind_mc"]["acc,none"]

    run = load_run(pipeline["sft"])
    ours = evaluate(run, "mc", data)
    assert ours["prompt_style"] == "chat"
    prompts = [encode_prompt(run.tokenizer, item["question"], chat=True) for item in ours["items"]]
    assert all(run.tokenizer.decode(p[-1:]) == "\n" for p in prompts)
    newline = [float(lp[-1]) for lp in token_logprobs(run.model, prompts)]  # log p("\n" | ...assistant)
    check_same_scores([json.loads(line) for line in samples.read_text().splitlines()], ours, newline)
    assert acc == pytest.approx(ours["metrics"]["accuracy"], abs=1e-12)
    assert acc >= 0.6 and acc >= 2 * ours["metrics"]["chance"]  # the SFT model learned the demo facts


def test_lm_eval_api_on_plain_export_scores_like_minimind_eval(pipeline, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    data = pipeline["files"]["mc_heldout"]
    hf = export_hf(pipeline["pretrain"], tmp_path / "hf")
    tasks = write_task(tmp_path / "tasks", "minimind_mc_plain", data, PLAIN)
    result = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32,add_bos_token=True",
        tasks=["minimind_mc_plain"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=8,
        log_samples=True,
    )
    ours = evaluate(load_run(pipeline["pretrain"]), "mc", data)
    assert ours["prompt_style"] == "plain"
    check_same_scores(result["samples"]["minimind_mc_plain"], ours, [0.0] * ours["n"])
    acc = result["results"]["minimind_mc_plain"]["acc,none"]
    assert acc == pytest.approx(ours["metrics"]["accuracy"], abs=1e-12)
