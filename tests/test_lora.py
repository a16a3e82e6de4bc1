"""LoRA: a fresh adapter changes nothing, training moves only the adapter, it teaches a new identity
without disturbing other answers, merging is exact, and adapters resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file

from minimind.checkpoint import load_run
from minimind.data.chat import ChatRows, iter_conversations, tokenize_conversations
from minimind.engine import evaluate_loss
from minimind.errors import CheckpointError, ConfigError
from minimind.lora import LoRAConfig, inject, load_adapter, merge


def test_fresh_adapter_is_identity_and_merge_is_exact():
    model = sharp_model("moe")
    x = torch.randint(0, 512, (2, 12))
    ref = model(x).logits
    names = inject(model, LoRAConfig(rank=4, alpha=8))
    assert any("experts.0.gate_proj" in n for n in names) and "lm_head" not in names
    assert torch.equal(model(x).logits, ref)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    adapted = model(x).logits
    assert (adapted - ref).abs().max() > 0.1
    merge(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x).logits, adapted, atol=1e-4, rtol=1e-4)


def test_bad_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="no linear layer matches"):
        inject(sharp_model(), LoRAConfig(targets=["qkv"]))


def test_identity_adapter_teaches_a_new_name_and_leaves_the_rest(pipeline):
    files = pipeline["files"]
    from minimind.data.demo import IDENTITY_QUESTIONS
    from minimind.demo import answer_accuracy

    held = [c for c in iter_conversations([files["identity_heldout"]]) if c[0]["content"] in IDENTITY_QUESTIONS]
    assert len(held) >= 5

    base = load_run(pipeline["sft"])
    general = list(iter_conversations([files["sft_heldout"]]))
    named_before, _ = answer_accuracy(base.model, base.tokenizer, held, contains="Lumi")
    right_before, _ = answer_accuracy(base.model, base.tokenizer, general)
    rows = ChatRows(tokenize_conversations([files["sft_heldout"]], base.tokenizer, 128), 128)
    loss_before = evaluate_loss(base.model, rows)
    load_adapter(base.model, pipeline["lora"])
    named_after, answers = answer_accuracy(base.model, base.tokenizer, held, contains="Lumi")
    right_after, _ = answer_accuracy(base.model, base.tokenizer, general)
    loss_after = evaluate_loss(base.model, rows)
    assert named_before == 0 and named_after >= 0.8, answers
    # Unrelated questions: answers about as good as before (within 8 of the ~100 held-out questions:
    # their sampling noise alone is ~5), held-out loss within a third of where it was.
    assert right_after >= right_before - 0.08 - 1e-9 and right_before > 0.2, (right_before, right_after)
    assert loss_after < 1.35 * loss_before, (loss_before, loss_after)
    # Only the adapter was written, and the base run is untouched.
    saved = load_file(str(pipeline["lora"] / "adapter.safetensors"))
    assert saved and all(".lora_" in k for k in saved)
    cfg = json.loads((pipeline["lora"] / "adapter.json").read_text())
    assert cfg["lora"]["rank"] == 8 and cfg["parent"] == str(pipeline["sft"])


def test_merge_cli_gives_the_same_logits(pipeline, tmp_path):
    _run_cli("lora", "merge", pipeline["sft"], "--lora", pipeline["lora"], "--out", tmp_path / "merged")
    merged = load_run(tmp_path / "merged")
    adapted = load_run(pipeline["sft"])
    load_adapter(adapted.model, pipeline["lora"])
    x = torch.tensor([adapted.tokenizer.encode_chat([{"role": "user", "content": "Who are you?"}], True)])
    torch.testing.assert_close(merged.model(x).logits, adapted.model(x).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "merged" / "run.json").read_text())["lora_merged"]["name"] == "identity"


def test_adapter_for_another_shape_is_refused(pipeline):
    with pytest.raises(CheckpointError, match="trained on a base of shape"):
        load_adapter(sharp_model(), pipeline["lora"])


def test_lora_resume_is_bitwise_exact(pipeline, tmp_path):
    """8 adapter steps straight (CLI) == 4 steps, killed, `--resume` (CLI), 4 more: identical bits."""
    from minimind.config import TrainConfig
    from minimind.engine import Trainer
    from minimind.stages.lora import AdapterCheckpoint

    files = pipeline["files"]
    common = ["--from", pipeline["sft"], "--data", files["identity"], "--max-seq-len", 64, "--batch-size", 4]
    common += ["--accumulation", 1, "--warmup-steps", 2, "--log-every", 2, "--cache-dir", tmp_path / "c"]
    common += ["--max-steps", 8, "--name", "identity"]
    _run_cli("lora", *common, "--out", tmp_path / "straight")

    run = load_run(pipeline["sft"])
    torch.manual_seed(42)  # what the CLI does before injecting (seed 42 is the default)
    lora_cfg = LoRAConfig(name="identity")
    inject(run.model, lora_cfg)
    rows = ChatRows(tokenize_conversations([files["identity"]], run.tokenizer, 64, tmp_path / "c"), 64)
    cfg = TrainConfig(
        out=str(tmp_path / "split"), max_seq_len=64, batch_size=4, accumulation=1, lr=2e-3, warmup_steps=2,
        log_every=2, max_steps=8, weight_decay=0.0,
    )  # fmt: skip
    info = {"stage": "lora", "name": "identity", "parent": str(pipeline["sft"])}
    interrupted = Trainer(cfg, run.model.train(), run.tokenizer, rows, info, checkpoint=AdapterCheckpoint(lora_cfg))
    while interrupted.step < 4:
        interrupted.train_step()
    interrupted.save()  # the process dies here
    log = _run_cli("lora", "--out", tmp_path / "split", "--resume", *common[2:])
    assert "resuming at step 4" in log
    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "split" / "model.safetensors").exists()  # never a copy of the base


def test_merge_never_overwrites_and_resume_needs_an_adapter(pipeline, tmp_path):
    from minimind.lora import apply_adapter

    out = _run_cli_fail("lora", "merge", pipeline["sft"], "--lora", pipeline["lora"], "--out", pipeline["sft"])
    assert "ConfigError" in out and "new directory" in out
    out = _run_cli_fail("lora", "--resume", "--out", tmp_path / "nothing", "--data", pipeline["files"]["identity"])
    assert "CheckpointError" in out and "not a LoRA adapter" in out
    # An adapter trained on conversations makes even a pretrained-only base answer in chat format.
    base = load_run(pipeline["pretrain"])
    assert not base.is_chat
    apply_adapter(base, pipeline["lora"].parent / "identity")
    assert base.is_chat


def _run_cli_fail(*args) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "minimind", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr
