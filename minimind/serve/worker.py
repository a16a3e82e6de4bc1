"""Generation off the event loop: a bounded pool of worker threads, a queue, cancellation.

Each request is one `Job` (its choices decode together as one batch in `minimind.generate`). At
most `max_concurrency` jobs run at once, each in its own thread; the others wait in the
executor's queue. PyTorch releases the GIL inside its kernels, so jobs overlap on the CPU/GPU while
the event loop keeps accepting requests and streaming tokens. A job whose client went away has its
`cancel` event set: it is skipped if still queued, or stopped at its next token.

Every job samples from its own `torch.Generator` seeded per request (a random seed when the client
sends none), so a seeded request gives the same text whatever else runs beside it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from minimind.generate import SamplingParams, generate
from minimind.model import MiniMind
from minimind.serve.textstream import ChoiceText


class Cancelled(Exception):
    """The client disconnected; the job stopped early."""


@dataclass
class Choice:
    index: int
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str  # stop | length | tool_calls
    tokens: int  # generated tokens, the stop token included


@dataclass
class Job:
    prompts: list[list[int]]  # one per choice
    params: SamplingParams
    texts: list[ChoiceText]  # one per choice
    emit: Callable[[int, str, str], None] | None = None  # (choice, kind, text), called from the worker thread
    cancel: threading.Event = field(default_factory=threading.Event)


class Pool:
    def __init__(self, model: MiniMind, max_concurrency: int):
        self.model = model
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="minimind-generate")
        self.lock = threading.Lock()
        self.stats = {"waiting": 0, "running": 0, "completed": 0, "cancelled": 0, "failed": 0}

    def _count(self, **deltas: int) -> None:
        with self.lock:
            for k, d in deltas.items():
                self.stats[k] += d

    def submit(self, job: Job) -> asyncio.Future:
        """Queue the job; the future resolves to its choices (or raises Cancelled / the error)."""
        self._count(waiting=1)
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._run, job)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        return future

    def _run(self, job: Job) -> list[Choice]:
        self._count(waiting=-1)
        if job.cancel.is_set():
            self._count(cancelled=1)
            raise Cancelled
        self._count(running=1)
        try:
            choices = self._generate(job)
        except Cancelled:
            self._count(running=-1, cancelled=1)
            raise
        except BaseException:
            self._count(running=-1, failed=1)
            raise
        self._count(running=-1, completed=1)
        return choices

    def _generate(self, job: Job) -> list[Choice]:
        def on_token(row: int, token: int) -> bool:
            if job.cancel.is_set():
                raise Cancelled
            pieces, end = job.texts[row].push(token)
            if job.emit is not None:
                for kind, text in pieces:
                    job.emit(row, kind, text)
            return end

        out = generate(self.model, job.prompts, job.params, on_token=on_token)
        choices = []
        for i, (g, text) in enumerate(zip(out.generations, job.texts)):
            for kind, piece in text.finish():
                if job.emit is not None:
                    job.emit(i, kind, piece)
            reason = "tool_calls" if text.tool_calls else g.finish_reason
            choices.append(
                Choice(i, text.text["reasoning"], text.text["content"], text.tool_calls, reason, len(g.tokens))
            )
        return choices

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
