"""The OpenAI wire format: request bodies (validated by pydantic) and the error shape.

Only what the server acts on is declared; other fields an OpenAI client may send (`user`,
`logit_bias`, `presence_penalty`, ...) are accepted and ignored, as vLLM and llama.cpp's server do.
Ranges follow OpenAI's API reference (temperature 0..2, top_p 0..1), so a request OpenAI would
refuse is refused here too, with the same `{"error": {message, type, param, code}}` body.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request: they decode as one batch, so memory grows with n
MAX_STOP = 8  # stop strings per request (OpenAI allows 4)


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status (4xx: the client's fault)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; a dict is accepted too


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thinking, as this server returns it


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")  # rendered as the client wrote it (`strict`, ...)

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions. None means the server default."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # vLLM extension; 0 = off
    repetition_penalty: float | None = Field(default=None, gt=0)  # vLLM extension; 1 = off
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: generate max_tokens whatever the model says

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        return stops


class ChatRequest(SamplingFields):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" turns tools off; others behave as "auto"
    enable_thinking: bool | None = None  # like vLLM/SGLang; also read from chat_template_kwargs
    chat_template_kwargs: dict[str, Any] | None = None

    def thinking(self) -> bool | None:
        """Top-level `enable_thinking` wins over `chat_template_kwargs.enable_thinking`; None: the model decides."""
        if self.enable_thinking is not None:
            return self.enable_thinking
        kwargs = self.chat_template_kwargs or {}
        value = kwargs.get("enable_thinking", kwargs.get("open_thinking"))  # ours, or upstream's name
        if value is not None and not isinstance(value, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # text(s) or token ids, as OpenAI accepts


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming the field (`messages.0.role`), as OpenAI answers."""
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    # pydantic adds union members to the location (`content.str`); keep only field names and indices
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and (isinstance(p, int) or p.isidentifier())]
    loc = [p for p in loc if p not in ("str", "int", "float", "bool", "dict", "list")]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", None, "invalid_json")
    if e.get("type") == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param, "missing_required_parameter")
    return APIError(400, f"invalid value for '{param}': {e.get('msg', 'invalid')}", param, "invalid_value")
