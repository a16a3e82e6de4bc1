"""Tokenizer: round trips, single-id special tokens, the chat template, transformers and upstream formats."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minimind.data.demo import pretrain_texts
from minimind.errors import ConfigError
from minimind.tokenizer import SPECIAL_TOKENS, TAGS, StreamDecoder, Tokenizer

SAMPLES = [
    "Hello, world!",
    "你好，世界。今天天气很好。",
    "emoji 🙂😀🎉 and 👩‍👩‍👧",
    "mixed 中英 text 123 + 456 = 579",
    "  leading spaces\ttabs\nnew lines\r\n",
    "Ünïcödé ß ø ﬁ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_size_counts_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 600
    assert max(tokenizer.backend.get_vocab().values()) == 599


def test_special_tokens_are_single_fixed_ids(tokenizer):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(tok) == [i], tok
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert set(tokenizer.tag_ids) == set(TAGS)
    ids = tokenizer.encode("<think>\nhm\n</think>\n<answer>4</answer><|im_end|>")
    assert ids[0] == tokenizer.tag_ids["<think>"] and ids[-1] == 2
    # Tags stay visible when decoding; control tokens can be skipped.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nhm\n</think>\n<answer>4</answer>"


def test_digits_are_split_one_by_one(tokenizer):
    assert len(tokenizer.encode("12345")) == 5


CONVERSATION = [
    {"role": "system", "content": "You are MiniMind."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "你好"},
]


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.render_chat(CONVERSATION, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are MiniMind.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.render_chat(CONVERSATION[:3]).endswith("4<|im_end|>\n")
    assert tokenizer.render_chat(CONVERSATION[1:2], True, enable_thinking=True).endswith("assistant\n<think>\n")
    assert tokenizer.render_chat(CONVERSATION[1:2], True, enable_thinking=False).endswith(
        "assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer.encode_chat(CONVERSATION, add_generation_prompt=True)
    assert ids.count(1) == 5 and ids.count(2) == 4


def test_transformers_loads_directory_and_template_matches(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    for gen in (False, True):
        theirs = hf.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert list(theirs) == tokenizer.encode_chat(CONVERSATION, add_generation_prompt=gen)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert (
        json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )


def write_upstream_style_tokenizer(directory, vocab_size=400):
    """A tokenizer laid out like upstream MiniMind2's: GPT-2 byte-level regex, only three special
    tokens (ids 0/1/2), its own chat template in tokenizer_config.json."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pretrain_texts(300, seed=3), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
        "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    )
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend


def test_loads_upstream_format(tmp_path):
    write_upstream_style_tokenizer(tmp_path / "up")
    for path in (tmp_path / "up", tmp_path / "up" / "tokenizer.json"):
        tok = Tokenizer.load(path)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.vocab_size == 400
        assert tok.tag_ids == {}  # upstream MiniMind2 has no single-token think tags
        assert tok.decode(tok.encode("小明住在橡树镇。")) == "小明住在橡树镇。"
        assert (
            tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )


def test_refuses_tokenizer_without_chatml_tokens(tmp_path):
    backend = HFTokenizer(models.BPE())
    backend.add_special_tokens([AddedToken("<pad>", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="lacks the ChatML tokens"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")


def test_stream_decoder_never_emits_half_characters(tokenizer):
    text = "你好🙂世界😀!"
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in tokenizer.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(tokenizer.encode("😀")) > 1  # the case being tested: one emoji, several byte tokens
