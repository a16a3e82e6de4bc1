"""Parity with transformers' own implementations of the same math (Llama for plain attention,
Qwen3 for q/k norm, Qwen3-MoE for routed experts, GraniteMoeShared for shared experts): identical
fp32 logits on the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_model

ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "granite": "GraniteMoeSharedForCausalLM",
}


def hf_model(ours, arch: str):
    """Our model as the transformers model `minimind export --format hf` writes for it (checked to be
    the architecture named by `arch`), loaded back through transformers' own from_pretrained."""
    import tempfile

    import transformers

    from minimind.export.hf import hf_architecture, save_hf_model

    assert hf_architecture(ours.cfg) == ARCHS[arch]
    with tempfile.TemporaryDirectory() as folder:
        save_hf_model(ours, folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize(
    "name,arch",
    [
        ("gqa", "llama"),
        ("dense", "llama"),
        ("yarn", "llama"),
        ("qk_norm", "qwen3"),
        ("moe_top1", "qwen3moe"),
        ("moe", "granite"),
    ],
)
def test_logits_match_transformers(name, arch):
    ours = sharp_model(name)
    theirs = hf_model(ours, arch)
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
