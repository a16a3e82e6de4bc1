"""GGUF export checked with the real llama.cpp (through llama-cpp-python): the file loads, llama.cpp
tokenises like we do, and its logits and greedy continuations equal ours — for every architecture
the exporter picks (llama with permuted q/k, qwen3, qwen3moe, Mixtral-style llama MoE, glm4moe with
shared experts or a zero one), with YaRN, and for the trained chat model of the demo pipeline."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import CONFIGS, sharp_model

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python)")

import gguf  # noqa: E402

from minimind.checkpoint import load_run, save_run  # noqa: E402
from minimind.cli import main as cli_main  # noqa: E402
from minimind.errors import ConfigError  # noqa: E402
from minimind.export.gguf import export_gguf  # noqa: E402
from minimind.generate import SamplingParams, generate  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "Hello, world! It's 2024; the cat's toys cost $12.50.",
    "你好，世界。今天天气很好。",
    "Zoe has a cat. 32 + 19 = 51. 小兰养了一只狗。狗吃肉。 我的朋友叫Pip。",
    "emoji 🙂😀 and digits 12345, tabs\tand\n\nnew lines   spaces",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>",
]


@contextlib.contextmanager
def llama(path):
    """llama.cpp on one thread with an f32 KV cache (its default f16 cache would round keys and
    values) and every position's logits kept."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        n_threads=1,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_ids=())
    return generate(model, [ids], params).generations[0].tokens


def metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


# Every architecture the exporter can pick. Tiny, with large random weights (sharp_model), so that
# a wrong permutation, norm, rope or routing moves logits by whole units.
YARN_ATTN = dict(rope_scaling="yarn", rope_original_max_position_embeddings=32, rope_attention_factor=1.5)
ARCH_CASES = {
    "gqa": ({}, "llama"),
    "dense": ({}, "llama"),
    "yarn": ({}, "llama"),
    "qk_norm": (
        dict(rope_scaling="yarn", rope_original_max_position_embeddings=32, rope_attention_factor=1.5),
        "qwen3",
    ),
    "moe": ({}, "glm4moe"),  # shared expert, top-2 renormalised, no q/k norm
    "moe_top1": ({}, "glm4moe"),  # q/k norm, top-1 not renormalised, no shared expert
    "moe_qwen3": (dict(num_shared_experts=0, qk_norm=True), "qwen3moe"),
    "moe_mixtral": (dict(num_shared_experts=0), "llama"),
    "moe_unnormalised": (dict(norm_topk_prob=False, qk_norm=True), "glm4moe"),
    "untied": (dict(tie_word_embeddings=False), "llama"),  # writes output.weight
}


@pytest.mark.parametrize("case", ARCH_CASES)
def test_every_architecture_matches_llama_cpp(case, tokenizer, tmp_path):
    overrides, arch = ARCH_CASES[case]
    base = case if case in CONFIGS else "gqa" if case == "untied" else "moe"
    model = sharp_model(base, vocab_size=tokenizer.vocab_size, **overrides)
    save_run(tmp_path / "run", model, tokenizer, {"stage": "sft"})
    run = load_run(tmp_path / "run")
    path = export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    assert metadata(path)["general.architecture"] == arch
    prompt = tokenizer.encode("Hello, world! 你好 🙂 12345")  # 27 positions + 32 new: past YaRN's 32
    with llama(path) as llm:
        theirs = llama_logits(llm, prompt)
        greedy = llama_greedy(llm, prompt, 32)
    ours = our_logits(run.model, prompt)
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() < 1e-4 * max(scale, 10), (np.abs(theirs - ours).max(), scale)
    assert greedy == our_greedy(run.model, prompt, 32)


@pytest.fixture(scope="module")
def sft_exports(pipeline, tmp_path_factory):
    """The demo pipeline's chat model exported at every dtype (through the CLI for q8_0)."""
    run = load_run(pipeline["sft"])
    out = tmp_path_factory.mktemp("gguf")
    paths = {dtype: export_gguf(run, out / f"sft-{dtype}.gguf", dtype=dtype) for dtype in ("f32", "f16")}
    cli_main(["export", str(pipeline["sft"]), "--format", "gguf", "--out", str(out / "sft-q8.gguf"), "--dtype", "q8_0"])
    paths["q8_0"] = out / "sft-q8.gguf"
    return run, paths


def test_tokenizer_and_chat_template_match(sft_exports):
    run, paths = sft_exports
    tok = run.tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3? 你好 🙂"}]
    rendered = tok.render_chat(chat, add_generation_prompt=True)
    meta = metadata(paths["f32"])
    assert meta["tokenizer.chat_template"] == tok.chat_template
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(tok.chat_template, eos_token="", bos_token="")
    assert formatter(messages=chat).prompt == rendered
    # A tool conversation through the GGUF's own template: the same text as ours, the same ids in llama.cpp.
    from minimind.toolbox import BUILTIN

    tools = BUILTIN.definitions(["calculate_math"])
    call = {"type": "function", "function": {"name": "calculate_math", "arguments": {"expression": "17 * 23"}}}
    with_tools = [*chat, {"role": "assistant", "content": "", "tool_calls": [call]},
                  {"role": "tool", "content": '{"result": "391"}'}]  # fmt: skip
    gguf_formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(meta["tokenizer.chat_template"], "", "")
    tool_text = tok.render_chat(with_tools, add_generation_prompt=True, tools=tools)
    assert "<tool_call>" in tool_text and gguf_formatter(messages=with_tools, tools=tools).prompt == tool_text
    with llama(paths["f32"]) as llm:
        for text in [*TEXTS, rendered, tool_text]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
            # Decoding gives the text back, special tokens included.
            assert llm.detokenize(tok.encode(text), special=True).decode() == text


def test_gpt2_pre_tokenizer_matches(tokenizer, tmp_path):
    """Upstream MiniMind's tokenizers split with byte-level's own GPT-2 regex: exported as "gpt-2"."""
    data = json.loads(tokenizer.backend.to_str())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = Tokenizer(type(tokenizer.backend).from_str(json.dumps(data)))
    save_run(tmp_path / "run", sharp_model("gqa", vocab_size=tok.vocab_size), tok, {"stage": "sft"})
    path = export_gguf(load_run(tmp_path / "run"), tmp_path / "m.gguf", dtype="f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert any(tok.encode(t) != tokenizer.encode(t) for t in TEXTS)  # the two splits really differ
    with llama(path) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


def test_trained_chat_model_same_logits_and_greedy_reply(sft_exports):
    """f32: logits within float noise and the same 32 greedy tokens. f16 / q8_0 round the weights
    (f16 to 11 significant bits; q8_0 to 8 bits per block of 32, and llama.cpp then rounds the
    activations to 8 bits too). Measured on this model and five prompts: max |logit difference|
    1e-5 (f32), 0.008 (f16), 0.06-0.33 (q8_0) with logits up to 14; all 32 greedy tokens equal for
    every dtype. Asserted with margin: f16 the first 16 tokens, q8_0 the first 8."""
    run, paths = sft_exports
    prompt = run.tokenizer.encode_chat([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    ours = our_logits(run.model, prompt)
    reply = our_greedy(run.model, prompt, 32)
    bounds = {"f32": (1e-3, 32), "f16": (0.05, 16), "q8_0": (0.6, 8)}  # max |Δlogit|, greedy tokens equal
    for dtype, (max_diff, same) in bounds.items():
        with llama(paths[dtype]) as llm:
            diff = np.abs(llama_logits(llm, prompt) - ours).max()
            greedy = llama_greedy(llm, prompt, 32)
        assert diff < max_diff, (dtype, diff)
        assert greedy[:same] == reply[:same], (dtype, greedy, reply)


def test_file_metadata_and_modelfile(sft_exports, pipeline, capsys):
    run, paths = sft_exports
    cfg = run.cfg
    meta = metadata(paths["q8_0"])
    arch = meta["general.architecture"]
    assert arch == "llama"  # the `tiny` preset: no q/k norm
    assert meta[f"{arch}.context_length"] == cfg.max_position_embeddings
    assert meta[f"{arch}.block_count"] == cfg.num_layers
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.num_kv_heads
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    reader = gguf.GGUFReader(paths["q8_0"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    pre = reader.fields["tokenizer.ggml.pre"].contents()
    assert pre == "qwen2"
    modelfile = paths["q8_0"].with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("FROM ./sft-q8.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # A pretrained (text) run gets a plain template and no chat template in the file.
    text_path = export_gguf(load_run(pipeline["pretrain"]), paths["f32"].parent / "pre.gguf", dtype="f16")
    assert "tokenizer.chat_template" not in metadata(text_path)
    printed = capsys.readouterr().out
    assert f"ollama create pre -f {text_path.with_suffix('.Modelfile')}" in printed
    assert f"llama-completion -m {text_path}" in printed
    assert 'TEMPLATE """{{ .Prompt }}"""' in text_path.with_suffix(".Modelfile").read_text()


def test_bad_input_is_refused(tiny_run, tmp_path, capsys):
    run = load_run(tiny_run)
    with pytest.raises(ConfigError, match=r"must be a file ending in \.gguf"):
        export_gguf(run, tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="must be one of f32, f16, q8_0, got 'q4_k'"):
        export_gguf(run, tmp_path / "model.gguf", dtype="q4_k")
    with pytest.raises(SystemExit):
        cli_main(["export", str(tiny_run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "bf16"])
    assert capsys.readouterr().err.strip() == "ConfigError: --dtype for gguf must be one of f32, f16, q8_0, got 'bf16'"
    run.model.cfg.rope_scaling, run.model.cfg.rope_beta_fast = "yarn", 16.0
    with pytest.raises(ConfigError, match="always uses 32/1"):
        export_gguf(run, tmp_path / "model.gguf")
    run.model.cfg.rope_scaling = ""
    data = json.loads(run.tokenizer.backend.to_str())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    run.tokenizer = Tokenizer(type(run.tokenizer.backend).from_str(json.dumps(data)), source="odd")
    with pytest.raises(ConfigError, match="odd: pre-tokenizer 'Whitespace' has no llama.cpp equivalent"):
        export_gguf(run, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
