"""`minimind data download`: upstream MiniMind's published data sets, fetched, verified and read once.

Upstream publishes its training files twice: the Hugging Face dataset `jingyaogong/minimind_dataset`
and the ModelScope dataset `gongjy/minimind_dataset` (same file names). A file is trusted only after
three checks, because a 10 GB download that is silently short or damaged costs a training run:

1. bytes: the size and checksum the server advertises. For Hugging Face that is the LFS sha256
   (`X-Linked-Etag`) or, for a file kept in git, the git blob sha1 (`ETag`); huggingface_hub 2.4
   itself only compares the byte count. For ModelScope it is the `Sha256` of its file listing.
2. records: every line goes through the reader of the stage that consumes the file (pretraining
   text, SFT conversations, preference pairs, RL prompts). A line that is not JSON means a damaged
   file (`DataError: FILE:LINE`, re-download with --force); a JSON line the stage would refuse is
   counted and reported, since the stages can skip such lines (--skip-bad-lines).
3. presence: a complete file that matches the server is not downloaded again.

Downloads resume. Hugging Face: huggingface_hub retries a dropped connection with an HTTP Range
request within the run (it keeps no partial file across runs). ModelScope: bytes go to `FILE.part`,
and the next attempt, in this run or a later one, asks only for the missing bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.data.readers import iter_jsonl
from minimind.errors import ConfigError, DataError, MiniMindError

HF_REPO = "jingyaogong/minimind_dataset"
MODELSCOPE_REPO = "gongjy/minimind_dataset"
MODELSCOPE_DEFAULT = "https://www.modelscope.cn"
CHUNK = 1 << 20
RETRIES = 5  # attempts in a row that make no progress before a download gives up


class DownloadError(MiniMindError):
    """A file could not be fetched or does not match what the server says it is."""


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # which reader checks it: text | chat | pairs | prompts | jsonl
    read_by: str  # the minimind commands that train on it, comma-separated ("" for none)
    size: str  # as upstream's README gives it
    note: str

    @property
    def file(self) -> str:
        return f"{self.name}.jsonl"

    @property
    def readers(self) -> str:
        if not self.read_by:
            return "upstream's trainer/train_agent.py (no minimind stage reads it)"
        return ", ".join(f"`minimind {s}`" for s in self.read_by.split(", "))


# From upstream's README (the MiniMind-3 list, then the MiniMind2 list it replaced) and its trainers'
# default --data_path. Sizes are upstream's; the servers' own sizes are what downloads are checked against.
DATASETS = {
    d.name: d
    for d in [
        Dataset("pretrain_t2t_mini", "text", "pretrain, distill", "1.2 GB", "MiniMind-3 pretraining text, quick start"),
        Dataset("pretrain_t2t", "text", "pretrain, distill", "10 GB", "MiniMind-3 pretraining text, full"),
        Dataset("sft_t2t_mini", "chat", "sft, distill", "1.6 GB", "MiniMind-3 SFT, quick start (has tool calls)"),
        Dataset("sft_t2t", "chat", "sft, distill", "14 GB", "MiniMind-3 SFT, full (has tool calls)"),
        Dataset("rlaif", "prompts", "grpo, ppo, spo", "24 MB", "RL prompts, last reply left empty"),
        Dataset("dpo", "pairs", "dpo, reward", "53 MB", "preference pairs (chosen / rejected)"),
        Dataset("agent_rl", "prompts", "agent", "86 MB", "agentic RL with tools (prompts + expected values)"),
        Dataset("agent_rl_math", "prompts", "agent", "18 MB", "agentic RL, maths"),
        Dataset("lora_exam", "chat", "lora", "?", "multiple-choice exam format (C-Eval / MMLU style)"),
        Dataset("pretrain_hq", "text", "pretrain, distill", "1.6 GB", "MiniMind2 pretraining text (Chinese)"),
        Dataset("sft_mini_512", "chat", "sft, distill", "1.2 GB", "MiniMind2 SFT, quick start, <512 chars"),
        Dataset("sft_512", "chat", "sft, distill", "7.5 GB", "MiniMind2 SFT, <512 chars"),
        Dataset("sft_1024", "chat", "sft, distill", "5.6 GB", "MiniMind2 SFT (Qwen2.5 distilled), <1024 chars"),
        Dataset("sft_2048", "chat", "sft, distill", "9 GB", "MiniMind2 SFT (Qwen2.5 distilled), <2048 chars"),
        Dataset("r1_mix_1024", "chat", "reason", "340 MB", "reasoning traces <think>/<answer> (R1 distilled)"),
        Dataset("rlaif-mini", "prompts", "grpo, ppo, spo", "1 MB", "10k RL prompts sampled from SFT data"),
        Dataset("lora_identity", "chat", "lora", "22.8 KB", "self-identity Q&A"),
        Dataset("lora_medical", "chat", "lora", "34 MB", "medical Q&A"),
    ]
}
UNITS = {"text": "documents", "chat": "conversations", "pairs": "preference pairs", "prompts": "prompts"}


def lookup(name: str) -> Dataset:
    key = name.removesuffix(".jsonl")
    if key not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} (see --list)")
    return DATASETS[key]


# ---- checks on bytes -----------------------------------------------------------------------------


@dataclass
class Remote:
    """What a server says a file is: where to get it, its size and checksum (any may be unknown)."""

    url: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None  # Hugging Face files kept in git (not LFS) are named by their blob id


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one read (a progress bar on a terminal: 14 GB take a while)."""
    from minimind.data.cache import progress

    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f, progress(size, f"checking {path.name}") as bar:
        while block := f.read(CHUNK):
            sha256.update(block)
            sha1.update(block)
            bar.update(len(block))
    return sha256.hexdigest(), sha1.hexdigest()


def mismatch(path: Path, remote: Remote) -> str | None:
    """Why `path` is not the file the server describes, or None when it is (as far as it says)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size:,} bytes, the server says {remote.size:,}"
    if remote.sha256 or remote.git_sha1:
        sha256, git_sha1 = file_hashes(path)
        if remote.sha256 and sha256 != remote.sha256:
            return f"sha256 {sha256}, the server says {remote.sha256}"
        if remote.git_sha1 and git_sha1 != remote.git_sha1:
            return f"git blob sha1 {git_sha1}, the server says {remote.git_sha1}"
    return None


def checked(remote: Remote) -> str:
    return "sha256" if remote.sha256 else "git sha1" if remote.git_sha1 else "size" if remote.size else "nothing"


def hint(source: str) -> str:
    if source == "hf":
        return "check the address, set HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com), or try --source modelscope"
    return "check the address, set MODELSCOPE_ENDPOINT, or try --source hf"


# ---- Hugging Face --------------------------------------------------------------------------------


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the host could not be reached", whichever HTTP library is installed."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, urllib.error.URLError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def fetch_hf(ds: Dataset, out: Path, force: bool) -> tuple[Path, str]:
    """Download through huggingface_hub into `out` (its `local_dir` layout); returns (path, what happened)."""
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise ConfigError(
            "--source hf needs huggingface_hub: pip install 'minimind[hub]' (or use --source modelscope)"
        ) from None
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    url = hf_hub_url(HF_REPO, ds.file, repo_type="dataset", endpoint=endpoint)
    dest = out / ds.file
    if constants.is_offline_mode():
        if dest.is_file() and not force:
            return dest, "present (HF_HUB_OFFLINE is set: not compared with the server)"
        raise DownloadError(f"{url}: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set; unset it to download")

    def failed(e: Exception, doing: str = "cannot reach the server") -> DownloadError:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 404):
            why = "not found (HTTP 404)" if status == 404 else "not found or not public (HTTP 401)"
            return DownloadError(f"{url}: {why}; upstream may have moved the file: {hint('hf')}")
        if isinstance(e, HfHubHTTPError):
            return DownloadError(f"{url}: HTTP {status}: {str(e).splitlines()[0]}; {hint('hf')}")
        return DownloadError(f"{url}: {doing} ({type(e).__name__}: {e}); {hint('hf')}")

    try:
        meta = get_hf_file_metadata(url)
    except HfHubHTTPError as e:
        raise failed(e) from None
    except network_errors() as e:
        if dest.is_file() and not force:
            return dest, f"present (server unreachable: {type(e).__name__}; not compared with it)"
        raise failed(e) from None
    etag = (meta.etag or "").lower()
    remote = Remote(url, meta.size, etag if len(etag) == 64 else None, etag if len(etag) == 40 else None)

    def download(again: bool) -> bool:
        """hf_hub_download at the commit just seen; True when it wrote the file."""
        before = stamp(dest)
        try:
            hf_hub_download(
                HF_REPO,
                ds.file,
                repo_type="dataset",
                revision=meta.commit_hash or "main",
                local_dir=out,
                force_download=again,
                endpoint=endpoint,
            )
        except (HfHubHTTPError, *network_errors()) as e:
            raise failed(e, "download failed") from None
        except OSError as e:  # "Consistency check failed" (bytes missing), or not a Hub-like server
            message = str(e).splitlines()[0]
            advice = "run the command again" if "onsistency" in message else hint("hf")
            raise DownloadError(f"{url}: {message}; {advice}") from None
        return stamp(dest) != before

    fresh = download(force)
    problem = mismatch(dest, remote)
    if problem and not fresh:
        print(f"{dest}: the copy here differs from the server's ({problem}); downloading it again", file=sys.stderr)
        fresh = download(True)
        problem = mismatch(dest, remote)
    if problem:
        dest.unlink(missing_ok=True)
        (out / ".cache" / "huggingface" / "download" / f"{ds.file}.metadata").unlink(missing_ok=True)
        raise DownloadError(f"{dest}: damaged download removed: {problem}; run the command again")
    rev = (meta.commit_hash or "?")[:10]
    return dest, f"{'downloaded' if fresh else 'present'}, {checked(remote)} verified against {url} @ {rev}"


def stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current contents as far as the file system tells (changes when it is replaced)."""
    if not path.exists():
        return None
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


# ---- ModelScope ----------------------------------------------------------------------------------


def modelscope_endpoint() -> str:
    """MINIMIND_MODELSCOPE_ENDPOINT or MODELSCOPE_ENDPOINT (base URLs), or the SDK's MODELSCOPE_DOMAIN."""
    for var in ("MINIMIND_MODELSCOPE_ENDPOINT", "MODELSCOPE_ENDPOINT"):
        if os.environ.get(var):
            return os.environ[var].rstrip("/")
    if os.environ.get("MODELSCOPE_DOMAIN"):
        return "https://" + os.environ["MODELSCOPE_DOMAIN"].removeprefix("https://").rstrip("/")
    return MODELSCOPE_DEFAULT


def get_json(url: str) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "minimind"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def modelscope_remote(base: str, file: str) -> Remote:
    """The file's URL, and its size and sha256 from the dataset's file listing (the layout the
    modelscope SDK uses: dataset id, then `/repo/tree`). The listing is best effort: if its shape
    is not understood the download goes on, checked against the size the download itself announces."""
    owner, name = MODELSCOPE_REPO.split("/")
    query = urllib.parse.urlencode({"Source": "SDK", "Revision": "master", "FilePath": file})
    remote = Remote(f"{base}/api/v1/datasets/{owner}/{name}/repo?{query}")
    info_url = f"{base}/api/v1/datasets/{owner}/{name}"
    try:
        dataset_id = get_json(info_url)["Data"]["Id"]
        for page in range(1, 100):
            params = {"Revision": "master", "Root": "/", "Recursive": "True", "PageNumber": page, "PageSize": 100}
            files = get_json(f"{base}/api/v1/datasets/{dataset_id}/repo/tree?{urllib.parse.urlencode(params)}")
            files = files["Data"]["Files"]
            entry = next((f for f in files if f.get("Path") == file), None)
            if entry is not None:
                remote.size = int(entry["Size"]) if entry.get("Size") is not None else None
                remote.sha256 = (entry.get("Sha256") or "").lower() or None
                return remote
            if len(files) < 100:
                raise DownloadError(f"{remote.url}: {file} is not in {MODELSCOPE_REPO}'s file list; {hint('ms')}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DownloadError(f"{info_url}: not found (HTTP 404); {hint('ms')}") from None
        print(f"warning: {info_url}: HTTP {e.code}; downloading without a checksum", file=sys.stderr)
    except (KeyError, TypeError, ValueError) as e:
        print(f"warning: ModelScope's file list not understood ({type(e).__name__}: {e}); no checksum", file=sys.stderr)
    return remote


def content_range(headers: Any) -> tuple[int, int | None] | None:
    """(first byte, total size or None) of a `Content-Range: bytes a-b/total` header, if any."""
    value = headers.get("Content-Range", "")
    if not value.startswith("bytes ") or "-" not in value:
        return None
    first, _, total = value[6:].partition("/")
    return int(first.split("-")[0]), int(total) if total.strip().isdigit() else None


def http_download(url: str, part: Path, size: int | None, label: str) -> None:
    """Stream `url` into `part`, asking with a Range header for what `part` does not yet hold.

    A 206 answer is appended, a 200 (the server ignored the Range) starts over. A dropped connection,
    a timeout or a 5xx is retried; RETRIES attempts in a row that leave `part` no longer than it ever
    was give up, and the .part stays for next time.
    """
    from minimind.data.cache import progress

    stalled, best = 0, -1
    with progress(size, label) as bar:  # size None (unknown): a bar without a total
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have >= size:
                if have == size:
                    return
                part.unlink()  # longer than the file: not a prefix of it
                continue
            best = max(best, have)
            headers = {"User-Agent": "minimind", "Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                    span = content_range(r.headers)
                    if r.status != 206 or span is None or span[0] != have:
                        have = 0  # the whole file is coming: start over
                    bar.n = have
                    bar.refresh()
                    if size is None:
                        length = r.headers.get("Content-Length")
                        size = span[1] if span else int(length) if length else None
                        bar.total = size
                    with open(part, "ab" if have else "wb") as f:
                        while block := r.read(CHUNK):
                            f.write(block)
                            bar.update(len(block))
                if size is None:
                    return  # nothing to check the length against: the end of the stream is the end
                error = "the connection ended early"
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # asked past the end: the .part is not from this file
                    part.unlink()
                    continue
                if e.code < 500 and e.code != 429:
                    why = "not found (HTTP 404)" if e.code == 404 else f"HTTP {e.code}"
                    raise DownloadError(f"{url}: {why}; {hint('ms')}") from None
                error = f"HTTP {e.code}"
            except (OSError, http.client.HTTPException) as e:  # unreachable, timeout, connection cut mid-body
                error = f"{type(e).__name__}: {e}"
            now = part.stat().st_size if part.exists() else 0
            stalled = 0 if now > best else stalled + 1
            if stalled >= RETRIES:
                kept = f"{now:,} bytes kept in {part} for next time; " if now else ""
                raise DownloadError(f"{url}: download failed ({error}); {kept}{hint('ms')}")
            if stalled:
                time.sleep(min(0.25 * 2**stalled, 8))


def fetch_modelscope(ds: Dataset, out: Path, force: bool) -> tuple[Path, str]:
    """Download over plain HTTP(S) to `FILE.part`, verify, then rename into place."""
    base = modelscope_endpoint()
    dest, part = out / ds.file, out / f"{ds.file}.part"
    try:
        remote = modelscope_remote(base, ds.file)
    except (OSError, http.client.HTTPException) as e:
        if dest.is_file() and not force:
            return dest, f"present (server unreachable: {e}; not compared with it)"
        raise DownloadError(f"{base}: cannot reach the server ({e}); {hint('ms')}") from None
    if dest.is_file() and not force:
        if remote.size is None and not remote.sha256:
            return dest, "present (the server gives no size or checksum to compare with)"
        problem = mismatch(dest, remote)
        if problem is None:
            return dest, f"present, {checked(remote)} verified against {remote.url}"
        print(f"{dest}: the copy here differs from the server's ({problem}); downloading it again", file=sys.stderr)
    if force:
        part.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    http_download(remote.url, part, remote.size, ds.file)
    problem = mismatch(part, remote)
    if problem:
        part.unlink()
        raise DownloadError(f"{dest}: damaged download removed: {problem}; run the command again")
    os.replace(part, dest)
    return dest, f"downloaded, {checked(remote)} verified against {remote.url}"


# ---- checks on records ---------------------------------------------------------------------------


def record_check(kind: str) -> Callable[[dict, str], object]:
    """The per-record validation of the stage that reads `kind` (DataError naming `where` if refused)."""
    if kind == "chat":
        from minimind.data.messages import check_messages

        def conversation(obj: dict, where: str) -> object:
            if "conversations" not in obj:  # as iter_conversations words it
                raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
            return check_messages(obj["conversations"], where)

        return conversation
    if kind == "pairs":
        from minimind.data.preference import check_pair

        return check_pair
    if kind == "prompts":
        from minimind.data.prompts import check_prompt

        return check_prompt
    if kind == "text":

        def text(obj: dict, where: str) -> object:  # what iter_pretrain_texts keeps
            if not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise DataError(f"{where}: no non-empty string 'text'")
            return obj["text"]

        return text
    return lambda obj, where: obj


def validate(path: Path, ds: Dataset) -> tuple[int, int, str | None]:
    """(usable records, refused records, first refusal). A line that is not JSON is a DataError."""
    from tqdm.auto import tqdm

    check = record_check(ds.kind)
    good = bad = 0
    first = None
    lines = iter_jsonl(path)
    big = path.stat().st_size > 64 * CHUNK
    try:
        for lineno, obj in tqdm(lines, desc=f"reading {path.name}", unit=" lines", disable=None if big else True):
            try:
                check(obj, f"{path}:{lineno}")
                good += 1
            except DataError as e:
                bad += 1
                first = first or str(e)
    except DataError as e:
        raise DataError(f"{e}; the file looks damaged: download it again with --force") from None
    if not good:
        raise DataError(f"{path}: none of its {bad:,} records can be read by {ds.readers} (first: {first})")
    return good, bad, first


# ---- CLI -----------------------------------------------------------------------------------------


def add_download_arguments(p: Any) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="data sets to fetch (see --list)")
    p.add_argument("--source", choices=("hf", "modelscope"), default="hf", help="Hugging Face Hub or ModelScope")
    p.add_argument("--out", default="dataset", metavar="DIR", help="where the files go (default: dataset)")
    p.add_argument("--list", action="store_true", help="list the data sets, their files, stages and sizes")
    p.add_argument("--force", action="store_true", help="download again even if a complete copy is present")
    p.add_argument("--no-validate", action="store_true", help="skip reading every record after the download")


def print_list() -> None:
    rows = [("name", "file", "read by `minimind ...`", "size", "what")]
    rows += [(d.name, d.file, d.read_by or "-", d.size, d.note) for d in DATASETS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    print(f"\nsources: https://huggingface.co/datasets/{HF_REPO} (--source hf, HF_ENDPOINT)")
    print(f"         {MODELSCOPE_DEFAULT}/datasets/{MODELSCOPE_REPO} (--source modelscope, MODELSCOPE_ENDPOINT)")
    print("quick start: minimind data download pretrain_t2t_mini sft_t2t_mini")


def main(args: Any) -> None:
    if args.list:
        print_list()
        return
    if not args.names:
        raise ConfigError("name at least one data set (e.g. `minimind data download dpo`), or see --list")
    chosen = list(dict.fromkeys(lookup(n) for n in args.names))
    out = Path(args.out)
    fetch = fetch_hf if args.source == "hf" else fetch_modelscope
    for ds in chosen:
        path, what = fetch(ds, out, args.force)
        print(f"{path}: {what}")
        if args.no_validate:
            continue
        good, bad, first = validate(path, ds)
        unit = UNITS.get(ds.kind, "records")
        print(f"{path}: {good:,} {unit} for {ds.readers}")
        if bad:
            print(
                f"{path}: {bad:,} other record(s) would be refused (first: {first}); "
                "train with --skip-bad-lines to leave them out"
            )
