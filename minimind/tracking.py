"""Where a run's progress goes besides the terminal: metrics.jsonl (always), the loss plot, and the
optional trackers (Weights & Biases, SwanLab, TensorBoard), each behind the same two calls."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minimind.config import TrainConfig
from minimind.errors import ConfigError
from minimind.fileio import atomic_write, atomic_write_text

METRICS = "metrics.jsonl"


class Tracker:
    """A tracker as the engine uses it: `log` a record at a step, `close` at the end."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoard(Tracker):
    def log(self, record: dict[str, float], step: int) -> None:
        for k, v in record.items():
            self.run.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.run.close()


def open_trackers(cfg: TrainConfig, out: Path) -> list[Tracker]:
    """The trackers the flags ask for; a clear error when one is not installed."""
    trackers: list[Tracker] = []
    if cfg.wandb:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs `pip install wandb`") from None
        trackers.append(Tracker(wandb.init(project="minimind", name=out.name, config=asdict(cfg), dir=str(out))))
    if cfg.swanlab:
        try:
            import swanlab
        except ImportError:
            raise ConfigError("--swanlab needs `pip install swanlab`") from None
        # Cloud only when asked for (SWANLAB_MODE=cloud, or an API key in the environment): an
        # interactive login prompt must never stall a training job.
        mode = os.environ.get("SWANLAB_MODE") or ("cloud" if os.environ.get("SWANLAB_API_KEY") else "offline")
        run = swanlab.init(
            project="minimind", experiment_name=out.name, config=asdict(cfg), logdir=str(out / "swanlog"), mode=mode
        )
        trackers.append(Tracker(run))
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs `pip install tensorboard`") from None
        trackers.append(TensorBoard(SummaryWriter(str(out / "tensorboard"))))
    return trackers


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(out: Path, step: int) -> None:
    """On resume, drop logged steps after the checkpoint (they will be trained again)."""
    path = out / METRICS
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot(out: Path, title: str) -> Path | None:
    """loss.png from metrics.jsonl: the training loss and, when logged, the held-out loss (skipped when
    matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    held = [r for r in records if "val_loss" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["val_loss"] for r in held], "o-", label="held-out loss (val_loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "loss.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
