"""DPO: the loss against hand-computed values, which tokens are compared, bad input, that a few steps
raise the held-out reward margin and accuracy, precomputed == live reference, and exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file

from minimind.cli import build_parser
from minimind.data.preference import PairRows, read_preferences
from minimind.errors import DataError
from minimind.losses import dpo_loss
from minimind.stages import dpo

Q, A = [{"role": "user", "content": "Where does Mia live?"}], "Mia lives in Oakvale."


def msgs(*turns: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_dpo_loss_equals_hand_computed_values():
    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) = [0.5 + 0.5, -1 - 1] = [1, -2]
    loss, r_w, r_l = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    expected = [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.2))]  # -log sigmoid(0.1 h)
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(r_w, torch.tensor([0.05, -0.1]))
    torch.testing.assert_close(r_l, torch.tensor([-0.05, 0.1]))
    ipo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, kind="ipo")
    torch.testing.assert_close(ipo, torch.tensor([(1 - 5.0) ** 2, (-2 - 5.0) ** 2]))  # (h - 1/(2 beta))^2
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, kind="hinge")


def test_ipo_compares_mean_token_logprobs():
    """IPO (Azar et al. 2023, as TRL) uses each reply's mean token log-prob: replies twice as long with
    the same per-token log-probs leave the IPO loss unchanged; sigmoid DPO (sums) sees h double."""
    from types import SimpleNamespace

    from minimind.data.preference import PairBatch

    V, prompt, good, bad = 8, [1, 2], 3, 4
    bias = torch.zeros(V)
    bias[good], bias[bad] = 2.0, -1.0

    def policy(ids):  # the same next-token distribution everywhere; the reference is uniform
        return SimpleNamespace(logits=bias.expand(*ids.shape, V).clone(), aux_loss=torch.zeros(()))

    def reference(ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, V), aux_loss=torch.zeros(()))

    def pair(reply_len):
        rows = [prompt + [good] * reply_len, prompt + [bad] * reply_len]  # chosen, rejected
        ids = torch.tensor(rows)
        labels = ids[:, 1:].clone()
        labels[:, : len(prompt) - 1] = -100
        return PairBatch(ids[:, :-1], labels)

    losses = {}
    for kind in ("sigmoid", "ipo"):
        fn = dpo.DPOLoss(0.1, kind, length_norm=False, reference=reference)
        losses[kind] = [float(fn(policy, pair(n))[0]) for n in (3, 6)]
    assert math.isclose(losses["ipo"][0], losses["ipo"][1], rel_tol=1e-6)
    assert abs(losses["sigmoid"][0] - losses["sigmoid"][1]) > 1e-2
    h = float(torch.log_softmax(bias, 0)[good] - torch.log_softmax(bias, 0)[bad])  # per token; ref cancels
    assert math.isclose(losses["ipo"][0], (h - 1 / (2 * 0.1)) ** 2, rel_tol=1e-5)
    assert dpo.length_normalised("ipo", False) and not dpo.length_normalised("sigmoid", False)


def test_nll_weight_adds_the_chosen_replies_mean_token_nll(tokenizer, tmp_path):
    """RPO: L = L_DPO + w * (-log pi(y_w) / |y_w|) per pair, checked against the pieces."""
    path_pairs = [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6. I think."},
        {"prompt": "Where does Mia live?", "chosen": "Mia lives in Oakvale.", "rejected": "No idea."},
    ]
    data = read_preferences([write(tmp_path / "p.jsonl", path_pairs)], tokenizer, 128)
    rows = PairRows(data, 127, tokenizer.pad_id)
    batch = rows.batch(np.array([0, 1]))
    batch.ref_logps = torch.tensor([-9.0, -8.0, -7.0, -6.0])
    model = sharp_model(vocab_size=tokenizer.vocab_size).requires_grad_(False)
    plain, _, _ = dpo.DPOLoss(0.1, "sigmoid", False)(model, batch)
    with_nll, _, _ = dpo.DPOLoss(0.1, "sigmoid", False, nll_weight=0.5)(model, batch)
    logp, _ = dpo.reply_logps(model, batch, length_norm=False)
    n = (batch.labels[:2] != -100).sum(-1)
    assert n.tolist() == [len(tokenizer.encode(p["chosen"])) + 1 for p in path_pairs]  # reply + <|im_end|>
    torch.testing.assert_close(with_nll - plain, 0.5 * (-logp[:2] / n).sum())


def test_only_the_final_reply_is_compared(tokenizer, tmp_path):
    """Log-probs cover exactly the last reply and its <|im_end|> (not the earlier assistant turn), in
    both input forms, through right padding: checked against a manual sum on the unpadded sequence."""
    prompt = msgs("Where does Mia live?", "Mia lives in Oakvale.", "And Leo?", system="Be brief.")
    path = write(
        tmp_path / "p.jsonl",
        [
            {"chosen": prompt + msgs("x", "Leo lives in Sunhill.")[1:], "rejected": prompt + [msgs("x", "No.")[1]]},
            {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6. I think."},
        ],
    )
    data = read_preferences([path], tokenizer, 200)
    rows = PairRows(data, 199, tokenizer.pad_id)
    batch = rows.batch(np.array([0, 1]))
    assert batch.pairs == 2 and batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] % 8 == 0
    model = sharp_model(vocab_size=tokenizer.vocab_size).requires_grad_(False)
    logp, _ = dpo.reply_logps(model, batch, length_norm=False)
    cases = [
        (prompt, "Leo lives in Sunhill."),
        (msgs("What is 2 + 3?"), "2 + 3 = 5."),
        (prompt, "No."),
        (msgs("What is 2 + 3?"), "2 + 3 = 6. I think."),
    ]
    for j, (p, reply) in enumerate(cases):
        head = tokenizer.encode_chat(p, add_generation_prompt=True)
        ids = tokenizer.encode(reply) + [tokenizer.eos_id]
        logits = model(torch.tensor([head + ids])).logits[0].log_softmax(-1)
        manual = sum(float(logits[len(head) - 1 + k, t]) for k, t in enumerate(ids))
        assert math.isclose(float(logp[j]), manual, rel_tol=1e-5, abs_tol=1e-4), (j, float(logp[j]), manual)
        assert int((batch.labels[j] != -100).sum()) == len(ids)
    normed, _ = dpo.reply_logps(model, batch, length_norm=True)
    torch.testing.assert_close(normed, logp / (batch.labels != -100).sum(-1))


def test_long_pairs_are_cut_or_dropped_and_counted(tokenizer, tmp_path):
    long_reply = " ".join(["Mia lives in Oakvale."] * 30)
    path = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Where does Mia live?", "chosen": long_reply, "rejected": "Oakvale."},
            {"prompt": " ".join(["Where does Mia live?"] * 40), "chosen": "Oakvale.", "rejected": "Sunhill."},
            {"prompt": "Where does Mia live?", "chosen": "Oakvale.", "rejected": "Sunhill."},
        ],
    )
    dpo_data = read_preferences([path], tokenizer, 65, cut_replies=True)
    assert (len(dpo_data), dpo_data.truncated, dpo_data.dropped) == (2, 1, 1)
    assert max(np.diff(dpo_data.offsets)) == 65 and "1 dropped" in dpo_data.report()
    rm_data = read_preferences([path], tokenizer, 65, cut_replies=False)  # the RM needs whole pairs
    assert (len(rm_data), rm_data.truncated, rm_data.dropped) == (1, 0, 2)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chosen": msgs("Where does Mia live?", A), "rejected": msgs("Where does Leo live?", A)}, "same prompt"),
        ({"rejected": msgs("Where does Mia live?", A)}, "missing 'chosen'"),
        ({"chosen": msgs("Q?", A), "rejected": msgs("Q?", A, "And Leo?")}, "rejected: the conversation ends on a user"),
        ({"prompt": "  ", "chosen": A, "rejected": "Sunhill."}, "'prompt' is empty"),
        ({"chosen": A, "rejected": "Sunhill."}, "'chosen' is a str"),
        ({"prompt": "Q?", "chosen": "", "rejected": "Sunhill."}, "chosen: message 2 (assistant) has empty content"),
    ],
)
def test_bad_pairs_name_file_and_line(tokenizer, tmp_path, record, message):
    good = {"chosen": msgs("Q?", A), "rejected": msgs("Q?", "No.")}
    path = write(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError) as e:
        read_preferences([path], tokenizer, 128)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    skipping = read_preferences([path], tokenizer, 128, skip_bad_lines=True)
    assert len(skipping) == 1 and len(skipping.skipped) == 1


def dpo_argv(pipeline, out, *extra, data=None) -> list[str]:
    data = data or pipeline["files"]["dpo"]
    argv = ["dpo", "--from", pipeline["sft"], "--data", data, "--out", out, "--max-seq-len", 64]
    return [str(a) for a in argv + ["--log-every", 10, "--seed", 0, *extra]]


def dpo_args(pipeline, out, *extra, data=None):
    return build_parser("dpo").parse_args(dpo_argv(pipeline, out, *extra, data=data))


def test_a_few_steps_raise_heldout_margin_and_accuracy(pipeline, tmp_path):
    args = dpo_args(pipeline, tmp_path / "dpo", "--eval-data", pipeline["files"]["dpo_heldout"], "--max-steps", 40)
    trainer, held, loss = dpo.prepare(args)
    assert trainer.cfg.lr == dpo.DPO.lrs["tiny"] and loss.beta == 0.1  # the defaults for the tiny preset
    before = dpo.evaluate(trainer, held, loss)
    # Policy == reference: every implicit reward is exactly 0.
    assert before["reward_margin"] == 0 and before["reward_acc"] == 0 and before["loss"] == pytest.approx(math.log(2))
    trainer.fit()
    after = dpo.evaluate(trainer, held, loss)
    assert after["reward_margin"] > 0.2 and after["reward_acc"] > 0.55 and after["loss"] < 0.65, after
    # It sharpens preferences without wrecking the model: the policy still prefers chosen as often.
    # Measured: -0.02 and -0.08 on two pipelines (NOTES.md, session 9): a guard at 2.5x the larger drop.
    assert after["prefers_chosen"] >= before["prefers_chosen"] - 0.2, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_acc", "logp_chosen", "logp_rejected"} <= logged[-1].keys()
    assert logged[-1]["loss"] < logged[0]["loss"] < 0.7


def test_precomputed_reference_equals_live_reference(pipeline, tmp_path):
    live, _, live_loss = dpo.prepare(dpo_args(pipeline, tmp_path / "live", "--max-steps", 4))
    pre, _, pre_loss = dpo.prepare(dpo_args(pipeline, tmp_path / "pre", "--max-steps", 4, "--precompute-ref"))
    assert live_loss.reference is not None and pre_loss.reference is None  # only the policy is kept
    assert pre.rows.ref_logps is not None and pre.rows.ref_logps.shape == (len(pre.rows), 2)
    # The same batch: the live reference's log-probs and the precomputed ones.
    batch = pre.rows.batch(np.array([5, 0, 17, 3]))
    assert batch.ref_logps is not None
    with torch.no_grad():
        live_ref, _ = dpo.reply_logps(live_loss.reference, batch, False)
    torch.testing.assert_close(live_ref, batch.ref_logps, rtol=1e-6, atol=1e-5)
    # Training: the same losses, step by step (bitwise on this machine; float32 rounding at most).
    for _ in range(4):
        a, b = live.train_step()[0], pre.train_step()[0]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert a < 0.69 * 8  # the summed loss of 8 pairs has moved off log 2


def test_dpo_resume_is_bitwise_exact(pipeline, tmp_path):
    """8 steps straight (CLI) == 4 steps, killed, `--resume` (CLI, without the DPO flags: they are
    restored from run.json), 4 more: identical weights."""
    data = tmp_path / "pairs.jsonl"  # a small file: three processes precompute its reference log-probs
    data.write_text("".join(pipeline["files"]["dpo"].read_text().splitlines(keepends=True)[:96]))
    extra = ["--max-steps", 8, "--warmup-steps", 2, "--log-every", 2, "--beta", 0.2, "--precompute-ref"]
    extra += ["--nll-weight", 0.3]
    _run_cli(*dpo_argv(pipeline, tmp_path / "straight", *extra, data=data))
    interrupted, _, loss = dpo.prepare(dpo_args(pipeline, tmp_path / "split", *extra, data=data))
    assert loss.beta == 0.2
    while interrupted.step < 4:
        interrupted.train_step()
    interrupted.save()  # the process dies here
    common = ["--data", data, "--max-seq-len", 64, "--seed", 0]
    log = _run_cli("dpo", "--out", tmp_path / "split", "--resume", *common)
    assert "resuming at step 4" in log and "computed once" in log
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "split" / "run.json").read_text())
    assert (
        info["stage"] == "dpo"
        and info["dpo"]["beta"] == 0.2
        and info["dpo"]["nll_weight"] == 0.3
        and info["reference"] == str(pipeline["sft"])
    )
