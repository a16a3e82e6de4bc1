"""Shared fixtures: a tokenizer trained on the built-in demo corpus and tiny model configs."""

from __future__ import annotations

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.demo import pretrain_texts
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

# Tiny shapes that still exercise every feature: GQA, q/k norm, MoE, YaRN.
TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512)
CONFIGS = {
    "dense": dict(TINY, num_kv_heads=4),
    "gqa": TINY,
    "qk_norm": dict(TINY, qk_norm=True),
    "yarn": dict(TINY, rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=32),
    "moe": dict(TINY, use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, intermediate_size=96),
    "moe_top1": dict(
        TINY,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=1,
        num_shared_experts=0,
        norm_topk_prob=False,
        qk_norm=True,
        intermediate_size=96,
    ),
}


def tiny_config(name: str = "gqa", **overrides) -> ModelConfig:
    return ModelConfig(**{**CONFIGS[name], **overrides})


def sharp_model(name: str = "gqa", **overrides) -> MiniMind:
    """A tiny model with large random weights: peaked attention and logits, so that any error in
    masking, positions or caching moves the output well beyond float32 noise."""
    model = MiniMind(tiny_config(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    texts = pretrain_texts(600, seed=1) + ["Hello, world! 你好，世界。🙂 emoji 😀 and digits 12345"] * 5
    return Tokenizer.train(texts, vocab_size=600)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save(path)
    return path


@pytest.fixture
def tiny_run(tokenizer, tmp_path):
    """A freshly initialised `tiny` run directory sized to the session tokenizer."""
    from minimind.checkpoint import init_run

    init_run("tiny", tokenizer, tmp_path / "run", seed=0, hidden_size=64, num_layers=2)
    return tmp_path / "run"
