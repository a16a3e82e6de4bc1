"""A reward model: MiniMind with a scalar head on the hidden state of the last token.

    r(x, y) = w . h(last token of the conversation)      (the final reply's closing <|im_end|>)

`minimind reward` trains it with the Bradley–Terry loss on preference pairs; the RL stages load it
with `load_reward_model(RUN_DIR)` (`--reward rm:RUN_DIR`) and call `score(...)`. Its run directory is
an ordinary one (config.json, tokenizer files, run.json with stage "reward"); model.safetensors holds
the backbone under its usual tensor names plus `reward_head.weight`, and is loaded strictly.

Example:
    model, tok = load_reward_model("runs/rm")
    score(model, tok, [[{"role": "user", "content": "What is 2 + 3?"},
                        {"role": "assistant", "content": "2 + 3 = 5."}]])   # one float per conversation
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minimind.checkpoint import RUN_INFO, WEIGHTS, load_config, load_weights
from minimind.config import ModelConfig
from minimind.data.chat import encode_conversations
from minimind.errors import CheckpointError
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer


class RewardModel(MiniMind):
    """The transformer without its LM head's job: one number per sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.reward_head = nn.Linear(cfg.hidden_size, 1, bias=False)  # a bias cancels in r_w - r_l
        nn.init.normal_(self.reward_head.weight, mean=0.0, std=0.02)

    @classmethod
    def from_backbone(cls, backbone: MiniMind) -> RewardModel:
        """A reward model whose transformer is `backbone`'s (strict: every tensor accounted for)."""
        model = cls(backbone.cfg)
        head = {"reward_head.weight": model.reward_head.weight.detach().clone()}
        model.load_state_dict({**backbone.state_dict(), **head}, strict=True)
        return model

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, *, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward per row (B,) in float32, MoE balance loss) for right-padded rows with `lengths` real
        tokens each. Causal attention: no real token sees the padding, so no mask is needed."""
        out = super().forward(input_ids, logits_to_keep=1, return_hidden=True)
        assert out.hidden is not None
        last = out.hidden[torch.arange(len(input_ids), device=input_ids.device), lengths - 1]
        return self.reward_head(last).squeeze(-1).float(), out.aux_loss


class ValueOutput:
    """A critic's forward: values (B, T) float32 and the MoE balance loss."""

    def __init__(self, values: torch.Tensor, aux_loss: torch.Tensor):
        self.values, self.aux_loss = values, aux_loss


def token_values(model: RewardModel, input_ids: torch.Tensor) -> ValueOutput:
    """The head at every position: V(s_t) for the prefix ending at each token (PPO's critic)."""
    out = MiniMind.forward(model, input_ids, logits_to_keep=1, return_hidden=True)
    assert out.hidden is not None
    return ValueOutput(model.reward_head(out.hidden).squeeze(-1).float(), out.aux_loss)


def load_reward_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
    """(reward model in eval mode on `device`, tokenizer) of a run written by `minimind reward`."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_INFO
    stage = json.loads(info_path.read_text(encoding="utf-8")).get("stage") if info_path.is_file() else None
    if stage != "reward":
        raise CheckpointError(
            f"{run_dir}: not a reward model (run.json stage is {stage!r}); train one with `minimind reward`"
        )
    model = RewardModel(load_config(run_dir))
    load_weights(model, run_dir / WEIGHTS)
    return model.to(device).eval(), Tokenizer.load(run_dir)


@torch.no_grad()
def score(
    model: RewardModel, tokenizer: Tokenizer, conversations: list[list[dict]], batch_size: int = 16
) -> list[float]:
    """The reward of each conversation (each ends with the assistant reply to judge).

    Rendered exactly as in training (ChatML, each message closed by <|im_end|>); a conversation longer
    than the model's positions keeps its last tokens. Runs in batches on the model's device.
    """
    for i, c in enumerate(conversations):
        if not c or c[-1].get("role") != "assistant":
            raise ValueError(f"conversation {i + 1}: must end with the assistant reply to score")
    keep = model.cfg.max_position_embeddings
    seqs = [ids[-keep:] for ids, _, _ in encode_conversations(tokenizer, conversations)]  # type: ignore[misc]
    device = next(model.parameters()).device
    rewards: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = torch.full((len(chunk), max(len(s) for s in chunk)), tokenizer.pad_id, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.from_numpy(s)
        lengths = torch.tensor([len(s) for s in chunk])
        r, _ = model(ids.to(device), lengths=lengths.to(device))
        rewards += r.tolist()
    return rewards
