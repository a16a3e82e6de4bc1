"""Data at scale (issue 17): tokenizing upstream-sized data sets in bounded memory, once per machine.

Upstream MiniMind's data sets run to gigabytes (pretrain_hq.jsonl 1.6 GB, sft_mini_512.jsonl 1.2 GB,
the larger SFT files 7-14 GB). The token caches stream to disk, so a run's peak memory should not
grow with the file; this benchmark shows it, and how close tokenizing comes to the tokenizer's own
speed. For each size in `--sizes` (GiB) it

1. writes a pretraining file (`{"text": ...}` per line, like pretrain_hq.jsonl) and an SFT file
   (`{"conversations": [user, assistant, ...]}`, 1-3 turns, like sft_mini_512.jsonl) into `--work`,
   or reuses them (the size is in the name; a file appears only once complete). The records are
   real text: random windows of the documents in ../shared/data/zh_text_sample.jsonl and the
   segments of upstream's pretrain_hq head (../shared/data/upstream_pretrain_hq_head100.jsonl), read
   at run time, with random numbers spliced in every ~60 characters. Repeated text would flatter the
   speed (the BPE keeps a cache of words it has seen); the splices make most words new. Every size
   is drawn from the same seed, so a smaller file is a prefix of a larger one;
2. runs `minimind pretrain` and `minimind sft` for one optimizer step on it, as a user would (a child
   process, a fresh empty --cache-dir, the `tiny` model, batch 2 x 512 tokens), and reads the cache's
   own report (`tokenized R records, T tokens in S s (M tokens/s, MB/s)`; for SFT, R counts the
   conversations kept), the wall time and the peak memory (below);
3. runs the pretraining step under `torchrun --nproc_per_node 2` on the smallest file with a fresh
   cache, and checks that exactly one process tokenized (one `tokenized` line, from local rank 0),
   that the other said it was waiting, and that both trained (every worker exited 0 after the step:
   a DDP step cannot finish with one rank missing);
4. measures the bound: `tokenizers.Tokenizer.encode_batch` (and `encode_batch_fast` where the library
   has it) on the same texts, the first `--bound-mb` MB of each file, in batches of 2048 texts on all
   cores, with nothing else around it. "% of bound" is the cache's input MB/s over the bound's: the
   same measure as tokens/s on the same text, and one that also holds for SFT, whose token count
   (ChatML headers added, truncated turns left out) is not what the tokenizer was given.

Peak memory, two figures. Peak RSS: a small Python parent runs the command and reads
`getrusage(RUSAGE_CHILDREN).ru_maxrss` after it exits, the kernel's exact high-water mark of the
largest process below it (for torchrun, the largest of the launcher and its workers); the same on
every OS, and independent of GNU time's version (1.7 reported %M four times too high). It counts
the pages of a memory-mapped cache that a process has read, which are the kernel's page cache, not
memory the run holds: SFT reads its whole `.mask` to count the trained tokens, so its RSS grows by
one byte per token. Peak anon (Linux): RssAnon summed over all the run's processes, sampled from
/proc every 50 ms: the memory the run needs of its own, the figure that must stay flat.

The figures take time at the default sizes (tokenizing 3 GiB on 2 cores is several minutes per
format); run it on a quiet machine. Usage:

    .venv/bin/python benchmarks/data_scale.py [--sizes 0.3 1 3] [--tokenizer DIR] [--work DIR] [--write]

Without --tokenizer it trains a 6,400-id tokenizer (upstream's size) on zh_text_sample.jsonl with
`minimind tokenizer`, once. With --write the table replaces the `## Data at scale (issue 17)`
section of BENCHMARKS.md (or is appended). The raw figures go to WORK/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SECTION = "## Data at scale (issue 17)"
CONTROL = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>")
SPLICE_EVERY = 60  # characters per spliced-in number
SFT_CHARS = 512  # upstream's sft_mini_512 keeps conversations under 512 characters
BATCH = 2048
SEED = 0

# Runs the command and writes the largest RSS among its descendants (KiB on Linux, bytes on macOS).
RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)"
)


# ---- input files -------------------------------------------------------------------------------


class Records:
    """Upstream-format records drawn from real text, perturbed so that no two are alike."""

    def __init__(self, zh_path: Path, upstream_path: Path, seed: int = SEED):
        self.rng = random.Random(seed)
        self.docs = [json.loads(line)["text"] for line in open(zh_path, encoding="utf-8")]
        # Upstream's pretraining texts are ChatML-wrapped question+answer segments joined by spaces.
        self.segments = [
            s.strip()
            for line in open(upstream_path, encoding="utf-8")
            for s in CONTROL.split(json.loads(line)["text"])
            if s.strip()
        ]
        self.plain = [CONTROL.sub("", d) for d in self.docs] + self.segments  # SFT contents may hold no control token

    def spliced(self, text: str) -> str:
        """`text` with a random number at random places, one per ~SPLICE_EVERY characters."""
        rng, k = self.rng, len(text) // SPLICE_EVERY
        if not k:
            return text
        cuts = sorted(rng.randrange(len(text)) for _ in range(k))
        parts, prev = [], 0
        for cut in cuts:
            parts += [text[prev:cut], str(rng.randrange(10 ** rng.randint(1, 6)))]
            prev = cut
        parts.append(text[prev:])
        return "".join(parts)

    def window(self, text: str, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        if len(text) <= n:
            return text
        start = self.rng.randrange(len(text) - n + 1)
        return text[start : start + n]

    def pretrain(self) -> dict:
        rng = self.rng
        if rng.random() < 0.3:  # upstream's own shape: several <|im_start|>...<|im_end|> segments
            segments = (self.spliced(rng.choice(self.segments)) for _ in range(rng.randint(3, 12)))
            return {"text": " ".join(f"<|im_start|>{s}<|im_end|>" for s in segments)}
        return {"text": self.spliced(self.window(rng.choice(self.docs), 100, 1500))}

    def sft(self) -> dict:
        """1-3 turns; later turns only while the conversation stays under SFT_CHARS characters, as in
        sft_mini_512.jsonl, so that few are truncated at --max-seq-len 512."""
        rng, messages, total = self.rng, [], 0
        for turn in range(rng.randint(1, 3)):
            pair = []
            for role, lo, hi in (("user", 5, 120), ("assistant", 20, 300)):
                content = self.spliced(self.window(rng.choice(self.plain), lo, hi)).strip()
                pair.append({"role": role, "content": content or str(rng.randrange(10**6))})
            total += sum(len(m["content"]) for m in pair)
            if turn and total > SFT_CHARS:
                break
            messages += pair
        return {"conversations": messages}


def write_jsonl(path: Path, size: int, make: Callable[[], dict]) -> None:
    """Lines of `make()` until `size` bytes, streamed through a `.partial` file renamed when complete."""
    partial = path.with_name(path.name + ".partial")
    written, lines = 0, []
    with open(partial, "wb") as f:
        while written < size:
            line = (json.dumps(make(), ensure_ascii=False) + "\n").encode()
            lines.append(line)
            written += len(line)
            if len(lines) == 4096:
                f.write(b"".join(lines))
                lines = []
        f.write(b"".join(lines))
    os.replace(partial, path)


def input_file(work: Path, kind: str, gib: float, args: argparse.Namespace) -> Path:
    """The `kind` file of `gib` GiB in `work`, written unless a complete one is there."""
    path = work / f"{kind}-{gib:g}gib.jsonl"
    if path.is_file():
        print(f"reusing {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)
        return path
    records = Records(Path(args.zh), Path(args.upstream))  # a fresh seed per file: small files are prefixes
    t0 = time.perf_counter()
    write_jsonl(path, int(gib * 2**30), records.pretrain if kind == "pretrain" else records.sft)
    dt = time.perf_counter() - t0
    print(f"wrote {path} ({gib:g} GiB) in {dt:.1f} s ({gib * 1024 / dt:.0f} MB/s)", flush=True)
    return path


# ---- running the CLI ---------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """Processes below `root`, from the parent ids in /proc (Linux)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        kids = [pid for pid, parent in parents.items() if parent == todo[-1]]
        todo.pop()
        out += kids
        todo += kids
    return out


def anon_kib(pids: list[int]) -> int:
    """RssAnon summed over `pids`: the memory they hold of their own, not file pages mapped in."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
        except OSError:
            continue
    return total


def measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; its wall time, exit status, output (also saved to `log`) and peak memory in GiB.

    Two peaks: `peak_rss_gib`, the kernel's exact high-water mark of the largest process (it counts
    the pages of the memory-mapped caches a process has read, which the kernel can drop at will),
    and on Linux `peak_anon_gib`, RssAnon summed over all processes below the wrapper, sampled every
    50 ms: the memory the run needs of its own (a spike shorter than the interval can slip by)."""
    sample = Path("/proc/self/status").is_file()
    peak_anon = 0
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        wrapper = [sys.executable, "-c", RSS_WRAPPER, rss.name, *cmd]
        proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs: list[str] = []
        reader = threading.Thread(target=lambda: outputs.extend(proc.communicate()))
        reader.start()
        while reader.is_alive():
            if sample:
                peak_anon = max(peak_anon, anon_kib(descendants(proc.pid)))
            reader.join(0.05)
        wall = time.perf_counter() - t0
        raw = rss.read().strip()
    stdout, stderr = outputs
    log.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{stdout}--- stderr\n{stderr}")
    unit = 1 if sys.platform == "darwin" else 1024
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_gib": int(raw) * unit / 2**30 if raw else float("nan"),
        "peak_anon_gib": peak_anon / 2**20 if sample else float("nan"),
        "stdout": stdout,
        "stderr": stderr,
    }


TOKENIZED = re.compile(
    r"tokenized ([\d,]+) records, ([\d,]+) tokens in ([\d.]+) s \(([\d.]+)M tokens/s, ([\d.]+) MiB/s\)"
)


def tokenized(text: str) -> list[dict]:
    """Every `tokenized ...` report a cache build printed."""
    return [
        {
            "records": int(m[1].replace(",", "")),
            "tokens": int(m[2].replace(",", "")),
            "tokenize_s": float(m[3]),
            "mtok_s": float(m[4]),
            "mb_s": float(m[5]),
        }
        for m in TOKENIZED.finditer(text)
    ]


def step_flags(args: argparse.Namespace, out: Path, cache: Path) -> list[str]:
    for path in (out, cache):
        shutil.rmtree(path, ignore_errors=True)
    return [
        *("--out", str(out), "--cache-dir", str(cache), "--max-seq-len", "512"),
        *("--batch-size", str(args.batch_size), "--accumulation", "1", "--max-steps", "1", "--log-every", "1"),
        *("--device", args.device),
    ]


def run_stage(args: argparse.Namespace, label: str, launcher: list[str], stage_args: list[str]) -> dict:
    """One optimizer step of a stage with a fresh cache; the figures, or exit with the child's output."""
    work = Path(args.work)
    out, cache = work / "runs" / label, work / "caches" / label
    cmd, log = [*launcher, *stage_args, *step_flags(args, out, cache)], work / "logs" / f"{label}.log"
    print(f"{label}: {shlex.join(cmd)}", flush=True)
    result = measured(cmd, log)
    shutil.rmtree(cache, ignore_errors=True)  # gigabytes at the larger sizes
    if result["rc"]:
        sys.exit(f"{label} failed (exit {result['rc']}); output in {log}:\n{result['stderr']}")
    reports = tokenized(result["stdout"])
    if not reports:
        sys.exit(f"{label}: no `tokenized ...` line in its output (was the cache not fresh?)")
    figures = {"command": shlex.join(cmd), **reports[0], "builds": len(reports)}
    figures.update({k: result[k] for k in ("wall_s", "peak_rss_gib", "peak_anon_gib")})
    if launcher[0] != sys.executable:  # torchrun: who tokenized, who waited, did both train
        lines = (result["stdout"] + result["stderr"]).splitlines()
        figures["tokenized_by"] = [line.split(":", 1)[0] for line in lines if TOKENIZED.search(line)]
        waits = [line.split(":", 1)[0] for line in lines if "waiting for local rank 0 to tokenize" in line]
        figures["waiting_messages"], figures["waited_ranks"] = len(waits), sorted(set(waits))
        figures["reused_by"] = [line.split(":", 1)[0] for line in lines if re.search(r":data: .*\(reused cache", line)]
        figures["trained_x"] = bool(re.search(rf"training .* x{args.nproc}: ", result["stdout"]))
    print(f"  {json.dumps({k: v for k, v in figures.items() if k != 'command'})}", flush=True)
    return figures


def tokenizer_dir(args: argparse.Namespace) -> Path:
    """--tokenizer, or one trained here on the real Chinese sample (once, kept in --work)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    path = Path(args.work) / "tokenizer-zh6400"
    if not (path / "tokenizer.json").is_file():
        cmd = [sys.executable, "-m", "minimind", "tokenizer", "--data", args.zh, "--vocab-size", "6400"]
        subprocess.run([*cmd, "--out", str(path)], check=True)
    return path


def parent_run(args: argparse.Namespace, tok: Path) -> Path:
    """A freshly initialised `tiny` run for SFT's --from, one per tokenizer, kept in --work."""
    tok_json = tok / "tokenizer.json" if tok.is_dir() else tok
    digest = hashlib.sha256(tok_json.read_bytes()).hexdigest()[:12]
    path = Path(args.work) / f"parent-tiny-{digest}"
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        cmd = [sys.executable, "-m", "minimind", "init", "--preset", "tiny", "--tokenizer", str(tok)]
        subprocess.run([*cmd, "--out", str(path)], check=True, capture_output=True)
    return path


# ---- the bound ---------------------------------------------------------------------------------


def sample_texts(path: Path, kind: str, mb: float) -> tuple[list[str], int, int]:
    """The texts the cache would encode from the first `mb` MB of `path`: (texts, bytes, records)."""
    texts, size, records = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            obj = json.loads(line)
            if kind == "pretrain":
                texts.append(obj["text"])
            else:
                texts += [m["content"] for m in obj["conversations"]]
            size += len(line)
            records += 1
            if size >= mb * 2**20:
                break
    return texts, size, records


def bound(tok: Path, path: Path, kind: str, mb: float, repeats: int) -> dict:
    """The tokenizers library's own speed on `path`'s texts, batches of BATCH, all cores, ids read out."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tok / "tokenizer.json" if tok.is_dir() else tok))
    texts, size, records = sample_texts(path, kind, mb)
    out = {"sample_mb": size / 2**20, "texts": len(texts)}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(backend, name, None)
        if encode is None:
            continue
        encode(texts[:BATCH], add_special_tokens=False)  # warm-up: rayon's thread pool
        dt = float("inf")
        for _ in range(repeats):  # best of: a bound, not a typical figure
            tokens, t0 = 0, time.perf_counter()
            for i in range(0, len(texts), BATCH):
                tokens += sum(len(e.ids) for e in encode(texts[i : i + BATCH], add_special_tokens=False))
            dt = min(dt, time.perf_counter() - t0)
        if kind == "pretrain":
            tokens += 2 * records  # BOS and EOS per document, as the cache counts them
        out[name] = {"mtok_s": tokens / dt / 1e6, "mb_s": size / 2**20 / dt}
    return out


# ---- report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import tokenizers
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM, {platform.system()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, tokenizers {tokenizers.__version__}"
    )


def table(rows: list[dict], bounds: dict) -> str:
    def share(row: dict, name: str) -> str:
        b = bounds[row["kind"]].get(name)
        return f"{100 * row['mb_s'] / b['mb_s']:.0f}%" if b else "-"

    head = (
        "| run | file GiB | records | tokens | tokenize s | M tokens/s | MB/s | % of encode_batch "
        "| % of encode_batch_fast | peak RSS GiB | peak anon GiB | one-step wall s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['gib']:g} | {r['records']:,} | {r['tokens']:,} | {r['tokenize_s']:.1f} "
            f"| {r['mtok_s']:.2f} | {r['mb_s']:.1f} | {share(r, 'encode_batch')} | {share(r, 'encode_batch_fast')} "
            f"| {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | {r['wall_s']:.1f} |"
        )
    lines.append("")
    for kind, b in bounds.items():
        rates = ", ".join(
            f"`{n}` {b[n]['mtok_s']:.2f}M tokens/s ({b[n]['mb_s']:.1f} MB/s)"
            for n in ("encode_batch", "encode_batch_fast")
            if n in b
        )
        lines.append(f"Bound, {kind} ({b['sample_mb']:.0f} MB sample, {b['texts']:,} texts): {rates}.")
    return "\n".join(lines)


def ranks(prefixes: list[str]) -> str:
    """torchrun's `[default1]` line prefixes as `local rank 1`."""
    return ", ".join(re.sub(r"\[default(\d+)\]", r"local rank \1", p) for p in prefixes) or "none"


def write_section(text: str) -> None:
    """Replace the section in BENCHMARKS.md (up to the next `## ` heading), or append it."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    start = doc.find(SECTION + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end + 1 :] if end >= 0 else "")
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[0.3, 1, 3], help="file sizes in GiB")
    p.add_argument("--work", default="/tmp/minimind-data-scale", help="input files, logs, runs (kept for reuse)")
    p.add_argument("--tokenizer", help="tokenizer dir (e.g. upstream's); default: train one on the zh sample")
    p.add_argument("--zh", default=str(SHARED_DATA / "zh_text_sample.jsonl"))
    p.add_argument("--upstream", default=str(SHARED_DATA / "upstream_pretrain_hq_head100.jsonl"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun case (0: skip it)")
    p.add_argument("--bound-mb", type=float, default=50, help="MB of each file the bound encodes")
    p.add_argument("--bound-repeats", type=int, default=2, help="passes over the sample; the fastest counts")
    p.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md")
    args = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # all cores, in the children and in the bound alike
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)

    tok = tokenizer_dir(args)
    parent = parent_run(args, tok)
    files = {(kind, gib): input_file(work, kind, gib, args) for gib in sizes for kind in ("pretrain", "sft")}

    minimind = [sys.executable, "-m", "minimind"]
    rows = []
    for gib in sizes:
        pretrain = ["pretrain", "--data", str(files["pretrain", gib]), "--tokenizer", str(tok), "--preset", "tiny"]
        sft = ["sft", "--data", str(files["sft", gib]), "--from", str(parent)]
        for kind, stage in (("pretrain", pretrain), ("sft", sft)):
            label = f"{kind}-{gib:g}gib"
            rows.append({"label": label, "kind": kind, "gib": gib, **run_stage(args, label, minimind, stage)})
    if args.nproc > 1:
        gib = sizes[0]
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
        launcher += ["--standalone", "--nproc_per_node", str(args.nproc), "--tee", "3", "-m", "minimind"]
        stage = ["pretrain", "--data", str(files["pretrain", gib]), "--tokenizer", str(tok), "--preset", "tiny"]
        label = f"pretrain-{gib:g}gib-torchrun{args.nproc}"
        row = run_stage(args, label, launcher, stage)
        others = args.nproc - 1
        once = row["builds"] == 1 and len(row["waited_ranks"]) == len(row["reused_by"]) == others and row["trained_x"]
        row["one_tokenization"] = once
        rows.append({"label": label, "kind": "pretrain", "gib": gib, **row})
        print(
            f"torchrun x{args.nproc}: {row['builds']} tokenization(s) (by {row['tokenized_by']}), "
            f"ranks waiting: {row['waited_ranks']} ({row['waiting_messages']} message(s)), "
            f"ranks that memory-mapped rank 0's cache: {row['reused_by']}, "
            f"trained x{args.nproc}: {row['trained_x']} -> "
            f"{'OK' if once else 'NOT one tokenization per machine'}",
            flush=True,
        )

    bounds = {k: bound(tok, files[k, sizes[-1]], k, args.bound_mb, args.bound_repeats) for k in ("pretrain", "sft")}
    (work / "results.json").write_text(json.dumps({"rows": rows, "bounds": bounds}, indent=1))

    command = shlex.join([".venv/bin/python", "benchmarks/data_scale.py", *sys.argv[1:]])
    tok_name = f"`{args.tokenizer}`" if args.tokenizer else "a 6,400-id tokenizer trained on zh_text_sample.jsonl"
    figures = table(rows, bounds)
    print("\n" + figures)
    if args.write:
        notes = (
            f"{datetime.date.today()}, {machine()}. One optimizer step of the `tiny` model (batch "
            f"{args.batch_size} x 512, `--device {args.device}`) with a fresh token cache: the wall time is "
            f"start-up + tokenizing the whole file + one step. Tokenizer: {tok_name}. Files in upstream's formats, "
            "real Chinese text (windows of zh_text_sample.jsonl and of pretrain_hq's head, numbers spliced in); "
            "SFT records are the conversations kept (a few whose first reply exceeds 512 tokens are dropped). "
            "% of bound: the cache's input MB/s over the `tokenizers` library encoding the texts of the first "
            f"{args.bound_mb:g} MB of the largest file alone (batches of 2048, all cores, best of "
            f"{args.bound_repeats}). Peak RSS: the kernel's high-water mark of the largest process, which counts "
            "the pages of memory-mapped caches it has read (the kernel may drop those at will); peak anon: "
            "anonymous memory summed over the run's processes, sampled every 50 ms."
        )
        if args.nproc > 1:
            r = rows[-1]
            verdict = "one tokenization per machine" if r["one_tokenization"] else "**NOT one tokenization**"
            notes += (
                f"\n\ntorchrun x{args.nproc}: {r['builds']} `tokenized` report (from {ranks(r['tokenized_by'])}); "
                f"waiting: {ranks(r['waited_ranks'])}; memory-mapped rank 0's cache: {ranks(r['reused_by'])}; "
                f"the x{args.nproc} step done: {r['trained_x']}. So: {verdict}."
            )
        section = f"{SECTION}\n\n{notes}\n\n    {command}\n\n{figures}\n"
        write_section(section)
        print(f"wrote {SECTION!r} in {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
