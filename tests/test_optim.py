"""The optimizers and schedules (minimind/optim.py) and the engine's time budget and held-out log:
Muon's update against a hand computation, its AdamW half against torch's AdamW, the parameter groups,
a skipped non-finite step, WSD, exact resume (one process, DDP and FSDP2), --max-time, and val_loss
equal to `minimind eval --task ppl`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minimind.cli import main as cli
from minimind.config import ModelConfig, TrainConfig
from minimind.data.demo import write_demo_data
from minimind.errors import ConfigError
from minimind.model import MiniMind
from minimind.optim import Muon, lr_at, make_optimizer, newton_schulz, param_groups

SEQ = 32


def hand_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """X0 = G / ||G||_F; X <- a X + b (X X^T) X + c (X X^T)^2 X, on the wide orientation, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        xxt = x @ x.T
        x = a * x + b * xxt @ x + c * xxt @ xxt @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_muon_step_equals_a_hand_computed_newton_schulz_step(shape):
    torch.manual_seed(0)
    w0, g1, g2 = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    p = torch.nn.Parameter(w0.clone())
    lr, wd, mu = 0.01, 0.1, 0.95
    opt = Muon([{"params": [p], "muon": True}], lr=lr, weight_decay=wd, momentum=mu)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    # by hand: buffer B, Nesterov U, the orthogonalised U scaled to AdamW's RMS, decoupled decay
    w, b = w0.double().numpy(), np.zeros(shape)
    for g in (g1.double().numpy(), g2.double().numpy()):
        b = mu * b + (1 - mu) * g
        u = (1 - mu) * g + mu * b
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(shape)) * hand_newton_schulz(u)
    np.testing.assert_allclose(p.detach().double().numpy(), w, atol=2e-6)
    # and it is nearly orthogonal: singular values within Newton-Schulz's band
    s = torch.linalg.svdvals(newton_schulz(torch.randn(64, 32)))
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25, s


def tiny(vocab=256, **kw):
    torch.manual_seed(0)
    return MiniMind(ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, **kw))


def test_muon_groups_hold_the_hidden_matrices_and_adamw_the_rest():
    for model in (tiny(), tiny(tie_word_embeddings=False), tiny(use_moe=True, intermediate_size=64)):
        groups = param_groups(model, TrainConfig(out="x", optimizer="muon"))
        muon = {id(p) for g in groups if g.get("muon") for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in muon}
        every = [id(p) for g in groups for p in g["params"]]
        assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter once (tied: once)
        expected = {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
        assert names == expected and any(".mlp." in n for n in names) and any("q_proj" in n for n in names)
        adam_matrices = [g for g in groups if not g.get("muon") and g["weight_decay"] > 0][0]["params"]
        assert any(p is model.embed_tokens.weight for p in adam_matrices)
        assert model.cfg.tie_word_embeddings or any(p is model.lm_head.weight for p in adam_matrices)
        vectors = [g for g in groups if g["weight_decay"] == 0][0]["params"]
        assert vectors and all(p.dim() == 1 for p in vectors)
    adamw = param_groups(tiny(), TrainConfig(out="x"))
    assert not any(g.get("muon") for g in adamw) and len(adamw) == 2


def test_the_adamw_half_of_muon_equals_torch_adamw_and_a_nonfinite_step_is_skipped():
    cfg = TrainConfig(out="x", optimizer="muon", lr=1e-2)
    a, b = tiny(), tiny()
    ours = make_optimizer(a, cfg, torch.device("cpu"))
    groups = param_groups(b, cfg)  # the reference: torch's AdamW, beside Muon alone on the hidden matrices
    adamw = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if not g.get("muon")]
    ref = [torch.optim.AdamW(adamw, lr=1e-2, betas=(cfg.beta1, cfg.beta2)), Muon(groups[:1], lr=1e-2, weight_decay=0.1)]
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for model, opts in ((a, [ours]), (b, ref)):
            model(ids).logits.square().mean().backward()
            ours.found_inf = torch.zeros(())  # as the engine passes it
            for opt in opts:
                opt.step()
                opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    state = {k: v.clone() for s in ours.state.values() for k, v in s.items() if k == "step"}
    for p in a.parameters():
        p.grad = torch.full_like(p, float("nan"))
    ours.found_inf = torch.ones(())
    ours.step()
    assert all(torch.equal(before[n], p) for n, p in a.named_parameters())
    assert all(float(s["step"]) == 3 for s in ours.state.values() if "step" in s) and state


def test_wsd_holds_the_rate_then_decays_linearly_to_the_floor():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1, "wsd", 0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # warmup
    assert lrs[10:80] == [1.0] * 70  # stable
    assert all(x > y for x, y in zip(lrs[79:], lrs[80:]))  # decaying ...
    assert lrs[99] == pytest.approx(0.1)  # ... to lr * min_lr_ratio at the last step
    assert lrs[89] == pytest.approx(1 - 0.9 * 10 / 20)


def test_bad_options_are_refused():
    for kw, message in (
        ({"optimizer": "sgd"}, "optimizer must be adamw or muon"),
        ({"optimizer": "muon", "zero": 2}, "needs whole matrices"),
        ({"schedule": "linear"}, "schedule must be cosine or wsd"),
        ({"max_time": "soon"}, "give a positive time"),
        ({"max_time": "-5m"}, "give a positive time"),
        ({"decay_share": 0}, "decay_share"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(out="x", **kw).validate()
    assert TrainConfig(out="x", max_time="1.5h").time_budget() == 5400
    assert TrainConfig(out="x", max_time="90").time_budget() == 90


# ---- through the command ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    return write_demo_data(root / "data", scale=0.3), root


def pretrain_argv(setup, tokenizer_dir, out, *extra):
    files, root = setup
    argv = ["pretrain", "--data", files["pretrain"], "--tokenizer", tokenizer_dir, "--preset", "tiny"]
    argv += ["--hidden-size", 64, "--num-layers", 2, "--max-seq-len", SEQ, "--lr", 3e-3, "--warmup-steps", 0]
    argv += ["--min-lr-ratio", 1, "--log-every", 1, "--cache-dir", root / "cache", "--device", "cpu", "--out", out]
    return [str(a) for a in argv + [*extra]]


def launch(argv, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*launcher, "-m", "minimind", *argv], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def weights(run_dir):
    return load_file(run_dir / "model.safetensors")


def test_muon_resumes_exactly_and_fsdp_and_ddp_equal_one_process(setup, tokenizer_dir, tmp_path):
    """Muon, 4 steps: one process x batch 8 == 2 processes x batch 2 x accumulation 2 under DDP and
    FSDP2 (the whole matrix gathered for Newton-Schulz, each shard updated with its slice); stopped
    at step 2 and resumed, FSDP2 and one process each equal their straight run bit for bit."""
    argv = lambda out, *extra: pretrain_argv(setup, tokenizer_dir, tmp_path / out, "--optimizer", "muon", *extra)
    cli(argv("one", "--batch-size", 8, "--accumulation", 1, "--max-steps", 4))
    cli(argv("cut", "--batch-size", 8, "--accumulation", 1, "--max-steps", 2, "--save-every", 2))
    cli(
        [
            "pretrain",
            "--resume",
            "--data",
            str(setup[0]["pretrain"]),
            "--out",
            str(tmp_path / "cut"),
            "--max-steps",
            "4",
        ]
    )
    one, resumed = weights(tmp_path / "one"), weights(tmp_path / "cut")
    assert all(torch.equal(one[k], resumed[k]) for k in one), "Muon resume is not exact"
    launch(argv("fsdp", "--batch-size", 2, "--accumulation", 2, "--max-steps", 4, "--fsdp"), 2)
    launch(argv("ddp", "--batch-size", 2, "--accumulation", 2, "--max-steps", 4), 2)
    for name in ("fsdp", "ddp"):
        other = weights(tmp_path / name)
        for k in one:
            torch.testing.assert_close(other[k], one[k], atol=5e-5, rtol=1e-4, msg=f"{name}: {k}")
    launch(argv("fsdp-cut", "--batch-size", 2, "--accumulation", 2, "--max-steps", 2, "--save-every", 2, "--fsdp"), 2)
    resume = ["pretrain", "--resume", "--data", setup[0]["pretrain"], "--out", tmp_path / "fsdp-cut"]
    launch([str(a) for a in resume + ["--max-steps", 4, "--device", "cpu", "--fsdp"]], 2)
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "fsdp-cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "Muon resume under FSDP2 is not exact"


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_max_time_ends_the_schedule_at_the_budget_with_a_complete_checkpoint(setup, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "timed"
    cli(pretrain_argv(setup, tokenizer_dir, out, "--epochs", 1000, "--max-time", "6s", "--schedule", "wsd",
                      "--batch-size", 4, "--eval-data", setup[0]["pretrain_heldout"], "--eval-every", 10))  # fmt: skip
    log = records(out)
    train = [r for r in log if "loss" in r]
    steps = train[-1]["step"]
    pace = (train[-1]["elapsed_s"] - train[1]["elapsed_s"]) / (steps - 2)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == steps and 10 < steps < 1000 * 10  # stopped by the clock, not the epochs
    assert state["elapsed_s"] <= 6 + 2 * pace, (state["elapsed_s"], pace)  # within a step (and the save)
    assert state["elapsed_s"] >= 6 - 3 * pace - 1.0, (state["elapsed_s"], pace)
    lrs = [r["lr"] for r in train]
    assert lrs[-1] == pytest.approx(3e-3, rel=0.02)  # min-lr-ratio 1: the floor is the peak here
    # the run directory is complete: it loads and resumes
    assert weights(out).keys() and (out / "config.json").is_file()
    val = [r for r in log if "val_loss" in r]
    assert val and val[-1]["step"] == steps and val[-1]["elapsed_s"] <= state["elapsed_s"]


def test_val_loss_in_metrics_equals_eval_ppl(setup, tokenizer_dir, tmp_path, capsys):
    out, held = tmp_path / "run", setup[0]["pretrain_heldout"]
    cli(pretrain_argv(setup, tokenizer_dir, out, "--max-steps", 12, "--batch-size", 4, "--eval-data", held,
                      "--eval-every", 5))  # fmt: skip
    val = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [5, 10, 12]
    assert val[0]["val_loss"] > val[-1]["val_loss"]  # it learns
    capsys.readouterr()
    report = tmp_path / "ppl.json"
    cli(["eval", str(out), "--task", "ppl", "--data", str(held), "--max-seq-len", str(SEQ), "--out", str(report)])
    figures = json.loads(report.read_text())["metrics"]
    assert val[-1]["val_loss"] == pytest.approx(figures["nll"], abs=2e-6)
    assert val[-1]["val_bpb"] == pytest.approx(figures["bpb"], abs=2e-6)


def test_eval_every_needs_held_out_data(setup, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(pretrain_argv(setup, tokenizer_dir, tmp_path / "x", "--max-steps", 2, "--eval-every", 1))
    assert "--eval-every needs --eval-data" in capsys.readouterr().err


def test_pretraining_defaults_by_preset_and_resume_keeps_the_optimizer(tmp_path):
    from minimind.cli import build_parser
    from minimind.stages import pretrain
    from minimind.stages.common import saved_train_config

    def options(*extra):
        argv = ["pretrain", "--data", "x.jsonl", "--out", str(tmp_path / "run"), *extra]
        return pretrain.options(build_parser("pretrain").parse_args(argv))

    small = options("--preset", "minimind2-small")
    assert (small.optimizer, small.schedule, small.lr) == ("muon", "wsd", 2e-3)
    assert options("--preset", "minimind2-small", "--optimizer", "adamw", "--lr", "1e-3").optimizer == "adamw"
    tiny_run = options("--preset", "tiny")
    assert (tiny_run.optimizer, tiny_run.schedule, tiny_run.lr) == ("adamw", "cosine", 5e-4)
    # a run saved before --optimizer existed resumes with what it trained with
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps({"train_config": {"lr": 2e-3, "max_seq_len": 64}}))
    assert saved_train_config(tmp_path / "old") == {"optimizer": "adamw", "schedule": "cosine", "lr": 2e-3,
                                                    "max_seq_len": 64}  # fmt: skip
