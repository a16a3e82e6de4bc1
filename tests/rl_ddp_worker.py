"""Run under torch.distributed.run by tests/test_rl.py: a few GRPO steps, then each rank saves the
prompts it drew and its weights to OUT/rank{R}.pt (only rank 0 writes the run directory)."""

import sys

import torch
import torch.distributed as dist

from minimind.cli import build_parser
from minimind.stages import grpo

out, argv = sys.argv[1], sys.argv[2:]
trainer, _ = grpo.prepare_rl(build_parser("grpo").parse_args(argv), "grpo", grpo.RLOptions(), grpo.group_relative)
drawn = []
draw = trainer.source.draw
trainer.source.draw = lambda: drawn.append(draw().tolist()) or drawn[-1]
trainer.fit()
weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
torch.save({"prompts": drawn, "weights": weights}, f"{out}/rank{dist.get_rank()}.pt")
dist.barrier()
