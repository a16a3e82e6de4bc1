"""Memory per GPU of each preset under DDP, ZeRO-2 and ZeRO-3 / FSDP2: computed, not measured.

What is counted (bytes per GPU, N GPUs, P parameters):

    weights      fp32 master weights: 4P (DDP, ZeRO-2), 4P/N (ZeRO-3, FSDP2) + one block gathered at a time
    gradients    fp32: 4P (DDP), 4P/N (ZeRO-2, ZeRO-3, FSDP2)
    optimizer    AdamW's two fp32 moments: 8P (DDP), 8P/N (ZeRO-2, ZeRO-3, FSDP2)
    activations  per row of T tokens, bf16 autocast, flash/flex attention (no T x T matrix), no
                 recomputation: ~34 T h bytes per layer (Korthikanti et al. 2022, without the attention
                 score term that flash kernels never store) + the logits (T V, bf16, and fp32 in the loss)

Activations do not shrink with sharding: they scale with the micro-batch (`--batch-size`), and
`--grad-checkpointing` keeps only each block's input (2 T h bytes per layer). MoE presets hold every
expert's weights; their activations count the routed experts' work only. CUDA's allocator, NCCL buffers
and the CUDA context (~0.5-1 GB) come on top.

    python benchmarks/memory_table.py [--gpus 8]
"""

from __future__ import annotations

import argparse

import torch

from minimind.config import PRESETS, preset
from minimind.model import MiniMind

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    args = p.parse_args()
    n = args.gpus
    rows = []
    for name in [k for k in PRESETS if not k.startswith("tiny")]:
        cfg = preset(name)
        with torch.device("meta"):
            model = MiniMind(cfg)
        params = model.num_params()
        block = sum(p.numel() for p in model.layers[0].parameters())
        h, layers, vocab = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
        act = {t: (34 * t * h * layers + t * vocab * 6) / GIB for t in (512, 2048)}
        engines = {
            "DDP": (4 * params, 4 * params, 8 * params),
            "ZeRO-2": (4 * params, 4 * params / n, 8 * params / n),
            "ZeRO-3 / FSDP2": (4 * params / n + 4 * block, 4 * params / n, 8 * params / n),
        }
        for engine, (w, g, o) in engines.items():
            rows.append(
                f"| {name} | {params / 1e6:.0f}M | {engine} | {w / GIB:.3f} | {g / GIB:.3f} | {o / GIB:.3f} "
                f"| {(w + g + o) / GIB:.3f} | {act[512]:.3f} | {act[2048]:.3f} |"
            )
    print(f"Per GPU, {n} GPUs. GiB; activations per row (multiply by --batch-size).\n")
    print(
        "| preset | params | engine | weights | gradients | optimizer | states total | act/row T=512 | act/row T=2048 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
