"""Run under torch.distributed.run by tests/test_engine.py: a tiny pretraining run (DDP, or the engine
named by a fifth argument) in which only the last rank's loss turns NaN at step 3. Every rank must stop
at the same step with TrainingError (none may hang in a collective), and writes what it saw to
OUT/rank{R}.txt."""

import sys

import torch
import torch.distributed as dist

from minimind.config import ModelConfig, TrainConfig
from minimind.data.packing import PackedRows
from minimind.data.tokens import tokenize_files
from minimind.engine import Trainer, TrainingError, lm_loss
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

out, tokenizer_dir, data, cache = sys.argv[1:5]
engine = sys.argv[5] if len(sys.argv) > 5 else "ddp"  # or fsdp, zero2, zero3
flags = {"fsdp": {"fsdp": True}, "zero2": {"zero": 2}, "zero3": {"zero": 3}}.get(engine, {})
tok = Tokenizer.load(tokenizer_dir)
tokens = tokenize_files([data], tok, cache)
rows = PackedRows(tokens.tokens, tokens.offsets, 32)
torch.manual_seed(0)
model = MiniMind(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
calls = {"n": 0}


def poisoned(model, batch):
    calls["n"] += 1
    loss, aux = lm_loss(model, batch)
    last = dist.get_rank() == dist.get_world_size() - 1
    return (loss * float("nan") if last and calls["n"] == 3 else loss), aux


cfg = TrainConfig(out=out + "/run", max_seq_len=32, batch_size=4, accumulation=1, max_steps=10, save_every=2,
                  log_every=5, device="cpu", **flags)  # fmt: skip
trainer = Trainer(cfg, model, tok, rows, {"stage": "test"}, loss_fn=poisoned)
try:
    trainer.fit()
    result = "finished"
except TrainingError as e:
    result = f"stopped at step {trainer.step}: {e}"
with open(f"{out}/rank{dist.get_rank()}.txt", "w") as f:
    f.write(result)
dist.destroy_process_group()
