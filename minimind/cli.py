"""The `minimind` command: one table from command name to the module that implements it.

Each module exposes `add_arguments(parser)` and `main(args)`. Only the chosen command's module is
imported, so `minimind --help` stays fast. Errors the user can fix print as one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minimind import __version__, restart_clock
from minimind.errors import MiniMindError

COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("minimind.tokenizer", "train a byte-level BPE tokenizer on text files"),
    "init": ("minimind.checkpoint", "create a freshly initialised run directory from a preset"),
    "generate": ("minimind.inference", "continue a prompt with a run's model (KV-cached sampling)"),
    "data": ("minimind.data.demo", "data sets: `demo` writes the built-in one, `download NAME...` fetches upstream's"),
    "pretrain": ("minimind.stages.pretrain", "pretrain a model on packed text (next-token prediction)"),
    "sft": ("minimind.stages.sft", "supervised fine-tuning on conversations (loss on assistant replies only)"),
    "lora": ("minimind.stages.lora", "train a LoRA adapter (`minimind lora merge` folds one into the weights)"),
    "dpo": ("minimind.stages.dpo", "direct preference optimisation on chosen/rejected pairs"),
    "reward": ("minimind.stages.reward", "train a reward model (scalar head, Bradley-Terry) on preference pairs"),
    "distill": ("minimind.stages.distill", "knowledge distillation from a teacher run (or hf:DIR)"),
    "reason": ("minimind.stages.reason", "reasoning distillation: SFT on <think>/<answer> traces, tags weighted"),
    "grpo": ("minimind.stages.grpo", "GRPO (or Dr.GRPO / CISPO): RL from rewards with groups of samples per prompt"),
    "ppo": ("minimind.stages.ppo", "PPO: actor + critic, GAE, clipped policy and value losses, KL penalty"),
    "spo": ("minimind.stages.spo", "SPO: one sample per prompt against a tracked per-prompt baseline"),
    "agent": ("minimind.stages.agent", "agentic RL: multi-turn episodes calling sandboxed tools, GRPO/CISPO losses"),
    "chat": ("minimind.chat", "chat with a run (interactive, or one answer with --prompt)"),
    "eval": ("minimind.eval", "evaluate a run: ppl, mc (multiple choice), gsm8k, format, tools"),
    "export": ("minimind.export", "export a run: transformers folder (--format hf) or llama.cpp GGUF (--format gguf)"),
    "serve": ("minimind.serve", "OpenAI-compatible HTTP server with a web chat page at /"),
    "demo": ("minimind.demo", "run the end-to-end pipeline on built-in data (what `make demo` runs)"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description="Train small language models from nothing.")
    parser.add_argument("--version", action="version", version=f"minimind {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    restart_clock(from_process_start=argv is None)  # --max-time and the logged elapsed seconds count from here
    argv = sys.argv[1:] if argv is None else argv
    # The `deepspeed` launcher passes --local_rank=N (before the command, with --module); LOCAL_RANK in
    # the environment says the same, and that is what MiniMind reads.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser(None).print_help()
        sys.exit(2)
    try:
        importlib.import_module(COMMANDS[args.command][0]).main(args)
    except MiniMindError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
