"""The HTTP application: OpenAI's chat and text completion endpoints, /health, and the chat page at /.

    GET  /                      the web chat page (static/index.html; open)
    GET  /health                status, model, counters (open: no secrets in it)
    GET  /v1/models             the one model served
    POST /v1/chat/completions   chat runs; stream or not; reasoning_content; tool calls
    POST /v1/completions        text continuation (pretrained runs, and chat runs as plain text)

With an API key every /v1 route needs `Authorization: Bearer KEY`. Every error is OpenAI's JSON
body `{"error": {"message", "type", "param", "code"}}`: validation errors are 400 (not FastAPI's
422), unknown paths 404, a wrong key 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from minimind.checkpoint import Run
from minimind.errors import MiniMindError
from minimind.generate import SamplingParams
from minimind.serve.protocol import (
    MAX_N,
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    validation_error,
)
from minimind.serve.textstream import ChoiceText
from minimind.serve.tools import to_chatml
from minimind.serve.worker import Cancelled, Choice, Job, Pool

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = SamplingParams.temperature, SamplingParams.top_p


class Server:
    """What the routes share: the run, the worker pool, limits, the key."""

    def __init__(self, run: Run, name: str, api_key: str | None, max_concurrency: int, max_tokens_cap: int):
        self.run, self.name, self.api_key = run, name, api_key
        self.max_tokens_cap = max_tokens_cap
        self.pool = Pool(run.model, max_concurrency)
        self.created = int(time.time())

    @property
    def context(self) -> int:
        return self.run.cfg.max_position_embeddings

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model", "model_not_found"
            )

    def sampling(self, req: SamplingFields, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        """The request's sampling settings; max_tokens capped by --max-tokens-cap and what the context leaves."""
        if prompt_len >= self.context:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but the model's context is {self.context}; "
                "shorten the messages or the prompt",
                "messages" if isinstance(req, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        room = self.context - prompt_len
        top_p = DEFAULT_TOP_P if req.top_p is None else req.top_p
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return SamplingParams(
            max_new_tokens=min(max_tokens or self.max_tokens_cap, self.max_tokens_cap, room),
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=top_p if top_p > 0 else 1e-9,  # top_p 0 keeps only the most likely token
            top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop_ids=() if req.ignore_eos else self.run.tokenizer.stop_ids,
            seed=seed % 2**64,
        )

    async def complete(self, job: Job, request: Request) -> list[Choice]:
        """Run a job to the end; stop it if the client disconnects while it waits or runs."""
        future = self.pool.submit(job)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    job.cancel.set()
        finally:
            job.cancel.set()

    async def stream(
        self,
        job: Job,
        first: list[dict[str, Any]],
        piece: Callable[[int, str, str], dict[str, Any]],
        last: Callable[[list[Choice]], list[dict[str, Any]]],
    ) -> AsyncIterator[str]:
        """Server-sent events: `first` chunks, one chunk per text piece as it is generated, `last`
        chunks once the job ends, then `data: [DONE]`. Leaving early (the client went away) cancels
        the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.emit = lambda row, kind, text: loop.call_soon_threadsafe(queue.put_nowait, (row, kind, text))
        future = self.pool.submit(job)
        future.add_done_callback(lambda _: queue.put_nowait(None))  # after every emit (same FIFO)
        try:
            for chunk in first:
                yield sse(chunk)
            while (event := await queue.get()) is not None:
                yield sse(piece(*event))
            try:
                choices = future.result()
            except MiniMindError as e:
                yield sse(APIError(400, str(e)).body())
                return
            except Cancelled:
                return
            except Exception as e:  # the stream has started: report in-band, as OpenAI does
                yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
                return
            for chunk in last(choices):
                yield sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its generator (so a cancelled job is stopped at once)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def completion_prompts(prompt: str | list[Any], n: int, tok: Any) -> list[list[int]]:
    """Prompt ids from text(s) or token ids. Text gets a leading <|im_start|> (how pretraining saw
    documents) unless it already starts with one (a chat prompt rendered by the client)."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items or len(items) * n > MAX_N:
        raise APIError(400, f"give 1 to {MAX_N} prompts (counting each of the n choices)", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tok.encode(item)
            out.append(ids if ids[:1] == [tok.bos_id] else [tok.bos_id] + ids)
        elif not item or not all(0 <= i < tok.vocab_size for i in item):
            raise APIError(400, f"token id prompts must be non-empty and within 0..{tok.vocab_size - 1}", "prompt")
        else:
            out.append(list(item))
    return out


# ---- routes ------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.pool.shutdown()

    app = FastAPI(title="MiniMind", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    tok = server.run.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = f"unknown path {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        code = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, message, None, code))

    @app.exception_handler(MiniMindError)
    async def _minimind(_: Request, e: MiniMindError) -> JSONResponse:
        return error_response(APIError(400, str(e)))

    @app.exception_handler(Cancelled)
    async def _cancelled(_: Request, e: Cancelled) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("minimind.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        with server.pool.lock:
            stats = dict(server.pool.stats)
        return {
            "status": "ok",
            "model": server.name,
            "chat": server.run.is_chat,
            "auth": server.api_key is not None,
            "context": server.context,
            "max_tokens_cap": server.max_tokens_cap,
            **stats,
        }

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": server.name,
            "object": "model",
            "created": server.created,
            "owned_by": "minimind",
            "max_model_len": server.context,
        }
        return {"object": "list", "data": [card]}

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        server.check_model(req.model)
        if not server.run.is_chat:
            raise APIError(
                400,
                f"{server.name!r} is a pretrained text run (no chat template yet): use /v1/completions",
                "messages",
                "chat_not_supported",
            )
        if req.tool_choice is not None and isinstance(req.tool_choice, str):
            if req.tool_choice not in ("none", "auto", "required"):
                raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or a function", "tool_choice")
        use_tools = bool(req.tools) and req.tool_choice != "none"
        messages = to_chatml(req.messages, req.tools if use_tools else None)
        think = req.thinking()
        ids = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=think)
        params = server.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens)
        stops = req.stop_strings()
        texts = [ChoiceText(tok, stops, chat=True, in_think=think is True, tools=use_tools) for _ in range(req.n)]
        job = Job([ids] * req.n, params, texts)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            choices = await server.complete(job, request)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": server.name,
                "choices": [
                    {
                        "index": c.index,
                        "message": {
                            "role": "assistant",
                            "content": None if c.tool_calls and not c.content else c.content,
                            "reasoning_content": c.reasoning or None,
                            **({"tool_calls": c.tool_calls} if c.tool_calls else {}),
                        },
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                "usage": usage(len(ids), choices),
                "system_fingerprint": None,
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
            return {**body, "choices": choices, **({"usage": None} if include_usage else {}), **extra}

        def delta(index: int, d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return chunk([{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}])

        def piece(index: int, kind: str, text: str) -> dict[str, Any]:
            return delta(index, {"reasoning_content" if kind == "reasoning" else "content": text})

        def last(choices: list[Choice]) -> list[dict[str, Any]]:
            out = []
            for c in choices:
                if c.tool_calls:
                    calls = [{"index": k, **call} for k, call in enumerate(c.tool_calls)]
                    out.append(delta(c.index, {"tool_calls": calls}))
                out.append(delta(c.index, {}, c.finish_reason))
            if include_usage:
                out.append(chunk([], usage=usage(len(ids), choices)))
            return out

        first = [delta(i, {"role": "assistant", "content": ""}) for i in range(req.n)]
        return SSEResponse(server.stream(job, first, piece, last))

    @v1.post("/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        prompts = completion_prompts(req.prompt, req.n, tok)
        params = server.sampling(req, max(map(len, prompts)), req.max_tokens)
        stops = req.stop_strings()
        rows = [p for p in prompts for _ in range(req.n)]
        job = Job(rows, params, [ChoiceText(tok, stops, chat=False) for _ in rows])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(map(len, prompts))

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                    "choices": choices, **extra}  # fmt: skip

        def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            choices = await server.complete(job, request)
            body = chunk([choice(c.index, c.content, c.finish_reason) for c in choices])
            return {**body, "usage": usage(prompt_tokens, choices)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def last(choices: list[Choice]) -> list[dict[str, Any]]:
            out = [chunk([choice(c.index, "", c.finish_reason)]) for c in choices]
            return out + ([chunk([], usage=usage(prompt_tokens, choices))] if include_usage else [])

        return SSEResponse(server.stream(job, [], lambda i, _, text: chunk([choice(i, text, None)]), last))

    app.include_router(v1)
    return app
