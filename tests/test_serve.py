"""`minimind serve`: a real server (a `python -m minimind serve` process, or uvicorn in a thread)
driven by the official `openai` client and raw httpx.

Answers are checked against our own engine (`minimind.generate`) at temperature 0, streams against
non-streamed answers, usage against our tokenizer. The tool-call round trip uses a tiny model
fine-tuned through `minimind sft` on conversations rendered by the server's own tool rendering
(whose text is itself pinned here), so it emits the calls deterministically.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from minimind.chatformat import split_think
from minimind.checkpoint import load_run
from minimind.errors import ConfigError
from minimind.generate import SamplingParams, generate
from minimind.serve import add_arguments, background, build
from minimind.serve.protocol import ChatRequest
from minimind.serve.textstream import ChoiceText, StopStrings
from minimind.serve.tools import openai_tool_calls as parse_tool_calls
from minimind.serve.tools import to_chatml

KEY = "sk-test-1234"
AUTH = {"Authorization": f"Bearer {KEY}"}
WHERE = [{"role": "user", "content": "Where does Max live?"}]
SUM = [{"role": "user", "content": "13加27等于多少？"}]
QUESTIONS = [
    "Where does Max live?",
    "What pet does Sam have?",
    "13加27等于多少？",
    "阿亮住在哪里？",
    "What colour does Max like?",
    "48加0等于多少？",
    "Where does Sam live?",
    "你是谁？",
]
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def args_for(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(run, ids: list[int], max_new: int = 60) -> str:
    """What our engine says at temperature 0, as text (stop token dropped)."""
    tok = run.tokenizer
    g = generate(run.model, [ids], SamplingParams(max_new_tokens=max_new, temperature=0, stop_ids=tok.stop_ids))
    g = g.generations[0]
    return tok.decode(g.tokens[:-1] if g.finish_reason == "stop" else g.tokens, skip_special_tokens=True)


def stream_text(stream) -> tuple[dict[int, str], dict[int, str], dict[int, str], list]:
    """(content, reasoning, finish_reason) by choice index, and the chunks, from a chat stream."""
    content, reasoning, finish, chunks = {}, {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            content.setdefault(c.index, "")
            reasoning.setdefault(c.index, "")
            content[c.index] += c.delta.content or ""
            reasoning[c.index] += getattr(c.delta, "reasoning_content", None) or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return content, reasoning, finish, chunks


@pytest.fixture(scope="module")
def sft(pipeline):
    return load_run(pipeline["sft"])


@pytest.fixture(scope="module")
def server(pipeline):
    """`python -m minimind serve` on the SFT run, with an API key and 4 generations at a time."""
    port = free_port()
    cmd = [sys.executable, "-m", "minimind", "serve", str(pipeline["sft"]), "--port", str(port)]
    cmd += ["--api-key", KEY, "--max-concurrency", "4", "--max-tokens-cap", "4000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail("server exited: " + proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def health(url: str) -> dict:
    return httpx.get(url + "/health").json()


# ---- the output path, without a server ----------------------------------------------------------


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["END", "\n\n"])
    assert s.push("abc E") == ("abc ", False)  # "E" may begin "END"
    assert s.push("Nx") == ("ENx", False)
    assert s.push("yy\n") == ("yy", False)
    assert s.push("\nzz") == ("", True)


def test_choice_text_streams_what_it_returns_whole(tokenizer):
    """Token by token: reasoning, content and a parsed tool call; the pieces add up to the totals."""
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    reply = "<think>\nhm, weather\n</think>\n\nLet me check. " + call
    ids = tokenizer.encode(reply) + [tokenizer.eos_id]
    text = ChoiceText(tokenizer, [], chat=True, tools=True)
    pieces = []
    for i in ids:
        new, end = text.push(i)
        assert not end
        pieces += new
    pieces += text.finish()
    assert text.text == {"reasoning": "hm, weather", "content": "Let me check."}
    assert "".join(t for k, t in pieces if k == "reasoning") == "hm, weather"
    assert "".join(t for k, t in pieces if k == "content") == "Let me check."
    assert [c["function"] for c in text.tool_calls] == [{"name": "f", "arguments": '{"x": 1}'}]

    text = ChoiceText(tokenizer, ["check"], chat=True, tools=True)  # a stop string ends it early
    ends = [text.push(i)[1] for i in ids]
    assert any(ends) and text.text["content"] == "Let me" and text.tool_calls == []


def test_on_token_can_end_one_row():
    """The engine hook stop strings use: ending row 0 early leaves row 1 exactly as it was."""
    from conftest import sharp_model

    model = sharp_model()
    params = SamplingParams(max_new_tokens=12, temperature=0)
    alone = generate(model, [[5, 6, 7]], params).generations[0]
    seen = {0: 0, 1: 0}

    def on_token(row: int, token: int) -> bool:
        seen[row] += 1
        return row == 0 and seen[0] == 3

    out = generate(model, [[5, 6, 7], [5, 6, 7]], params, on_token=on_token).generations
    assert (out[0].tokens, out[0].finish_reason) == (alone.tokens[:3], "stop")
    assert (out[1].tokens, out[1].finish_reason) == (alone.tokens, "length") and seen == {0: 3, 1: 12}


def test_tool_call_parsing():
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')[1][0]["function"] == {
        "name": "f",
        "arguments": "{}",
    }
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}')[1][0]["function"]["arguments"] == (
        '{"a": 2}'
    )  # unclosed at the end, arguments given as a JSON string
    for bad in ('<tool_call>{"name": "f"</tool_call>', '<tool_call>["f"]</tool_call>', "<tool_call>{}</tool_call>"):
        assert parse_tool_calls(bad) == (bad, [])  # not a call: the text stays content


def test_tools_and_results_rendered_into_the_prompt(tokenizer):
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ]
    req = ChatRequest(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "a", "content": '{"temperature": 21}'},
            {"role": "tool", "tool_call_id": "b", "content": "sunny"},
        ],
        tools=WEATHER,
    )
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call functions to answer. Their signatures, one JSON object per line, are inside <tools></tools>:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
        "</tools>\n\n"
        "To call a function, reply with its name and arguments as a JSON object inside <tool_call></tool_call>:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n"
        '<tool_response>\n{"temperature": 21}\n</tool_response>\n<tool_response>\nsunny\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert tokenizer.render_chat(to_chatml(req.messages, req.tools), add_generation_prompt=True) == expected


# ---- the OpenAI API on a chat run ---------------------------------------------------------------


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["sft"]
    h = health(server)
    assert (h["status"], h["model"], h["chat"], h["auth"], h["context"]) == ("ok", "sft", True, True, 4096)
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="input"' in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN


def test_chat_matches_engine_and_stream(client, sft):
    r = client.chat.completions.create(model="sft", messages=SUM, temperature=0)
    c = r.choices[0]
    ids = sft.tokenizer.encode_chat(SUM, add_generation_prompt=True)
    expected = greedy(sft, ids)
    assert c.message.content == expected.strip() and c.message.content and c.finish_reason == "stop"
    assert c.message.role == "assistant" and c.message.reasoning_content is None
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(sft.tokenizer.encode(expected)) + 1  # + the stop token
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model="sft", messages=SUM, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    content, reasoning, finish, chunks = stream_text(stream)
    assert content == {0: c.message.content} and reasoning == {0: ""} and finish == {0: "stop"}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len(chunks) >= 4  # role, several deltas, finish, usage
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_seed_n_and_sampling(client):
    def sample(seed, n=1, stream=False):
        return client.chat.completions.create(
            model="sft", messages=WHERE, temperature=1.5, top_p=1.0, seed=seed, n=n, max_tokens=20, stream=stream
        )

    a, b = sample(7), sample(7)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {sample(s).choices[0].message.content for s in (8, 9, 10)}
    assert others - {a.choices[0].message.content}, "other seeds should sample something else"

    two = sample(11, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens <= 40 and two.usage.prompt_tokens == a.usage.prompt_tokens
    content, _, finish, _ = stream_text(sample(11, n=2, stream=True))
    assert content == {i: c.message.content for i, c in enumerate(two.choices)}
    assert finish == {i: c.finish_reason for i, c in enumerate(two.choices)}


def test_stop_strings(client):
    full = client.chat.completions.create(model="sft", messages=SUM, temperature=0)
    text = full.choices[0].message.content
    assert "等于" in text
    for stop in ("等于", ["zzz", "等于"]):
        r = client.chat.completions.create(model="sft", messages=SUM, temperature=0, stop=stop)
        assert r.choices[0].message.content == text[: text.index("等于")].strip()
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < full.usage.completion_tokens
        content, _, finish, _ = stream_text(
            client.chat.completions.create(model="sft", messages=SUM, temperature=0, stop=stop, stream=True)
        )
        assert content == {0: r.choices[0].message.content} and finish == {0: "stop"}


def test_max_tokens(client, sft):
    full = client.chat.completions.create(model="sft", messages=WHERE, temperature=0).choices[0].message.content
    for kwargs in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        r = client.chat.completions.create(model="sft", messages=WHERE, temperature=0, **kwargs)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert full.startswith(r.choices[0].message.content) and r.choices[0].message.content != full
    r = client.chat.completions.create(
        model="sft", messages=WHERE, temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_thinking_goes_to_reasoning_content(client, sft):
    """Thinking on: the prompt opens <think>, so the reply is reasoning until the model closes it;
    the split equals our splitter on the raw text of the same prompt through /v1/completions."""
    tok = sft.tokenizer
    r = client.chat.completions.create(model="sft", messages=WHERE, temperature=0, extra_body={"enable_thinking": True})
    m = r.choices[0].message
    assert m.reasoning_content and "<think>" not in (m.reasoning_content + (m.content or ""))
    assert r.usage.prompt_tokens == len(tok.encode_chat(WHERE, add_generation_prompt=True, enable_thinking=True))
    prompt = tok.render_chat(WHERE, add_generation_prompt=True, enable_thinking=True)
    raw = client.completions.create(model="sft", prompt=prompt, temperature=0, max_tokens=200).choices[0].text
    assert split_think(raw, in_think=True) == (m.reasoning_content, m.content or "")
    kwargs = {"chat_template_kwargs": {"enable_thinking": True}}
    same = client.chat.completions.create(model="sft", messages=WHERE, temperature=0, extra_body=kwargs)
    assert same.choices[0].message.reasoning_content == m.reasoning_content
    content, reasoning, _, _ = stream_text(
        client.chat.completions.create(model="sft", messages=WHERE, temperature=0, stream=True, extra_body=kwargs)
    )
    assert reasoning == {0: m.reasoning_content} and content == {0: m.content or ""}
    off = client.chat.completions.create(
        model="sft", messages=WHERE, temperature=0, extra_body={"enable_thinking": False}
    )
    assert off.usage.prompt_tokens == len(tok.encode_chat(WHERE, add_generation_prompt=True, enable_thinking=False))


BAD = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "nope"}]}, "messages.0.tool_call_id"),
    ({"messages": WHERE, "temperature": "hot"}, "temperature"),
    ({"messages": WHERE, "temperature": 2.5}, "temperature"),
    ({"messages": WHERE, "temperature": -1}, "temperature"),
    ({"messages": WHERE, "top_p": 1.5}, "top_p"),
    ({"messages": WHERE, "n": 0}, "n"),
    ({"messages": WHERE, "n": 9}, "n"),
    ({"messages": WHERE, "max_tokens": 0}, "max_tokens"),
    ({"messages": WHERE, "stop": ["a"] * 9}, "stop"),
    ({"messages": WHERE, "tool_choice": "always"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi " * 5000}]}, "messages"),
]


def test_bad_requests_get_openai_errors(server, client):
    url = server + "/v1/chat/completions"
    for body, param in BAD:
        r = httpx.post(url, json={"model": "sft", **body}, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"], (body, err)
    r = httpx.post(url, content=b'{"messages": [', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sft", messages=[])
    assert e.value.status_code == 400 and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "hi " * 5000}])
    assert e.value.code == "context_length_exceeded" and "4096" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sft", messages=WHERE, temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=WHERE)
    assert e.value.code == "model_not_found" and "'sft'" in e.value.message

    r = httpx.get(server + "/v1/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(url, headers=AUTH).status_code == 405

    ok = client.chat.completions.create(model="sft", messages=WHERE, temperature=0, max_tokens=5)
    assert ok.choices[0].message.content and health(server)["failed"] == 0  # still serving, no 500s


def test_auth(server):
    url = server + "/v1/chat/completions"
    body = {"model": "sft", "messages": WHERE, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url, json=body, headers=AUTH).status_code == 200
    assert httpx.get(server + "/health").status_code == 200 and httpx.get(server + "/").status_code == 200


def test_32_concurrent_streams(server, client):
    """32 streams at once (4 generating, the rest queued) each give their single-request answer."""
    single = {q: client.chat.completions.create(model="sft", messages=[{"role": "user", "content": q}], temperature=0)
              for q in QUESTIONS}  # fmt: skip
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    seen_running = []

    async def one(q: str) -> str:
        stream = await aclient.chat.completions.create(
            model="sft", messages=[{"role": "user", "content": q}], temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def watch(done: asyncio.Event) -> None:
        async with httpx.AsyncClient() as h:
            while not done.is_set():
                seen_running.append((await h.get(server + "/health")).json())
                await asyncio.sleep(0.01)

    async def main() -> list[str]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        out = await asyncio.gather(*(one(q) for q in QUESTIONS * 4))
        done.set()
        await watcher
        await aclient.close()
        return out

    before = health(server)["completed"]
    texts = asyncio.run(main())
    assert texts == [single[q].choices[0].message.content for q in QUESTIONS * 4]
    assert health(server)["completed"] == before + 32
    assert seen_running and max(h["running"] for h in seen_running) <= 4  # --max-concurrency 4
    assert max(h["waiting"] for h in seen_running) > 0  # the others queued


def test_client_disconnect_stops_generation(server):
    """A client that goes away (mid-stream, or a non-streamed request timing out) cancels its job."""
    body = {"model": "sft", "messages": WHERE, "max_tokens": 4000, "ignore_eos": True}  # seconds of work
    for stream in (True, False):
        before = health(server)
        if stream:
            with httpx.stream(
                "POST", server + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
            ) as r:
                lines = r.iter_lines()
                assert [next(lines) for _ in range(6)]  # a few chunks arrive, then we hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
        deadline = time.monotonic() + 20
        while (h := health(server))["running"] or h["waiting"]:
            assert time.monotonic() < deadline, h
            time.sleep(0.05)
        assert h["cancelled"] == before["cancelled"] + 1 and h["completed"] == before["completed"], (before, h)


# ---- tool calls: a model fine-tuned (through `minimind sft`) on the server's own rendering ------


def tool_conversations() -> list[dict]:
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    think = "<think>\nI should ask the weather tool.\n</think>\n"
    chats = [
        [  # asked plainly: call at once; then answer from the tool's result
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        [  # asked to think: reasoning first, then the call
            {"role": "user", "content": "Think first: what is the weather in Paris?"},
            {"role": "assistant", "content": think, "tool_calls": [call]},
        ],
    ]
    requests = [ChatRequest(messages=m, tools=WEATHER) for m in chats]
    return [{"conversations": to_chatml(r.messages, r.tools)} for r in requests]


@pytest.fixture(scope="module")
def tool_server(pipeline, tmp_path_factory):
    from conftest import _run_cli

    root = tmp_path_factory.mktemp("tools")
    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in tool_conversations()))
    # A fresh 0.16M model learns the two replies in ~80 steps (the 0.9M SFT model needs several times more).
    _run_cli("init", "--preset", "tiny", "--tokenizer", pipeline["tokenizer"], "--out", root / "init",
             "--hidden-size", 64, "--num-layers", 2, "--seed", 0)  # fmt: skip
    _run_cli("sft", "--from", root / "init", "--data", data, "--out", root / "run", "--max-seq-len", 512,
             "--batch-size", 2, "--accumulation", 1, "--lr", 1e-2, "--min-lr-ratio", 1, "--max-steps", 80,
             "--warmup-steps", 2, "--cache-dir", root / "cache", "--seed", 0)  # fmt: skip
    with background(build(args_for(root / "run", "--model-name", "weather"))) as url:
        yield url


def test_tool_call_round_trip(tool_server):
    client = openai.OpenAI(base_url=tool_server + "/v1", api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="weather", messages=ask, tools=WEATHER, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    follow = ask + [c.message.model_dump(exclude_none=True), result]
    r2 = client.chat.completions.create(model="weather", messages=follow, tools=WEATHER, temperature=0)
    assert r2.choices[0].message.content == "It is 21 degrees in Paris." and r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls

    # reasoning and a call in one reply, streamed: reasoning deltas, then the call in one delta
    think = [{"role": "user", "content": "Think first: what is the weather in Paris?"}]
    whole = client.chat.completions.create(model="weather", messages=think, tools=WEATHER, temperature=0)
    m = whole.choices[0].message
    assert m.reasoning_content == "I should ask the weather tool." and m.content is None
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    chunks = list(
        client.chat.completions.create(model="weather", messages=think, tools=WEATHER, temperature=0, stream=True)
    )
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    assert reasoning == m.reasoning_content and [t.function.name for t in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # without tools (tool_choice "none") nothing is parsed as a call
    plain = client.chat.completions.create(
        model="weather", messages=ask, tools=WEATHER, tool_choice="none", temperature=0
    )
    assert plain.choices[0].finish_reason != "tool_calls" and plain.usage.prompt_tokens < r.usage.prompt_tokens


# ---- text runs, LoRA, flags ---------------------------------------------------------------------


def test_completions_on_a_text_run(pipeline):
    run = load_run(pipeline["pretrain"])
    tok = run.tokenizer
    with background(build(args_for(pipeline["pretrain"], "--max-tokens-cap", 16))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="pretrain", prompt="Max lives in", temperature=0, max_tokens=12)
        expected = greedy(run, [tok.bos_id] + tok.encode("Max lives in"), 12)
        assert r.object == "text_completion" and r.choices[0].text == expected and expected
        assert r.usage.prompt_tokens == 1 + len(tok.encode("Max lives in"))
        chunks = list(
            client.completions.create(
                model="pretrain", prompt="Max lives in", temperature=0, max_tokens=12, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

        both = client.completions.create(
            model="pretrain", prompt=["Max lives in", "Sam has a"], temperature=0, max_tokens=12
        )
        assert [c.text for c in both.choices] == [expected, greedy(run, [tok.bos_id] + tok.encode("Sam has a"), 12)]

        capped = client.completions.create(
            model="pretrain", prompt="Max", max_tokens=1000, extra_body={"ignore_eos": True}
        )
        assert capped.usage.completion_tokens == 16 and capped.choices[0].finish_reason == "length"  # --max-tokens-cap
        ids = [tok.bos_id] + [tok.encode(" the")[0]] * 4089  # 4090 tokens: 6 positions left in the context
        full = client.completions.create(model="pretrain", prompt=ids, max_tokens=100, extra_body={"ignore_eos": True})
        assert full.usage.prompt_tokens == 4090 and full.usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="pretrain", prompt=ids + ids[:6], max_tokens=1)
        assert e.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="pretrain", messages=WHERE)
        assert e.value.code == "chat_not_supported"


def test_lora_and_flags(pipeline, sft):
    from minimind.lora import apply_adapter

    with pytest.raises(ConfigError, match="--max-concurrency must be at least 1"):
        build(args_for(pipeline["sft"], "--max-concurrency", 0))
    lora = load_run(pipeline["sft"])
    apply_adapter(lora, pipeline["lora"])
    ask = [{"role": "user", "content": "What is your name?"}]
    expected = greedy(lora, lora.tokenizer.encode_chat(ask, add_generation_prompt=True)).strip()
    assert expected != greedy(sft, sft.tokenizer.encode_chat(ask, add_generation_prompt=True)).strip()
    with background(build(args_for(pipeline["sft"], "--lora", pipeline["lora"], "--model-name", "lumi"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["lumi"]
        r = client.chat.completions.create(model="lumi", messages=ask, temperature=0)
        assert r.choices[0].message.content == expected
