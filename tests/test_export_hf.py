"""`minimind export --format hf` and `--from HF_DIR`: transformers computes our logits on the export,
AutoTokenizer gives our chat ids, the round trip is exact, and every refusal is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import sharp_model
from safetensors import safe_open
from safetensors.torch import save_file

from minimind.checkpoint import Run, load_run
from minimind.cli import main
from minimind.errors import CheckpointError, ConfigError
from minimind.export.hf import GRANITE, LLAMA, QWEN3, QWEN3_MOE, export_hf, hf_tensors

transformers = pytest.importorskip("transformers")

CASES = {  # name: (conftest config, overrides, architecture the export must pick)
    "plain": ("gqa", {}, LLAMA),
    "qk_norm": ("qk_norm", {}, QWEN3),
    "yarn": ("yarn", {}, LLAMA),
    "yarn_qk_untied": ("yarn", dict(qk_norm=True, tie_word_embeddings=False, rope_attention_factor=1.3), QWEN3),
    "moe_top1": ("moe_top1", {}, QWEN3_MOE),  # norm_topk_prob false
    "moe_top2_renorm": ("moe_top1", dict(num_experts_per_tok=2, norm_topk_prob=True, aux_loss_coef=0.5), QWEN3_MOE),
    "moe_top2_plain": ("moe_top1", dict(num_experts_per_tok=2, norm_topk_prob=False, aux_loss_coef=0.0), QWEN3_MOE),
    "moe_shared": ("moe", {}, GRANITE),
    "moe_2shared": ("moe", dict(num_shared_experts=2), GRANITE),
}
CHATS = [
    [{"role": "user", "content": "Hello, 你好 12345!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Where does Mia live?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "And 小明养了什么？"},
    ],
]


def tiny(tokenizer, name: str, **overrides) -> Run:
    return Run(sharp_model(name, vocab_size=tokenizer.vocab_size, **overrides), tokenizer, {"stage": "sft"})


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def logits(run: Run, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run.model(ids).logits


def assert_same_weights(a: Run, b: Run) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_and_round_trips(case, tokenizer, tmp_path):
    name, overrides, arch = CASES[case]
    run = tiny(tokenizer, name, **overrides)
    out = tmp_path / "hf"
    export_hf(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and config["dtype"] == config["torch_dtype"] == "float32"
    if arch == QWEN3_MOE:  # per-expert tensors on disk, as real Qwen3-MoE checkpoints have them
        assert config["num_experts"] == config["num_local_experts"] == run.cfg.num_experts
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "model.layers.1.mlp.experts.3.up_proj.weight" in f.keys()
    if run.cfg.rope_scaling == "yarn":  # transformers 4 takes factor = max_position_embeddings / original
        rope = config["rope_scaling"]
        assert config["max_position_embeddings"] == rope["original_max_position_embeddings"] * rope["factor"]
        assert config["rope_parameters"]["factor"] == rope["factor"] == run.cfg.rope_factor
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    ours = logits(run, ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=1e-4, rtol=0)

    back = load_run(out)  # exact: minimind.json carries the config and run record
    assert back.cfg == run.cfg and back.is_chat and back.info["stage"] == "sft"
    assert_same_weights(back, run)
    (out / "minimind.json").unlink()  # from config.json alone: the same model
    plain = load_run(out)
    assert plain.info["architecture"] == arch
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-6, rtol=0)


def test_yarn_export_reads_the_same_under_transformers_4s_rule(tokenizer, tmp_path):
    """transformers 4 ignores YaRN's `factor` when original_max_position_embeddings is given and takes
    max_position_embeddings / original instead; transformers 5 does the same when `factor` is null.
    The export (our table: 512 positions, original 32, factor 4) must give our logits either way."""
    run = tiny(tokenizer, "yarn")
    assert run.cfg.max_position_embeddings == 512  # not 32 x 4: the case that used to differ
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        config[key]["factor"] = None
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, tokenizer.vocab_size, (2, 100))  # well past the original 32 positions
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), logits(run, ids), atol=1e-4, rtol=0)


def test_norm_topk_prob_matters_and_is_carried(tokenizer, tmp_path):
    """The two MoE routings give different outputs, so the parity above checks the flag itself."""
    ids = torch.randint(0, tokenizer.vocab_size, (1, 32))
    outs = []
    for norm in (True, False):
        torch.manual_seed(0)
        export_hf(tiny(tokenizer, "moe_top1", num_experts_per_tok=2, norm_topk_prob=norm), tmp_path / str(norm))
        outs.append(hf_logits(tmp_path / str(norm), ids))
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_chat_template_ids_match_through_autotokenizer(tokenizer, tmp_path):
    export_hf(tiny(tokenizer, "gqa"), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for messages in CHATS:
        for thinking in (None, True, False):
            kwargs = {} if thinking is None else {"enable_thinking": thinking}
            for prompt in (True, False):
                got = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, **kwargs)
                got = got["input_ids"] if hasattr(got, "keys") else got  # transformers 5 returns a BatchEncoding
                assert got == tokenizer.encode_chat(messages, add_generation_prompt=prompt, enable_thinking=thinking)
    text = "Hello, 你好 12345! <think>x</think>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id and hf_tok.pad_token_id == tokenizer.pad_id
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tokenizer.stop_ids) and generation["top_k"] == 0


def test_transformers_own_save_loads_back(tokenizer, tmp_path):
    """A folder transformers itself wrote (rope_parameters, chat_template.jinja, tokenizer class
    TokenizersBackend, no minimind.json) loads as the same model with the same chat template."""
    run = tiny(tokenizer, "moe_top1")
    export_hf(run, tmp_path / "ours")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "theirs")
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours")).save_pretrained(tmp_path / "theirs")
    back = load_run(tmp_path / "theirs")
    assert back.tokenizer.chat_template == tokenizer.chat_template
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    torch.testing.assert_close(logits(back, ids), logits(run, ids), atol=1e-6, rtol=0)


def test_bfloat16_export(tokenizer, tmp_path):
    run = tiny(tokenizer, "qk_norm")
    with pytest.raises(ConfigError, match="--dtype f16 is not one of float32, bfloat16, float16 for --format hf"):
        export_hf(run, tmp_path / "hf", dtype="f16")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary folder left
    export_hf(run, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    back = load_run(tmp_path / "hf")
    rounded = run.model.embed_tokens.weight.detach().to(torch.bfloat16).float()
    assert back.cfg == run.cfg and torch.equal(back.model.embed_tokens.weight, rounded)


def test_unsupported_moe_is_refused_before_writing(tokenizer, tmp_path):
    for overrides, reason in [
        (dict(qk_norm=True), "q/k norm together with 1 shared expert"),
        (dict(norm_topk_prob=False), "no q/k norm and norm_topk_prob false"),
    ]:
        with pytest.raises(CheckpointError, match=f"no exact transformers equivalent \\({reason}"):
            export_hf(tiny(tokenizer, "moe", **overrides), tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not an earlier export"):
        export_hf(tiny(tokenizer, "gqa"), tmp_path / "busy")
    export_hf(tiny(tokenizer, "gqa"), tmp_path / "again")
    export_hf(tiny(tokenizer, "qk_norm"), tmp_path / "again")  # an earlier export is replaced whole
    assert load_run(tmp_path / "again").cfg.qk_norm


def test_unknown_or_unsupported_folders_are_clear_errors(tokenizer, tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match=f"{folder}/config.json: not a MiniMind config.*GPT2LMHeadModel"):
        load_run(folder)
    with pytest.raises(SystemExit) as e:
        main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("CheckpointError: ") and "GPT2LMHeadModel" in err
    assert len(err.splitlines()) == 1
    export_hf(tiny(tokenizer, "qk_norm"), tmp_path / "q")  # a Qwen3 that slides its attention window
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="Qwen3ForCausalLM with use_sliding_window true cannot be loaded"):
        load_run(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2, "head_dim": 32}))
    with pytest.raises(CheckpointError, match=r"disagrees with minimind.json on \['head_dim', 'num_heads'\]"):
        load_run(tmp_path / "q")


# ---- upstream MiniMind's transformers format (model/model_minimind.py, config keys and weight names) --


def upstream_folder(path, run: Run, config: dict, weights: str) -> None:
    """What upstream's `save_pretrained` writes: its config keys, Llama-like names under `model.`, and
    (MiniMind2, torch.save of a tied model) lm_head stored next to the embedding."""
    path.mkdir()
    tensors = {f"model.{k}": v.clone() for k, v in run.model.state_dict().items() if k != "lm_head.weight"}
    if weights == "pytorch_model.bin":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        torch.save(tensors, path / weights)
    else:
        save_file(tensors, str(path / weights), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": ["MiniMindForCausalLM"], **config}))
    run.tokenizer.save(path)


def test_upstream_minimind2_moe_folder(tokenizer, tmp_path):
    run = tiny(tokenizer, "moe")  # MiniMind2-MoE: no q/k norm, 1 shared expert, top-2 renormalised
    c = run.cfg
    config = dict(
        model_type="minimind", hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, vocab_size=c.vocab_size,
        intermediate_size=None, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=1e6, inference_rope_scaling=False, flash_attn=True, use_moe=True, num_experts_per_tok=2,
        n_routed_experts=4, n_shared_experts=1, scoring_func="softmax", aux_loss_alpha=0.1, seq_aux=True,
        norm_topk_prob=True, dropout=0.0, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    upstream_folder(tmp_path / "up", run, config, "pytorch_model.bin")
    back = load_run(tmp_path / "up")
    assert (back.cfg.num_shared_experts, back.cfg.moe_intermediate_size, back.cfg.qk_norm) == (1, 96, False)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 32))
    torch.testing.assert_close(logits(back, ids), logits(run, ids), atol=1e-6, rtol=0)
    (tmp_path / "up" / "config.json").write_text(json.dumps({**config, "inference_rope_scaling": True}))
    with pytest.raises(CheckpointError, match='MiniMind2\'s inference_rope_scaling .* set "inference_rope_scaling"'):
        load_run(tmp_path / "up")


def test_upstream_minimind3_folder(tokenizer, tmp_path):
    run = tiny(tokenizer, "qk_norm", rms_norm_eps=1e-6)  # minimind-3: q/k norm on every model
    c = run.cfg
    config = dict(
        model_type="minimind", hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, use_moe=False,
        dropout=0.0, vocab_size=c.vocab_size, bos_token_id=1, eos_token_id=2, flash_attn=True,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        hidden_act="silu", intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, inference_rope_scaling=False, rope_scaling=None,
        num_experts=4, num_experts_per_tok=1, moe_intermediate_size=c.intermediate_size, norm_topk_prob=True,
        router_aux_loss_coef=5e-4,
    )  # fmt: skip
    upstream_folder(tmp_path / "up", run, config, "model.safetensors")
    back = load_run(tmp_path / "up")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 32))
    torch.testing.assert_close(logits(back, ids), logits(run, ids), atol=1e-6, rtol=0)
    moe = tiny(tokenizer, "moe_top1", rms_norm_eps=1e-6)  # minimind-3-MoE routes top-1 with weight exactly 1
    upstream_folder(
        tmp_path / "moe", moe, {**config, "use_moe": True, "moe_intermediate_size": 96}, "model.safetensors"
    )
    with pytest.raises(CheckpointError, match="top-1 routing and norm_topk_prob \\(every routing weight is 1\\)"):
        load_run(tmp_path / "moe")


# ---- through the CLI, on the demo pipeline's runs -----------------------------------------------------


def test_cli_export_with_lora_matches_merged_run(pipeline, tmp_path, capsys):
    from minimind.lora import apply_adapter, merge

    out = tmp_path / "hf"
    main(["export", str(pipeline["sft"]), "--format", "hf", "--out", str(out), "--lora", str(pipeline["lora"])])
    assert "exported LlamaForCausalLM (float32)" in capsys.readouterr().out
    merged = load_run(pipeline["sft"])
    base = logits(merged, ids := torch.tensor([merged.tokenizer.encode_chat(CHATS[1], add_generation_prompt=True)]))
    apply_adapter(merged, pipeline["lora"])
    merge(merged.model).eval()
    ours = logits(merged, ids)
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=1e-4, rtol=0)
    back = load_run(out)
    assert back.info["stage"] == "lora" and back.is_chat
    assert_same_weights(back, merged)
    assert hf_tensors(back.model).keys() == hf_tensors(merged.model).keys()


def test_sft_starts_from_a_transformers_folder(pipeline, tmp_path):
    hf = tmp_path / "hf"
    main(["export", str(pipeline["sft"]), "--format", "hf", "--out", str(hf)])
    (hf / "minimind.json").unlink()  # a plain transformers Llama folder
    start = load_run(hf)
    out = tmp_path / "sft"
    main([
        "sft", "--from", str(hf), "--data", str(pipeline["files"]["sft"]), "--out", str(out), "--max-steps", "3",
        "--warmup-steps", "1", "--max-seq-len", "128", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
    ])  # fmt: skip
    trained = load_run(out)
    assert trained.info["stage"] == "sft" and trained.info["parent"] == str(hf)
    assert trained.cfg == start.cfg
    delta = max((a - b).abs().max().item() for a, b in zip(trained.model.parameters(), start.model.parameters()))
    assert delta > 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses and all(loss == loss and loss < 20 for loss in losses)
