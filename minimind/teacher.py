"""Teachers for knowledge distillation: a MiniMind run or a transformers causal LM (hf:DIR) behind one
call, `teacher(input_ids, segment_ids=...).logits`, the one-tokenizer check, and the student's KL to
the teacher on held-out rows (what `minimind distill --eval-data` and the demo report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minimind.checkpoint import Run, load_run
from minimind.data.batch import IGNORE, Rows
from minimind.engine import autocast
from minimind.errors import CheckpointError, ConfigError
from minimind.losses import kd_kl_sum, token_cross_entropy_sum
from minimind.model import MiniMind, positions_from
from minimind.tokenizer import Tokenizer

HF = "hf:"


class HFTeacher(nn.Module):
    """A transformers causal LM behind MiniMind's call: `teacher(input_ids, segment_ids=...).logits`.

    Packed rows: positions restart at each document, and transformers (>= 4.56, masking_utils)
    reads restarting position ids as packed sequences and keeps attention inside each, as our
    segment ids do. `vocab_size` counts its logits, which may be padded past the tokenizer's ids.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    def forward(self, input_ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None) -> Any:
        positions = positions_from(input_ids.shape[1], 0, None, segment_ids, input_ids.device)
        if segment_ids is not None:
            positions = positions.expand_as(input_ids)
        return self.hf(input_ids=input_ids, position_ids=positions, use_cache=False)


def load_hf_teacher(path: Path) -> tuple[HFTeacher, Tokenizer]:
    where = f"--teacher {HF}{path}"
    try:
        from transformers import AutoModelForCausalLM, masking_utils
    except ImportError:
        raise ConfigError(f"{where}: needs `pip install transformers`") from None
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ConfigError(f"{where}: needs transformers >= 4.56 (packed rows keep attention per document)")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{where}: no tokenizer.json (the student is built on the teacher's tokenizer)")
    try:
        tok = Tokenizer.load(path)
    except ConfigError as e:  # e.g. no <|im_start|>/<|im_end|>: the rows are built with ChatML control tokens
        raise ConfigError(f"{where}: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: not a transformers causal LM folder ({reason})") from None
    return HFTeacher(model), tok


def load_teacher(spec: str) -> tuple[nn.Module, Tokenizer]:
    """The frozen teacher (CPU, float32, eval mode, requires_grad False) and its tokenizer, from a run
    directory or hf:DIR. Either is called as `teacher(input_ids, segment_ids=...).logits`."""
    path = Path(spec[len(HF) :] if spec.startswith(HF) else spec)
    if not path.is_dir():
        raise ConfigError(f"--teacher {spec}: no such directory")
    if spec.startswith(HF):
        model, tok = load_hf_teacher(path)
    else:
        try:
            run = load_run(path)
        except CheckpointError as e:
            if "not a MiniMind config" in str(e):
                hint = f"not a MiniMind run; a transformers folder is --teacher hf:{spec}"
                raise ConfigError(f"--teacher {spec}: {hint}") from None
            raise
        model, tok = run.model, run.tokenizer
    return model.eval().requires_grad_(False), tok


def teacher_vocab(teacher: nn.Module) -> int:
    return teacher.cfg.vocab_size if isinstance(teacher, MiniMind) else teacher.vocab_size


def check_vocabulary(spec: str, teacher: nn.Module, teacher_tok: Tokenizer, student: Run) -> None:
    """One tokenizer for both (KL compares distributions id by id). A run teacher has exactly the
    student's logits; an hf: teacher may have more (padding past the tokenizer), which are dropped."""
    ours, theirs = student.tokenizer.backend.get_vocab(True), teacher_tok.backend.get_vocab(True)
    if ours != theirs:
        raise ConfigError(
            f"--teacher {spec}: its tokenizer ({len(theirs)} ids) differs from the student's ({len(ours)} ids); "
            "distillation needs one tokenizer (start the student with --preset to use the teacher's)"
        )
    n_teacher, n_student = teacher_vocab(teacher), student.cfg.vocab_size
    if n_teacher < n_student or (n_teacher != n_student and not spec.startswith(HF)):
        raise ConfigError(
            f"--teacher {spec}: its vocabulary ({n_teacher} logits) differs from the student's ({n_student})"
        )


@torch.no_grad()
def evaluate_kd(
    student: nn.Module,
    teacher: nn.Module,
    rows: Rows,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    max_rows: int = 256,
) -> dict[str, float]:
    """Per trained token over the first `max_rows` rows: the student's KL(p_teacher || p_student) at
    T = 1 ("kl") and its cross-entropy on the data ("ce"), plus the token count. Both models on `device`;
    the teacher's logits are cut to the student's vocabulary."""
    device = device or next(student.parameters()).device
    was_training = student.training
    student.eval()
    vocab = student.cfg.vocab_size
    sums, n, count = {"kl": 0.0, "ce": 0.0}, min(len(rows), max_rows), 0
    for start in range(0, n, batch_size):
        batch = rows.batch(np.arange(start, min(n, start + batch_size))).to(device)
        count += batch.num_tokens
        with autocast(device, dtype):
            logits = student(batch.input_ids, segment_ids=batch.segment_ids).logits
            target = teacher(batch.input_ids, segment_ids=batch.segment_ids).logits[..., :vocab]
            sums["ce"] += float(token_cross_entropy_sum(logits, batch.labels))
            sums["kl"] += float(kd_kl_sum(logits, target, batch.labels != IGNORE, 1.0, False))
    student.train(was_training)
    return {"kl": sums["kl"] / max(count, 1), "ce": sums["ce"] / max(count, 1), "tokens": float(count)}


def describe_kd(m: dict[str, float]) -> str:
    return f"KL to teacher {m['kl']:.4f}, CE {m['ce']:.4f} nats/token ({int(m['tokens']):,} trained tokens)"
