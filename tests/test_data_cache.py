"""Token caches at scale: streamed builds equal in-memory tokenization, one builder per machine,
killed builds leave nothing that passes for complete, progress only on a terminal, and a touched
or copied file is found by its content instead of being tokenized again."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minimind.data import cache, chat, preference, tokens
from minimind.data.chat import ChatRows, pack, tokenize_conversations
from minimind.data.preference import encode_pairs, iter_pairs, read_preferences
from minimind.data.tokens import tokenize_files
from minimind.errors import DataError

WORDS = "the a of tree river stone light 小明 橡树 镇 42 7 + = ? ! , .".split()


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def conversations(rng: random.Random, n: int) -> list[list[dict]]:
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": random_text(rng, 5)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            conv.append({"role": "user", "content": random_text(rng, rng.randrange(1, 30))})
            conv.append({"role": "assistant", "content": random_text(rng, rng.randrange(1, 60))})
        out.append(conv)
    return out


def reference_conversation(tokenizer, conv: list[dict], max_len: int):
    """The definition, one piece at a time: [newline] <|im_start|>role\\n + content + <|im_end|>,
    trained on assistant content and its end; cut after the last reply that fits, or dropped."""
    ids, trained, ends = [], [], []
    for j, m in enumerate(conv):
        head = (tokenizer.encode("\n") if j else []) + tokenizer.encode(f"<|im_start|>{m['role']}\n")
        body = tokenizer.encode(m["content"]) + [tokenizer.eos_id]
        ids += head + body
        trained += [False] * len(head) + [m["role"] == "assistant"] * len(body)
        if m["role"] == "assistant":
            ends.append(len(ids))
    if len(ids) > max_len:
        fitting = [e for e in ends if e <= max_len]
        if not fitting:
            return None
        ids, trained = ids[: fitting[-1]], trained[: fitting[-1]]
    return ids, trained


def test_streamed_caches_equal_in_memory_tokenization(tokenizer, tmp_path, monkeypatch):
    # Small batches: many batches go through the pipelined encoder and the streamed writes.
    monkeypatch.setattr(tokens, "BATCH_DOCS", 7)
    monkeypatch.setattr(chat, "BATCH", 5)
    monkeypatch.setattr(preference, "BATCH", 3)
    rng = random.Random(0)
    texts = [random_text(rng, rng.randrange(1, 80)) for _ in range(100)]
    tf = tokenize_files([write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])], tokenizer, tmp_path / "c")
    expected = [i for t in texts for i in [tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id]]
    assert np.asarray(tf.tokens).tolist() == expected
    assert np.diff(tf.offsets).tolist() == [len(tokenizer.encode(t)) + 2 for t in texts]

    convs = conversations(rng, 60)
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in convs])
    data = tokenize_conversations([path], tokenizer, 64, tmp_path / "c")
    refs = [reference_conversation(tokenizer, c, 65) for c in convs]
    kept = [r for r in refs if r is not None]
    assert data.dropped == len(refs) - len(kept) > 0 and data.truncated > 0  # both rules ran
    assert len(data) == len(kept)
    for i, (ids, trained) in enumerate(kept):
        got_ids, got_trained = data.conversation(i)
        assert got_ids.tolist() == ids and got_trained.tolist() == trained

    pairs = [
        {"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": random_text(rng, rng.randrange(1, 40))}]}
        for c in convs[:20]
    ]
    ppath = write_jsonl(tmp_path / "d.jsonl", pairs)
    streamed = read_preferences([ppath], tokenizer, 80, cache_dir=tmp_path / "c")
    in_memory = [x for x in encode_pairs(tokenizer, list(iter_pairs([ppath])), 80, True) if x is not None]
    assert len(streamed) == len(in_memory) > 0
    for k, (c, cs, r, rs, _) in enumerate(in_memory):
        assert streamed.sequence(2 * k)[0].tolist() == c.tolist() and streamed.sequence(2 * k)[1] == cs
        assert streamed.sequence(2 * k + 1)[0].tolist() == r.tolist() and streamed.sequence(2 * k + 1)[1] == rs
    again = read_preferences([ppath], tokenizer, 80, cache_dir=tmp_path / "c")
    assert np.array_equal(again.tokens, streamed.tokens) and np.array_equal(again.reply_start, streamed.reply_start)


def test_windowed_packing_places_every_conversation_once_and_stays_full():
    lengths = np.random.default_rng(0).integers(5, 400, size=3000)
    starts, items = pack(lengths, 512, window=300)
    assert sorted(items.tolist()) == list(range(3000))
    rows = [items[starts[r] : starts[r + 1]] for r in range(len(starts) - 1)]
    assert all(lengths[row].sum() <= 512 for row in rows)
    whole_starts, _ = pack(lengths, 512, window=10**6)
    # Windows of 300 lose little against best-fit over everything (measured: 1 row in ~1000).
    assert len(starts) - 1 <= (len(whole_starts) - 1) * 1.02


def test_touched_or_copied_file_is_found_by_content(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i} " * 5} for i in range(40)])
    first = tokenize_files([path], tokenizer, tmp_path / "c")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: the quick key changes
    copied = tmp_path / "copy.jsonl"
    shutil.copy(path, copied)
    for again in (
        tokenize_files([path], tokenizer, tmp_path / "c"),
        tokenize_files([copied], tokenizer, tmp_path / "c"),
    ):
        assert again.reused and again.path == first.path
    # Same size and time, one byte different: the content decides (small files are hashed whole).
    text = path.read_text()
    stat = os.stat(path)
    path.write_text(text.replace("document 7 ", "document 8 ", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = tokenize_files([path], tokenizer, tmp_path / "c")
    assert not changed.reused and not np.array_equal(changed.tokens, first.tokens)
    # The cache the copy's key points to is deleted: the copy is tokenized again, not an error.
    expected = np.array(first.tokens)
    for f in (tmp_path / "c").glob(first.path.name + ".*"):
        f.unlink()
    rebuilt = tokenize_files([copied], tokenizer, tmp_path / "c")
    assert not rebuilt.reused and np.array_equal(rebuilt.tokens, expected)


def test_quick_key_samples_big_files_and_sees_a_change_in_a_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SMALL", 1 << 16)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: sampled, not hashed whole
    key = cache.quick_key(path)
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"x")  # the first sample covers byte 0
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.quick_key(path)["sample"] != key["sample"]


SCRIPT = """
import sys, time, numpy as np, torch.distributed as dist
from minimind.tokenizer import Tokenizer
from minimind.data.tokens import tokenize_files
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(3)  # rank 1 asks first: it must wait for rank 0, not tokenize
t = tokenize_files([sys.argv[2]], Tokenizer.load(sys.argv[1]), sys.argv[3])
dist.barrier()
# one file per rank: two processes printing to one pipe can interleave their lines
with open(f"{sys.argv[4]}/result-{dist.get_rank()}", "w") as f:
    print(dist.get_rank(), t.reused, int(np.asarray(t.tokens, dtype=np.int64).sum()), file=f)
dist.destroy_process_group()
"""


def test_only_local_rank_zero_tokenizes_under_torchrun(tokenizer_dir, tmp_path):
    rng = random.Random(1)
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": random_text(rng, 50)} for _ in range(500)])
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    out = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tokenizer_dir),
            str(data),
            str(tmp_path / "c"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [(tmp_path / f"result-{rank}").read_text().split() for rank in (0, 1)]
    assert [r[:2] for r in results] == [["0", "False"], ["1", "True"]], out.stdout
    assert results[0][2] == results[1][2]
    assert out.stdout.count("tokenized ") == 1 and "waiting for local rank 0" in out.stderr


WAITER = """
import sys
from minimind.tokenizer import Tokenizer
from minimind.data.tokens import tokenize_files
from minimind.errors import DataError
try:
    tokenize_files([sys.argv[2]], Tokenizer.load(sys.argv[1]), sys.argv[3])
except DataError as e:
    print("DataError:", e)
"""


def test_a_waiting_rank_gets_rank_zeros_data_error(tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text key"}\n', encoding="utf-8")
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}
    argv = [sys.executable, "-c", WAITER, str(tokenizer_dir), str(bad), str(tmp_path / "c")]
    waiter = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting: nothing built, nothing failed yet
    builder = subprocess.run(argv, env={**env, "LOCAL_RANK": "0", "RANK": "0"}, capture_output=True, text=True)
    out, err = waiter.communicate(timeout=60)
    expected = f"DataError: {bad}:2: 'text' is missing"
    assert expected in builder.stdout and expected in out, (builder.stdout, out, err)
    assert "waiting for local rank 0" in err


KILLED = """
import sys
from minimind.tokenizer import Tokenizer
from minimind.data import tokens
tokens.BATCH_DOCS = 64  # many small writes: the kill lands mid-way
tokens.tokenize_files([sys.argv[2]], Tokenizer.load(sys.argv[1]), sys.argv[3])
"""


def test_killed_tokenization_leaves_no_cache_that_passes_for_complete(tokenizer, tokenizer_dir, tmp_path):
    rng = random.Random(2)
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": random_text(rng, 200)} for _ in range(20000)])
    cache_dir = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tokenizer_dir), str(data), str(cache_dir)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in cache_dir.glob("*.partial-*") if p.stat().st_size > 100_000] if cache_dir.exists() else []
        if partial:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the tokenization finished before it could be killed: make the file bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(cache_dir.glob("*.json")) and list(cache_dir.glob("*.partial-*"))
    rebuilt = tokenize_files([data], tokenizer, cache_dir)
    fresh = tokenize_files([data], tokenizer, tmp_path / "fresh")
    assert not rebuilt.reused and np.array_equal(rebuilt.tokens, fresh.tokens)
    assert not list(cache_dir.glob("*.partial-*"))  # the dead build's files are gone


PROGRESS = """
import sys
from minimind.tokenizer import Tokenizer
from minimind.data.chat import ChatRows, tokenize_conversations
from minimind.data.tokens import tokenize_files
tok = Tokenizer.load(sys.argv[1])
tokenize_files([sys.argv[2]], tok, sys.argv[4])
ChatRows(tokenize_conversations([sys.argv[3]], tok, 128, sys.argv[4]), 128)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bars_on_a_terminal_only(tokenizer_dir, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    rng = random.Random(3)
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": random_text(rng, 30)} for _ in range(2000)])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in conversations(rng, 300)])

    def run(cache_dir, terminal: bool) -> tuple[str, str]:
        argv = [sys.executable, "-c", PROGRESS, str(tokenizer_dir), str(data), str(sft), str(cache_dir)]
        if not terminal:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            return out.stdout, out.stderr
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower, text=True)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout = proc.communicate(timeout=120)[0]
        os.close(leader)
        assert proc.returncode == 0
        return stdout, b"".join(chunks).decode("utf-8", "replace")

    stdout, term = run(tmp_path / "tty", terminal=True)
    assert "tokenizing p.jsonl" in term and "tokenizing s.jsonl" in term and "packing" in term
    assert "B/s" in term or "it/s" in term  # a live rate, from tqdm
    assert "%|" not in stdout  # the bars go to stderr, never into the log on stdout
    stdout, piped = run(tmp_path / "pipe", terminal=False)
    assert "%|" not in piped and "\r" not in piped and "%|" not in stdout
    assert "tokenized 2,000 records" in stdout  # a piped log still gets the summary line


def test_skip_bad_lines_counts_every_line_and_keeps_a_bounded_sample(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "KEEP_SKIPPED", 10)
    lines = [json.dumps({"text": f"good {i}"}) if i % 2 else "not json" for i in range(60)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tf = tokenize_files([path], tokenizer, tmp_path / "c", skip_bad_lines=True)
    assert tf.num_documents == 30 and tf.skipped.count == 30 and len(tf.skipped) == 10
    again = tokenize_files([path], tokenizer, tmp_path / "c", skip_bad_lines=True)
    assert again.reused and again.skipped.count == 30 and list(again.skipped) == list(tf.skipped)
    with pytest.raises(DataError, match=f"{path}:1: invalid JSON"):
        tokenize_files([path], tokenizer, tmp_path / "c")  # keyed apart: the strict run still stops


def test_chat_rows_from_a_cache_match_a_fresh_build(tokenizer, tmp_path):
    rng = random.Random(4)
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": c} for c in conversations(rng, 200)])
    built = ChatRows(tokenize_conversations([path], tokenizer, 128, tmp_path / "c"), 128)
    reused = ChatRows(tokenize_conversations([path], tokenizer, 128, tmp_path / "c"), 128)
    assert reused.data.reused and not built.data.reused
    a, b = built.batch(np.arange(len(built))), reused.batch(np.arange(len(reused)))
    assert all(
        (x == y).all() for x, y in zip((a.input_ids, a.labels, a.segment_ids), (b.input_ids, b.labels, b.segment_ids))
    )
