"""Pretraining data: validation messages, the token cache, packing, the resumable sampler."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minimind.data.batch import IGNORE, Sampler
from minimind.data.packing import PackedRows
from minimind.data.tokens import tokenize_files
from minimind.errors import DataError
from minimind.tokenizer import Tokenizer


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_cache_is_reused_and_invalidated(tokenizer, tmp_path):
    data = write(tmp_path / "a.jsonl", [json.dumps({"text": f"doc number {i}"}) for i in range(50)])
    first = tokenize_files([data], tokenizer, tmp_path / "cache")
    again = tokenize_files([data], tokenizer, tmp_path / "cache")
    assert not first.reused and again.reused and again.path == first.path
    assert np.array_equal(first.tokens, again.tokens)
    write(data, [json.dumps({"text": f"doc number {i}"}) for i in range(51)])  # the data changed
    changed = tokenize_files([data], tokenizer, tmp_path / "cache")
    assert not changed.reused and changed.num_documents == 51
    other_tok = Tokenizer.train([f"other corpus {i}" for i in range(200)], vocab_size=300)
    retok = tokenize_files([data], other_tok, tmp_path / "cache")  # the tokenizer changed
    assert not retok.reused and retok.path != changed.path
    assert first.tokens.dtype == np.uint16


def test_documents_are_wrapped_in_bos_eos(tokenizer, tmp_path):
    texts = ["first doc", "小明住在橡树镇。", "12 + 30 = 42."]
    data = write(tmp_path / "d.jsonl", [json.dumps({"text": t}) for t in texts])
    tf = tokenize_files([data], tokenizer, tmp_path / "cache")
    for i, text in enumerate(texts):
        doc = tf.tokens[tf.offsets[i] : tf.offsets[i + 1]].tolist()
        assert doc == [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]


def test_packing_uses_every_token_once():
    tokens = np.arange(1, 102, dtype=np.uint16)  # 101 tokens -> 10 rows of 10 (+1 label)
    rows = PackedRows(tokens, np.array([0, 40, 101]), seq_len=10)
    assert len(rows) == 10
    batch = rows.batch(np.arange(10))
    assert sorted(batch.input_ids.flatten().tolist()) == list(range(1, 101))
    assert sorted(batch.labels.flatten().tolist()) == list(range(2, 102))
    assert (batch.labels[:, :-1] == batch.input_ids[:, 1:]).all()
    assert batch.segment_ids is None and batch.num_tokens == 100


def test_document_mask_segments_and_labels():
    # Documents at tokens 0..5, 6..10 and 11; one row of 11 inputs.
    tokens = np.array([1, 10, 11, 12, 13, 2, 1, 20, 21, 22, 2, 1], dtype=np.uint16)
    rows = PackedRows(tokens, np.array([0, 6, 11, 12]), seq_len=11, doc_mask=True)
    batch = rows.batch(np.array([0]))
    assert batch.segment_ids.tolist() == [[0] * 6 + [1] * 5]
    # The label after each document's EOS (the next document's BOS) is not trained.
    assert batch.labels.tolist() == [[10, 11, 12, 13, 2, IGNORE, 20, 21, 22, 2, IGNORE]]


def test_sampler_is_deterministic_and_resumable():
    a = Sampler(10, seed=3)
    seq = np.concatenate([a.take(4) for _ in range(6)])  # crosses two epoch ends
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:20].tolist()) == list(range(10))
    assert not np.array_equal(seq[:10], seq[10:20])  # reshuffled each epoch
    b = Sampler(10, seed=3)
    b.take(4), b.take(4), b.take(4)
    c = Sampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert np.array_equal(np.concatenate([c.take(4) for _ in range(3)]), seq[12:])
    with pytest.raises(ValueError, match="data changed"):
        Sampler(11, seed=3).load_state_dict(b.state_dict())


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"text": "ok"}\n{"text": "broken\n', r"bad.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: 'text' is missing"),
        ('{"text": 42}\n', r"bad.jsonl:1: 'text' is a int, not a string"),
        ('{"text": "ok"}\n\n{"text": "   "}\n', r"bad.jsonl:3: 'text' is empty"),
        ('["a list"]\n', r"bad.jsonl:1: expected a JSON object, got list"),
        ("", r"bad.jsonl: file is empty"),
        (b"\xff\xfe bad bytes\n", r"bad.jsonl:1: not valid UTF-8"),
    ],
)
def test_bad_lines_name_file_and_line(tokenizer, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        tokenize_files([path], tokenizer, tmp_path / "cache")


def test_skip_bad_lines_counts_them(tokenizer, tmp_path):
    path = write(tmp_path / "mixed.jsonl", ['{"text": "good one"}', "{oops", '{"text": 1}', '{"text": "good two"}'])
    tf = tokenize_files([path], tokenizer, tmp_path / "cache", skip_bad_lines=True)
    assert tf.num_documents == 2
    assert [m.split(": ")[0] for m in tf.skipped] == [f"{path}:2", f"{path}:3"]


def test_cache_built_skipping_bad_lines_does_not_serve_a_strict_run(tokenizer, tmp_path):
    path = write(tmp_path / "mixed.jsonl", ['{"text": "good one"}', "{oops", '{"text": "good two"}'])
    skipping = tokenize_files([path], tokenizer, tmp_path / "cache", skip_bad_lines=True)
    assert skipping.num_documents == 2 and not skipping.reused
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        tokenize_files([path], tokenizer, tmp_path / "cache")  # strict: the bad line is an error
    again = tokenize_files([path], tokenizer, tmp_path / "cache", skip_bad_lines=True)
    assert again.reused and again.path == skipping.path


def test_txt_and_several_files(tokenizer, tmp_path):
    a = write(tmp_path / "a.txt", ["line one", "line two"])
    b = write(tmp_path / "b.jsonl", [json.dumps({"text": "three"})])
    assert tokenize_files([a, b], tokenizer, tmp_path / "cache").num_documents == 3


def test_demo_sums_in_held_out_files_never_appear_in_training_files(tmp_path):
    """Every sum a held-out file asks (questions, answers, pretraining sentences) is a pair that no training
    file contains, so held-out arithmetic scores measure adding, not remembering; and the split does not
    disturb the rest of a file: its non-arithmetic records are the same whichever side is asked for."""
    import random
    import re

    from minimind.data.demo import held_out_sum, sft_records, sum_pair, write_demo_data

    files = write_demo_data(tmp_path, scale=0.3)
    seen: dict[bool, set] = {False: set(), True: set()}
    for name, path in files.items():
        held = name.endswith("_heldout")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = re.sub(r"<think>.*?</think>", "", line)  # one-digit steps of worked traces are shared
            for a, b in re.findall(r"(\d+) ?(?:\+|加) ?(\d+)(?= ?(?:=|等于|\?|？))", line):
                seen[held].add((int(a), int(b)))
    assert len(seen[True]) > 50 and len(seen[False]) > 500
    assert not seen[True] & seen[False]
    assert all(held_out_sum(a, b) for a, b in seen[True]) and not any(held_out_sum(a, b) for a, b in seen[False])
    words = lambda recs: [r for r in recs if not re.search(r"\d", json.dumps(r, ensure_ascii=False))]
    assert words(sft_records(200, 1, held_out=False)) == words(sft_records(200, 1, held_out=True))
    with pytest.raises(ValueError, match="no pair in"):  # a range with nothing on that side: an error, not a hang
        sum_pair(random.Random(0), (3, 3), (4, 4), held_out=not held_out_sum(3, 4))


def test_processes_beside_each_other_tokenize_a_cache_once(tokenizer_dir, tmp_path):
    """Two processes (as the ranks of a torchrun on one machine) ask for the same pretraining and chat
    caches at once: one tokenizes, the other waits on the cache's lock and memory-maps the result."""
    import subprocess
    import sys

    from minimind.data.demo import write_demo_data

    files = write_demo_data(tmp_path / "data", scale=0.5)
    big = tmp_path / "big.jsonl"
    big.write_text(files["pretrain"].read_text(encoding="utf-8") * 20, encoding="utf-8")
    script = (
        "import sys, numpy as np\n"
        "from minimind.tokenizer import Tokenizer\n"
        "from minimind.data.tokens import tokenize_files\n"
        "from minimind.data.chat import tokenize_conversations\n"
        "tok = Tokenizer.load(sys.argv[1])\n"
        "t = tokenize_files([sys.argv[2]], tok, sys.argv[4])\n"
        "c = tokenize_conversations([sys.argv[3]], tok, 128, sys.argv[4])\n"
        "print(t.reused, c.reused, int(np.asarray(t.tokens, dtype=np.int64).sum()), len(c.tokens))\n"
    )
    argv = [sys.executable, "-c", script, str(tokenizer_dir), str(big), str(files["sft"]), str(tmp_path / "cache")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].splitlines()[-1].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["False", "True"] and sorted(o[1] for o in outs) == ["False", "True"], outs
    assert outs[0][2:] == outs[1][2:]  # the same tokens either way
