"""Knowledge distillation (Hinton et al. 2015): the student learns the teacher's whole next-token
distribution at every trained token, not only the one token the data holds.

data:    conversations {"conversations": [...]} (assistant tokens trained, rows as in `minimind sft`) or
         text {"text": ...} / .txt (every token, rows as in `minimind pretrain`); told apart by each
         file's first record, or --format
models:  the student: --from RUN_DIR, or a fresh --preset on the teacher's tokenizer; the teacher: a
         run directory or hf:DIR (a transformers causal LM folder with its tokenizer.json), frozen,
         in eval mode, no grad, under the engine's autocast. Both must share one tokenizer.
loss:    summed over trained tokens, with p^T = softmax(logits / T):
             L = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)
         --kd reverse: KL(p_student^T || p_teacher^T) (mode-seeking). T^2 keeps the KL's gradient on
         CE's scale as T grows. The engine divides by the trained tokens of the step.
metrics: ce and kl (the T^2-scaled term) per trained token; on --eval-data, the student's KL to the
         teacher at T = 1 and its CE, before and after.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from minimind.checkpoint import Run, new_model
from minimind.config import PRESETS, ModelConfig, TrainConfig
from minimind.data.batch import IGNORE, Batch, Rows
from minimind.data.packing import PackedRows
from minimind.data.readers import iter_jsonl
from minimind.data.tokens import tokenize_files
from minimind.engine import Trainer
from minimind.errors import ConfigError, DataError
from minimind.losses import kd_kl_sum, token_cross_entropy_sum
from minimind.options import add_options, given, merge_options, opt
from minimind.stages.common import (
    SFT,
    add_conversation_arguments,
    add_stage_arguments,
    conversation_rows,
    fit_and_report,
    fresh_out,
    own_options,
    print_masks,
    run_info,
    stage_info,
    stage_options,
    start_from,
)
from minimind.teacher import HF, check_vocabulary, describe_kd, evaluate_kd, load_teacher
from minimind.tokenizer import Tokenizer

MODEL_SKIP = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings")


def add_arguments(p: Any) -> None:
    p.add_argument("--preset", choices=list(PRESETS), help="a fresh student of this shape (instead of --from)")
    add_stage_arguments(p, '.jsonl of {"conversations": [...]} or {"text": ...}, or .txt (one document per line)')
    add_conversation_arguments(p)
    add_options(p, DistillOptions, "distillation")
    add_options(p, ModelConfig, "student model overrides (with --preset)", skip=MODEL_SKIP)


@dataclass
class DistillOptions:
    """Options of the distillation loss; recorded in run.json so that --resume continues with the same ones."""

    teacher: str = opt("", "the teacher: a run, or a transformers model folder", metavar="RUN_DIR|hf:DIR")
    alpha: float = opt(0.5, "weight of the data's CE; 1 - alpha on KL")
    temperature: float = opt(1.5, "softens both distributions", metavar="T")
    kd: str = opt("forward", "KL(teacher||student) (forward) or the reverse", choices=["forward", "reverse"])
    format: str = opt("auto", "data kind (auto: judged by the files)", choices=["auto", "sft", "text"])

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("--teacher RUN_DIR (or hf:DIR) is required")
        check_options(self.alpha, self.temperature, self.kd)


def check_options(alpha: float, temperature: float, kd: str) -> None:
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--alpha must be between 0 and 1 (the weight of CE against KL), not {alpha}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive, not {temperature}")
    if kd not in ("forward", "reverse"):
        raise ConfigError(f"--kd must be forward or reverse, not {kd!r}")


# ---- the loss ---------------------------------------------------------------------------------


class DistillLoss:
    """The engine's loss: (alpha CE_sum + (1 - alpha) KL_sum over trained tokens, MoE balance loss,
    {"ce": CE_sum, "kl": KL_sum}). The teacher's logits are cut to the student's vocabulary."""

    def __init__(self, teacher: nn.Module, vocab_size: int, alpha: float, temperature: float, kd: str = "forward"):
        check_options(alpha, temperature, kd)
        self.teacher, self.vocab_size = teacher, vocab_size
        self.alpha, self.temperature, self.reverse = alpha, temperature, kd == "reverse"

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(batch.input_ids, segment_ids=batch.segment_ids)
        with torch.no_grad():
            teacher = self.teacher(batch.input_ids, segment_ids=batch.segment_ids).logits[..., : self.vocab_size]
        trained = batch.labels != IGNORE
        # A term with weight 0 is still measured, but without a graph behind it.
        ce = token_cross_entropy_sum(out.logits if self.alpha > 0 else out.logits.detach(), batch.labels)
        s = out.logits if self.alpha < 1 else out.logits.detach()
        kl = kd_kl_sum(s, teacher, trained, self.temperature, self.reverse)
        loss = self.alpha * ce + (1 - self.alpha) * kl
        return loss, out.aux_loss, {"ce": ce.detach(), "kl": kl.detach()}


# ---- data -------------------------------------------------------------------------------------


def data_format(paths: list[str], skip_bad_lines: bool = False) -> str:
    """'sft' or 'text': what the files hold, judged by the first record of each; all must agree."""
    kinds: dict[str, str] = {}
    for path in paths:
        if str(path).endswith(".txt"):
            kinds[str(path)] = "text"
            continue
        first = next(iter_jsonl(path, [] if skip_bad_lines else None), None)
        if first is None:
            raise DataError(f"{path}: no usable records")
        lineno, obj = first
        if "conversations" in obj:
            kinds[str(path)] = "sft"
        elif "text" in obj:
            kinds[str(path)] = "text"
        else:
            raise DataError(f'{path}:{lineno}: expected {{"conversations": [...]}} or {{"text": ...}} records')
    if len(set(kinds.values())) > 1:
        sft = [p for p, k in kinds.items() if k == "sft"]
        raise DataError(f"{sft[0]} holds conversations but other files hold text; distil one kind at a time")
    return next(iter(kinds.values()))


def text_rows(paths: list[str], tok: Tokenizer, cfg: TrainConfig, name: str = "data", skip: bool = False) -> PackedRows:
    """Rows of packed documents, every token trained (as `minimind pretrain` builds them)."""
    tokens = tokenize_files(paths, tok, cfg.cache_dir or None, skip)
    print(f"{name}: {tokens.num_documents:,} documents, {len(tokens.tokens):,} tokens")
    for message in tokens.skipped[:5]:
        print(f"  skipped {message}", file=sys.stderr)
    return PackedRows(tokens.tokens, tokens.offsets, cfg.max_seq_len, cfg.doc_mask)


def distill_rows(args: Any, cfg: TrainConfig, run: Run, fmt: str) -> tuple[Rows, Rows | None]:
    """Training rows (and held-out rows) of the data's kind."""
    if args.eval_data and data_format(args.eval_data) != fmt:
        raise ConfigError(f"--eval-data holds {data_format(args.eval_data)} data but --data {fmt}; give one kind")
    if fmt == "sft":
        return conversation_rows(args, cfg, run)
    held = text_rows(args.eval_data, run.tokenizer, cfg, "held-out") if args.eval_data else None
    return text_rows(args.data, run.tokenizer, cfg, skip=cfg.skip_bad_lines), held


# ---- the stage --------------------------------------------------------------------------------


def student_run(args: Any, cfg: TrainConfig, tok: Tokenizer) -> Run:
    """The student: the run being resumed, the --from run, or a fresh --preset sized to `tok`."""
    overrides = given(args, ModelConfig)
    if overrides and (cfg.resume or not args.preset):
        raise ConfigError(f"model overrides ({', '.join(overrides)}) shape a new --preset student only")
    if args.preset and (args.parent or cfg.resume):
        raise ConfigError("give --from RUN_DIR or --preset NAME for the student, not both (nor with --resume)")
    if cfg.resume or args.parent:
        return start_from(cfg, args.parent)
    if not args.preset:
        raise ConfigError("--from RUN_DIR or --preset NAME is required (the student), or --resume an existing --out")
    fresh_out(cfg.out)
    return Run(new_model(args.preset, tok, cfg.seed, cfg.max_seq_len, **overrides), tok, {"stage": "init"})


def defaults(args: Any, given: TrainConfig) -> dict[str, Any]:
    """A student from a run is fine-tuned (SFT's defaults); a fresh one is pretrained (the engine's)."""
    if args.parent:
        return SFT.for_run(args.parent)
    return {}


def prepare(args: Any) -> tuple[Trainer, Rows | None, DistillLoss]:
    """Everything `minimind distill` trains with: the engine (student, rows, loss) and held-out rows."""
    cfg = stage_options(args, lambda given: defaults(args, given))
    opts: DistillOptions = own_options(args, DistillOptions, "distill", run_info(cfg.out), cfg.resume)
    teacher, teacher_tok = load_teacher(opts.teacher)
    run = student_run(args, cfg, teacher_tok)
    check_vocabulary(opts.teacher, teacher, teacher_tok, run)
    if cfg.max_seq_len > run.cfg.max_position_embeddings:
        raise ConfigError(
            f"max_seq_len {cfg.max_seq_len} exceeds the student's max_position_embeddings "
            f"({run.cfg.max_position_embeddings})"
        )
    if opts.format == "auto":
        opts.format = data_format(args.data, cfg.skip_bad_lines)
    rows, eval_rows = distill_rows(args, cfg, run, opts.format)
    loss = DistillLoss(teacher, run.cfg.vocab_size, opts.alpha, opts.temperature, opts.kd)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(
        f"teacher {opts.teacher}: {n_teacher / 1e6:.2f}M params -> student {run.model.num_params() / 1e6:.2f}M; "
        f"{opts.kd} KL at T={opts.temperature:g}, alpha {opts.alpha:g} on "
        f"{'assistant tokens' if opts.format == 'sft' else 'every token'}"
    )
    info = stage_info("distill", cfg, run, args, distill=asdict(opts))
    trainer = Trainer(cfg, run.model.train(), run.tokenizer, rows, info, loss)
    teacher.to(trainer.device)
    return trainer, eval_rows, loss


def main(args: Any) -> None:
    if args.show_mask:  # inspect only: the teacher's tokenizer marks the distilled tokens
        cfg = merge_options(args, TrainConfig, SFT.options)
        if not args.data or not args.teacher:
            raise ConfigError("--show-mask needs --data and --teacher (for its tokenizer)")
        spec = args.teacher
        return print_masks(args, cfg, Tokenizer.load(spec[len(HF) :] if spec.startswith(HF) else spec))
    trainer, eval_rows, loss = prepare(args)
    check = None
    if eval_rows is not None:
        check = lambda: describe_kd(evaluate_kd(trainer.model, loss.teacher, eval_rows, trainer.device, trainer.dtype))
    fit_and_report(trainer, check, "trained tokens", label="held-out")
