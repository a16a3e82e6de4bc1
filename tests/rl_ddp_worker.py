"""Run under torch.distributed.run by tests/test_rl.py: a few GRPO (or, with `spo` first, SPO) steps,
then each rank saves the prompts it drew, its weights and (SPO) its tracker to OUT/rank{R}.pt (only
rank 0 writes the run directory)."""

import sys

import torch
import torch.distributed as dist

from minimind.cli import build_parser
from minimind.stages import grpo, spo

out, argv = sys.argv[1], sys.argv[2:]
if argv[0] == "spo":
    trainer, _ = spo.prepare(build_parser("spo").parse_args(argv))
else:
    trainer, _ = grpo.prepare(build_parser("grpo").parse_args(argv))
drawn = []
draw = trainer.source.draw
trainer.source.draw = lambda: drawn.append(draw().tolist()) or drawn[-1]
trainer.fit()
weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
state = trainer.source.hooks.state_dict()
torch.save({"prompts": drawn, "weights": weights, "stage": state}, f"{out}/rank{dist.get_rank()}.pt")
dist.barrier()
