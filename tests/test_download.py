"""`minimind data download` end to end: the CLI in a subprocess, the real huggingface_hub client, and a
local HTTP server that answers with the Hugging Face Hub's and ModelScope's URL layouts and headers.

The Hub side is what huggingface_hub 2.4 asks for a dataset file: HEAD and GET
`/datasets/{repo}/resolve/{revision}/{file}`, answered with `X-Repo-Commit`, `ETag` (the git blob
sha1) and, for LFS files, `X-Linked-Etag` (sha256) and `X-Linked-Size`; Range requests get a 206.
The ModelScope side is what the modelscope SDK asks: the dataset's id, its `/repo/tree` listing
(`Size`, `Sha256`), and `/repo?Source=SDK&Revision=master&FilePath=...`, redirected to storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from minimind.data.demo import dpo_records, sft_records
from minimind.data.download import HF_REPO, MODELSCOPE_REPO, lookup
from minimind.errors import ConfigError

COMMIT = "c0ffee" + "0" * 34
MS_ID = 4242


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


# Small files in upstream's formats: pretraining text with ChatML written into it as plain text, SFT
# conversations (one of them with a tool call and its result), DPO pairs, RL prompts whose
# last assistant turn is left empty.
PRETRAIN = jsonl(
    [
        {"text": f"<|im_start|>第{i}段：今天天气很好。<|im_end|> <|im_start|>Paragraph {i} is here.<|im_end|>"}
        for i in range(60)
    ]
)
TOOL_CALL = {
    "conversations": [
        {"role": "system", "content": "# Tools", "tools": '[{"name": "add"}]'},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": '[{"name": "add", "arguments": {"a": 2, "b": 3}}]'},
        {"role": "tool", "content": '{"result": 5}'},
        {"role": "assistant", "content": "5"},
    ]
}
SFT = jsonl(sft_records(30, 1) + [TOOL_CALL])
DPO = jsonl(dpo_records(20, 1))
RLAIF = jsonl(
    [
        {"conversations": [{"role": "user", "content": f"{i}加{i}等于多少？"}, {"role": "assistant", "content": ""}]}
        for i in range(400)
    ]
)


class Hub:
    """The files served, how to misbehave, and every request seen: (method, path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.in_git: set[str] = set()  # kept in git, not LFS: checked by git blob sha1
        self.corrupt: set[str] = set()  # bytes served differ from the checksum advertised
        self.drop_once: set[str] = set()  # the first whole-file GET sends half and hangs up
        self.log: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name`'s bytes (None: the whole file)."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith("/" + name)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.route(body=False)

    def do_GET(self) -> None:
        self.route(body=True)

    def route(self, body: bool) -> None:
        hub: Hub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        path = unquote(url.path)
        hub.log.append((self.command, path, self.headers.get("Range")))
        resolve = f"/datasets/{HF_REPO}/resolve/"
        if path.startswith(resolve):
            name = path[len(resolve) :].partition("/")[2]
            if name not in hub.files:
                return self.reply(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, body)
            data = hub.files[name]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"'}
            if name not in hub.in_git:
                headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
            return self.send_file(hub, name, headers, body)
        if path == f"/api/v1/datasets/{MODELSCOPE_REPO}":
            return self.reply(200, json.dumps({"Code": 200, "Data": {"Id": MS_ID, "Type": 0}}).encode(), {}, body)
        if path == f"/api/v1/datasets/{MS_ID}/repo/tree":
            files = [
                {"Name": n, "Path": n, "Type": "blob", "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest()}
                for n, d in hub.files.items()
            ]
            return self.reply(200, json.dumps({"Code": 200, "Data": {"Files": files}}).encode(), {}, body)
        if path == f"/api/v1/datasets/{MODELSCOPE_REPO}/repo":
            name = parse_qs(url.query)["FilePath"][0]
            if name not in hub.files:
                return self.reply(404, b'{"Code": 404, "Message": "file not found"}', {}, body)
            return self.reply(302, b"", {"Location": f"/oss/{quote(name)}?Expires=1&Signature=x"}, body)
        if path.startswith("/oss/") and path[5:] in hub.files:
            return self.send_file(hub, path[5:], {}, body)
        self.reply(404, b"not found", {}, body)

    def reply(self, status: int, data: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_file(self, hub: Hub, name: str, headers: dict, body: bool) -> None:
        data = hub.files[name]
        if name in hub.corrupt:
            data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, end = int(match[1]), int(match[2] or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self.reply(206, data[start : end + 1], headers, body)
        if body and name in hub.drop_once:  # promise the whole file, send half, hang up
            hub.drop_once.discard(name)
            self.send_response(200)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.reply(200, data, headers, body)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@pytest.fixture
def hub():
    server = Hub()
    server.files = {"pretrain_hq.jsonl": PRETRAIN, "sft_mini_512.jsonl": SFT, "dpo.jsonl": DPO}
    server.files["rlaif-mini.jsonl"] = RLAIF
    server.in_git = {"sft_mini_512.jsonl"}
    yield server
    server.server.shutdown()
    server.server.server_close()


def minimind(hub: Hub, tmp_path: Path, *args: str, hf_endpoint: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {
        "HF_ENDPOINT": hf_endpoint or hub.url,
        "MINIMIND_MODELSCOPE_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),  # no token, no cache from the machine's own home
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    cmd = [sys.executable, "-m", "minimind", "data", "download", *args, "--out", str(tmp_path / "data")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def one_line_error(proc, kind: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{kind}: "), proc.stderr
    return last


def test_hf_download_verifies_counts_and_is_not_repeated(hub, tmp_path):
    proc = minimind(hub, tmp_path, "pretrain_hq", "sft_mini_512", "dpo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("pretrain_hq.jsonl", "sft_mini_512.jsonl", "dpo.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == hub.files[name]
        assert hub.gets(name) == [None]  # one whole-file GET each
    out = proc.stdout
    assert "pretrain_hq.jsonl: downloaded, sha256 verified" in out
    assert "sft_mini_512.jsonl: downloaded, git sha1 verified" in out  # a file kept in git, not LFS
    assert "60 documents for `minimind pretrain`, `minimind distill`" in out
    assert "31 conversations for `minimind sft`" in out  # the tool-call conversation is read too
    assert "would be refused" not in out
    assert "20 preference pairs for `minimind dpo`, `minimind reward`" in out

    before = len(hub.log)
    again = minimind(hub, tmp_path, "pretrain_hq", "sft_mini_512.jsonl", "dpo")
    assert again.returncode == 0, again.stdout + again.stderr
    asked = [method for method, path, _ in hub.log[before:] if "/resolve/" in path]
    assert asked == ["HEAD"] * 3  # compared with the server, nothing fetched
    assert again.stdout.count(": present, ") == 3


def test_hf_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path):
    # huggingface_hub writes in 10 MiB chunks and resumes after the last whole one, so the file must
    # be big enough for half of it to hold one: 24 MB, cut after 12.
    big = jsonl([{"text": f"{i:06d} " + "长文本 long text. " * 60} for i in range(24_000)])
    hub.files["pretrain_hq.jsonl"] = big
    hub.drop_once = {"pretrain_hq.jsonl"}
    proc = minimind(hub, tmp_path, "pretrain_hq")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "data" / "pretrain_hq.jsonl").read_bytes() == big
    first, second = hub.gets("pretrain_hq.jsonl")
    assert first is None and 0 < int(re.fullmatch(r"bytes=(\d+)-", second)[1]) <= len(big) // 2
    assert "24,000 documents" in proc.stdout


def test_missing_file_and_unreachable_host_are_one_clear_line(hub, tmp_path):
    line = one_line_error(minimind(hub, tmp_path, "lora_medical"), "DownloadError")
    assert f"{hub.url}/datasets/{HF_REPO}/resolve/main/lora_medical.jsonl: not found (HTTP 404)" in line
    assert "HF_ENDPOINT" in line and "--source modelscope" in line

    line = one_line_error(minimind(hub, tmp_path, "dpo", hf_endpoint="http://127.0.0.1:9"), "DownloadError")
    assert "http://127.0.0.1:9/datasets/" in line and "cannot reach the server" in line and "HF_ENDPOINT" in line

    with pytest.raises(ConfigError, match="unknown data set 'sft_mini'; known: .*sft_mini_512"):
        lookup("sft_mini")


def test_hf_corrupted_bytes_are_caught_and_removed(hub, tmp_path):
    hub.corrupt = {"dpo.jsonl"}  # right size, wrong bytes: huggingface_hub's own size check passes
    line = one_line_error(minimind(hub, tmp_path, "dpo"), "DownloadError")
    dest = tmp_path / "data" / "dpo.jsonl"
    assert line.startswith(f"DownloadError: {dest}: damaged download removed: sha256 ")
    assert f"the server says {hashlib.sha256(DPO).hexdigest()}" in line
    assert not dest.exists()

    hub.corrupt = set()
    proc = minimind(hub, tmp_path, "dpo")  # the next run starts afresh
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dest.read_bytes() == DPO

    offline = minimind(hub, tmp_path, "dpo", hf_endpoint="http://127.0.0.1:9")  # the copy here is still usable
    assert offline.returncode == 0 and f"{dest}: present (server unreachable" in offline.stdout, offline.stderr


def test_malformed_line_names_file_and_line(hub, tmp_path):
    lines = SFT.splitlines(keepends=True)
    hub.files["sft_mini_512.jsonl"] = b"".join(lines[:2] + [lines[2][:25] + b"\n"] + lines[3:])  # cut mid-record
    line = one_line_error(minimind(hub, tmp_path, "sft_mini_512"), "DataError")
    assert line.startswith(f"DataError: {tmp_path / 'data' / 'sft_mini_512.jsonl'}:3: invalid JSON")
    assert "download it again with --force" in line


def test_modelscope_resumes_a_partial_file_and_checks_sha256(hub, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "rlaif-mini.jsonl.part").write_bytes(RLAIF[:1000])  # left by an interrupted run
    hub.drop_once = {"dpo.jsonl"}  # and this one breaks off in the middle of this run
    proc = minimind(hub, tmp_path, "rlaif-mini", "dpo", "--source", "modelscope")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "rlaif-mini.jsonl").read_bytes() == RLAIF and (out / "dpo.jsonl").read_bytes() == DPO
    assert not list(out.glob("*.part"))
    assert hub.gets("rlaif-mini.jsonl") == ["bytes=1000-"]  # only the missing bytes
    assert hub.gets("dpo.jsonl") == [None, f"bytes={len(DPO) // 2}-"]
    assert "rlaif-mini.jsonl: downloaded, sha256 verified" in proc.stdout
    assert "400 prompts for `minimind grpo`, `minimind ppo`, `minimind spo`" in proc.stdout

    hub.corrupt = {"pretrain_hq.jsonl"}
    line = one_line_error(minimind(hub, tmp_path, "pretrain_hq", "--source", "modelscope"), "DownloadError")
    assert line.startswith(f"DownloadError: {out / 'pretrain_hq.jsonl'}: damaged download removed: sha256 ")
    assert not list(out.glob("pretrain_hq*"))

    line = one_line_error(minimind(hub, tmp_path, "lora_identity", "--source", "modelscope"), "DownloadError")
    assert f"FilePath=lora_identity.jsonl: lora_identity.jsonl is not in {MODELSCOPE_REPO}'s file list" in line
    assert "MODELSCOPE_ENDPOINT" in line and "--source hf" in line
