"""What the commands that run a model share (generate, chat, eval, serve, export): the device choice,
the sampling flags and their SamplingParams, RoPE overrides at inference; and `minimind generate`.
The sampler itself (minimind/generate.py) knows nothing of runs or flags.
"""

from __future__ import annotations

from typing import Any

import torch

from minimind.config import ModelConfig
from minimind.generate import SamplingParams, generate


def add_sampling_arguments(p: Any, defaults: SamplingParams | None = None) -> None:
    """Sampling flags shared by generate, chat and eval."""
    d = defaults or SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling; 1 = off")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    g.add_argument(
        "--rope-scaling",
        choices=["none", "yarn"],
        default=None,
        help="override the run's RoPE scaling at inference (yarn extends the context)",
    )
    g.add_argument("--rope-factor", type=float, default=None, help="YaRN factor, e.g. 4")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def sampling_params(args: Any, stop_ids: tuple[int, ...]) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop_ids=stop_ids,
        seed=args.seed,
    )


def rope_overrides(args: Any, cfg: ModelConfig) -> dict[str, Any]:
    """Config overrides for --rope-scaling / --rope-factor (a factor alone implies yarn).

    With YaRN on, the position table grows to original_max_position_embeddings * factor, the
    context YaRN is meant to reach.
    """
    out: dict[str, Any] = {}
    if args.rope_scaling is not None:
        out["rope_scaling"] = "" if args.rope_scaling == "none" else args.rope_scaling
    if args.rope_factor is not None:
        out["rope_factor"] = args.rope_factor
        out.setdefault("rope_scaling", "yarn")
    if out.get("rope_scaling") == "yarn":
        reach = int(cfg.rope_original_max_position_embeddings * out.get("rope_factor", cfg.rope_factor))
        out["max_position_embeddings"] = max(cfg.max_position_embeddings, reach)
    return out


def resolve_device(name: str) -> torch.device:
    """auto picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def open_run(path: str, device: str = "auto", lora: str | None = None, merge_lora: bool = False, **overrides: Any):
    """The run at `path` on `device` (auto: cuda, then mps, then cpu), with `overrides` of its model
    config (YaRN), and the LoRA adapter at `lora` applied (or folded into the weights, `merge_lora`):
    what chat, eval, serve and export load."""
    from minimind.checkpoint import load_run

    where = resolve_device(device)
    run = load_run(path, device=where, **overrides)
    if lora:
        from minimind.lora import apply_adapter, merge

        apply_adapter(run, lora)
        if merge_lora:
            merge(run.model)
        run.model.to(where).eval()
    return run


def add_arguments(p: Any) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True, help="text to continue (or a user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--num", type=int, default=1, help="generate this many continuations in one batch")
    add_sampling_arguments(p)


def main(args: Any) -> None:
    from minimind.checkpoint import load_config
    from minimind.tokenizer import StreamDecoder

    run = open_run(args.run_dir, args.device, **rope_overrides(args, load_config(args.run_dir)))
    tok = run.tokenizer
    if args.chat:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt_ids = [tok.bos_id] + tok.encode(args.prompt)
    params = sampling_params(args, tok.stop_ids)
    decoders = [StreamDecoder(tok) for _ in range(args.num)]
    stream = args.stream and args.num == 1

    def on_token(row: int, token: int) -> None:
        if token not in params.stop_ids:
            print(decoders[row].push(token), end="", flush=True)

    if stream:
        print(args.prompt, end="", flush=True)
    out = generate(run.model, [prompt_ids] * args.num, params, on_token=on_token if stream else None)
    if stream:
        print(decoders[0].flush())
    else:
        for i, g in enumerate(out.generations):
            header = f"--- sample {i + 1} ({g.finish_reason}) ---\n" if args.num > 1 else ""
            text = tok.decode(g.tokens[:-1] if g.finish_reason == "stop" else g.tokens)
            print(header + args.prompt + text)
    print(
        f"[{out.new_tokens} tokens, prefill {out.prefill_s * 1000:.0f} ms, "
        f"decode {out.decode_tokens_per_s:.1f} tokens/s]"
    )
