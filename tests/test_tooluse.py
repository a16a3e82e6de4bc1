"""Tool use on the data side: every input shape of tools, calls, results and reasoning reads to one
conversation; bad pieces name FILE:LINE; the chat template, `flatten`, transformers and the server all
render it alike; the SFT loss mask; the empty-think share; the sandboxed calculator; RL prompts with
tools and `gt`; and run directories saved with an earlier template."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from minimind.data.chat import encode_conversations, render, show_mask, tokenize_conversations
from minimind.data.messages import check_messages, parse_conversation
from minimind.data.prompts import read_prompts
from minimind.errors import DataError
from minimind.serve.protocol import ChatRequest
from minimind.serve.tools import to_chatml
from minimind.tokenizer import CHAT_TEMPLATE, EARLIER_TEMPLATES, Tokenizer
from minimind.toolbox import BUILTIN, MAX_RESULT, Toolbox, ToolError, calculate, tool
from minimind.toolcalls import flatten

_EXPR = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
_CITY = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
FUNCTIONS = [
    {"name": "calculate_math", "description": "Evaluate arithmetic", "parameters": _EXPR},
    {"name": "get_current_weather", "description": "Weather of a city", "parameters": _CITY},
]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
CALLS = [
    {"name": "calculate_math", "arguments": {"expression": "17*23"}},
    {"name": "get_current_weather", "arguments": {"location": "Paris"}},
]
RESULTS = ['{"result": "391"}', '{"city": "Paris", "temperature": "10°C"}']
REASONING = "Two questions: one call each."
QUESTION, ANSWER = "What is 17*23, and the weather in Paris?", "391, and 10°C in Paris."
# The canonical rich conversation: thinking, two calls in one turn, two results, a final answer.
RICH = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "reasoning_content": REASONING, "tool_calls": CALLS},
    {"role": "tool", "content": RESULTS[0]},
    {"role": "tool", "content": RESULTS[1]},
    {"role": "assistant", "content": ANSWER},
]
EMPTY_THINK = "<think>\n\n</think>\n\n"


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def file_form(tools="list", wrapped=True, calls="list", openai=False, args="object", content="", tool_obj=False):
    """RICH as a data file may write it, in the shape the options name."""
    defs = TOOLS if wrapped else FUNCTIONS
    entries = []
    for k, c in enumerate(CALLS):
        fn = {"name": c["name"], "arguments": json.dumps(c["arguments"]) if args == "json" else c["arguments"]}
        entries.append({"id": f"call_{k}", "type": "function", "function": fn} if openai else fn)
    results = [json.loads(r) for r in RESULTS] if tool_obj else RESULTS
    return [
        {"role": "system", "content": "Be brief.", "tools": json.dumps(defs) if tools == "json" else defs},
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": content,
            "reasoning_content": REASONING,
            "tool_calls": json.dumps(entries) if calls == "json" else entries,
        },
        {"role": "tool", "content": results[0]},
        {"role": "tool", "content": results[1]},
        {"role": "assistant", "content": ANSWER},
    ]


def upstream_form():
    """Upstream's files: all five keys on every message, "" where unused, tools and calls as JSON strings."""
    blank = {"content": "", "reasoning_content": "", "tools": "", "tool_calls": ""}
    return [
        {**blank, "role": "system", "content": "Be brief.", "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {**blank, "role": "user", "content": QUESTION},
        {**blank, "role": "assistant", "reasoning_content": REASONING, "tool_calls": json.dumps(CALLS)},
        {**blank, "role": "tool", "content": RESULTS[0]},
        {**blank, "role": "tool", "content": RESULTS[1]},
        {**blank, "role": "assistant", "content": ANSWER},
    ]


VARIANTS = {
    "canonical": file_form(),
    "tools_json": file_form(tools="json"),
    "tools_unwrapped": file_form(wrapped=False),
    "tools_json_unwrapped": file_form(tools="json", wrapped=False),
    "calls_json": file_form(calls="json"),
    "calls_openai": file_form(openai=True),
    "calls_openai_json_args": file_form(openai=True, args="json"),
    "calls_json_of_json_args": file_form(calls="json", args="json"),
    "content_null": file_form(content=None),
    "tool_results_as_objects": file_form(tool_obj=True),
    "upstream_all_keys": upstream_form(),
}


# ---- 1. every input form reads to the same conversation -------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_every_input_form_parses_to_the_canonical_conversation(name):
    conv = parse_conversation(VARIANTS[name], "f.jsonl:1")
    assert conv.messages == RICH and conv.tools == TOOLS
    chatml = check_messages(VARIANTS[name], "f.jsonl:1")
    assert chatml == flatten(RICH, TOOLS)
    # Consecutive tool results are one user turn; roles still alternate.
    assert [m["role"] for m in chatml] == ["system", "user", "assistant", "user", "assistant"]
    assert chatml[3]["content"] == "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in RESULTS)


def test_every_input_form_gives_the_same_token_ids(tokenizer, tmp_path):
    f = write(tmp_path / "forms.jsonl", [{"conversations": v} for v in VARIANTS.values()])
    data = tokenize_conversations([f], tokenizer, max_seq_len=2048, cache_dir=tmp_path / "c")
    ids, trained, _ = encode_conversations(tokenizer, [flatten(RICH, TOOLS)])[0]
    assert len(data) == len(VARIANTS)
    for k, name in enumerate(VARIANTS):
        got_ids, got_trained = data.conversation(k)
        assert got_ids.tolist() == ids.tolist(), name
        assert got_trained.tolist() == trained.tolist(), name


# ---- 2. malformed pieces: FILE:LINE and the reason ------------------------------------------------

Q, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
RESULT = {"role": "tool", "content": "1"}
NOT_OBJECT = r"message 2: the arguments of tool call 1 \(f\) are not a JSON object"


def system(tools):
    return {"role": "system", "content": "s", "tools": tools}


def calling(calls):
    return {"role": "assistant", "content": "", "tool_calls": calls}


BAD = {  # name: (messages, what the error says after "FILE:LINE: ")
    "tools_not_json": ([system('[{"name": "f"'), Q, A], "message 1: 'tools' is not valid JSON"),
    "tool_without_name": ([system([{"function": {"description": "x"}}]), Q, A], "message 1: tool 1 has no function"),
    "call_without_name": ([Q, calling([{"arguments": {"x": 1}}])], "message 2: tool call 1 has no name"),
    "arguments_a_list": ([Q, calling([{"name": "f", "arguments": [1]}])], NOT_OBJECT),
    "arguments_json_of_a_list": ([Q, calling('[{"name": "f", "arguments": "[1]"}]')], NOT_OBJECT),
    "result_without_call": ([Q, RESULT, A], "message 2 is a tool result with no tool call before it"),
    "result_after_plain_reply": ([Q, A, RESULT, A], "message 3 is a tool result with no tool call before it"),
    "more_results_than_calls": (
        [Q, calling(CALLS[:1]), RESULT, RESULT, A],
        "message 4 is a tool result with more results than calls",
    ),
    "tools_on_user": ([{**Q, "tools": TOOLS}, A], "message 1: a user message cannot carry 'tools'"),
}


@pytest.mark.parametrize("name", BAD)
def test_malformed_pieces_name_file_line_and_reason(tokenizer, tmp_path, name):
    messages, reason = BAD[name]
    f = write(tmp_path / "bad.jsonl", [{"conversations": [Q, A]}, {"conversations": messages}])
    with pytest.raises(DataError, match=f"bad.jsonl:2: {reason}"):
        tokenize_conversations([f], tokenizer, 256, tmp_path / "c")


def test_skip_bad_lines_skips_and_counts_them(tokenizer, tmp_path):
    records = [{"conversations": m} for m, _ in BAD.values()]
    f = write(tmp_path / "mixed.jsonl", [{"conversations": VARIANTS["canonical"]}, *records, {"conversations": [Q, A]}])
    data = tokenize_conversations([f], tokenizer, 2048, tmp_path / "c", skip_bad_lines=True)
    assert len(data) == 2 and data.skipped.count == len(BAD)
    assert [m.split(": ")[0] for m in data.skipped] == [f"{f}:{k}" for k in range(2, 2 + len(BAD))]


# ---- 3. one rendering: template, flatten, transformers, server ------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def openai_form(messages):
    """RICH as an OpenAI client sends it: wrapped calls with ids (arguments as dicts), results naming them."""
    out, ids = [], iter(range(100))
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"id": f"call_{k}", "type": "function", "function": c} for k, c in enumerate(m["tool_calls"])]
            out.append({**m, "content": None, "tool_calls": calls})
        elif m["role"] == "tool":
            out.append({**m, "tool_call_id": f"call_{next(ids)}"})
        else:
            out.append(m)
    return out


def server_form(messages):
    """Thinking written inside an earlier reply's content, as clients that do not send reasoning_content
    back do (test_server_keeps_reasoning_content_of_earlier_turns covers those that do)."""
    out = []
    for m in openai_form(messages):
        if "reasoning_content" in m:
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{REASONING}\n</think>\n" + (m["content"] or "")
        out.append(m)
    return out


def hf_ids(result):
    return result if isinstance(result, list) else result["input_ids"]  # transformers 5 returns a BatchEncoding


CASES = {  # name: (messages, add_generation_prompt, thinking)
    "whole": (RICH, False, None),
    "after_results": (RICH[:5], True, None),
    "after_results_think": (RICH[:5], True, True),
    "after_results_no_think": (RICH[:5], True, False),
}


@pytest.mark.parametrize("case", CASES)
def test_template_flatten_transformers_and_server_render_alike(tokenizer, hf_tokenizer, case):
    messages, gen, think = CASES[case]
    ours = tokenizer.render_chat(messages, gen, think, tools=TOOLS)
    assert ours == tokenizer.render_chat(flatten(messages, TOOLS), gen, think)
    kwargs = {} if think is None else {"enable_thinking": think}
    hf = hf_tokenizer.apply_chat_template(
        openai_form(messages), tools=TOOLS, tokenize=False, add_generation_prompt=gen, **kwargs
    )
    assert hf == ours
    if think is not None:  # upstream's name for the switch
        upstream = hf_tokenizer.apply_chat_template(
            openai_form(messages), tools=TOOLS, tokenize=False, add_generation_prompt=gen, open_thinking=think
        )
        assert upstream == ours
    req = ChatRequest(messages=server_form(messages), tools=TOOLS)
    assert tokenizer.render_chat(to_chatml(req.messages, req.tools), gen, think) == ours
    ids = hf_tokenizer.apply_chat_template(openai_form(messages), tools=TOOLS, add_generation_prompt=gen, **kwargs)
    assert hf_ids(ids) == tokenizer.encode_chat(messages, gen, think, tools=TOOLS)
    # The thinking switch writes exactly what its docs say after the assistant header.
    tail = {None: "<|im_start|>assistant\n", True: "<|im_start|>assistant\n<think>\n", False: EMPTY_THINK}
    assert ours.endswith(tail[think] if gen else ANSWER + "<|im_end|>\n")


def test_server_keeps_reasoning_content_of_earlier_turns(tokenizer):
    req = ChatRequest(messages=openai_form(RICH[:5]), tools=TOOLS)
    ours = tokenizer.render_chat(RICH[:5], add_generation_prompt=True, tools=TOOLS)
    assert tokenizer.render_chat(to_chatml(req.messages, req.tools), add_generation_prompt=True) == ours


# ---- 4. the loss mask, token by token -------------------------------------------------------------


def test_loss_mask_on_a_two_call_conversation_with_thinking(tokenizer):
    chatml = check_messages(VARIANTS["canonical"], "f.jsonl:1")
    ids, trained, cut = encode_conversations(tokenizer, [chatml])[0]
    text = render(chatml)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    assert not cut and ids.tolist() == enc.ids  # the same ids as tokenizing the whole rendering
    # Expected: a token is trained iff its characters lie in an assistant body + its <|im_end|>.
    spans, at = [], 0
    for m in chatml:
        head = f"<|im_start|>{m['role']}\n"
        at = text.index(head, at) + len(head)
        end = at + len(m["content"]) + len("<|im_end|>")
        assert text[at:end] == m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((at, end))
        at = end
    expected = [any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets]
    assert trained.tolist() == expected, show_mask(tokenizer, ids, trained)
    # Written out by hand: what is learned, and what never is.
    runs = show_mask(tokenizer, ids, trained).split("[[")[1:]
    calls = "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in CALLS)
    assert [r.split("]]")[0] for r in runs] == [
        f"<think>\n{REASONING}\n</think>\n\n{calls}<|im_end|>",
        f"{ANSWER}<|im_end|>",
    ]
    untrained = tokenizer.decode([t for t, m in zip(ids.tolist(), trained.tolist()) if not m])
    for piece in [chatml[0]["content"], QUESTION, *RESULTS, "<tool_response>", "# Tools"]:
        assert piece in untrained
    assert untrained.count("<|im_start|>assistant\n") == 2 and "<tool_call>" not in untrained.split(QUESTION)[1]


# ---- 5. the empty-think share ---------------------------------------------------------------------


def plain(k):
    return [{"role": "user", "content": f"Q{k}"}, {"role": "assistant", "content": f"A{k}"}] * 2


def texts_of(data, tokenizer):
    return [tokenizer.decode(data.conversation(i)[0]) for i in range(len(data))]


def test_empty_think_goes_to_a_share_of_conversations_deterministically(tokenizer, tmp_path):
    f = write(tmp_path / "plain.jsonl", [{"conversations": plain(k)} for k in range(100)])
    runs = [tokenize_conversations([f], tokenizer, 256, tmp_path / d, empty_think=0.2) for d in "ab"]
    texts = texts_of(runs[0], tokenizer)
    blocks = [t.count(EMPTY_THINK) for t in texts]
    assert set(blocks) <= {0, 2}  # in every reply of a chosen conversation, never elsewhere
    assert 15 <= blocks.count(2) <= 25
    for t, n in zip(texts, blocks):
        assert t.count(f"<|im_start|>assistant\n{EMPTY_THINK}A") == n
    assert texts_of(runs[1], tokenizer) == texts  # the same choice again (the cache stays valid)
    none = tokenize_conversations([f], tokenizer, 256, tmp_path / "c", empty_think=0.0)
    assert not any(EMPTY_THINK in t for t in texts_of(none, tokenizer))


def test_empty_think_leaves_replies_with_reasoning_alone(tokenizer, tmp_path):
    inline = "<think>\nmine\n</think>\n\nA2"
    conv = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": inline},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"},
    ]
    f = write(tmp_path / "r.jsonl", [{"conversations": conv}] * 3)
    data = tokenize_conversations([f], tokenizer, 256, tmp_path / "c", empty_think=1.0)  # every conversation
    replies = [t.split("<|im_end|>")[0] for t in texts_of(data, tokenizer)[0].split("<|im_start|>assistant\n")[1:]]
    assert replies == ["<think>\nR1\n</think>\n\nA1", inline, EMPTY_THINK + "A3"]


# ---- 6. the sandboxed calculator ------------------------------------------------------------------

REFUSED = {  # expression: why (each must be refused before it computes anything big)
    "__import__('os')": "'__import__' is not allowed",
    "open('/etc/passwd')": "'open' is not allowed",
    "(1).__class__": "'Attribute' is not allowed",
    "[1, 2][0]": "'Subscript' is not allowed",
    "x + 1": "'x' is not allowed",
    "lambda: 1": "'Lambda' is not allowed",
    "[i for i in (1, 2)]": "'ListComp' is not allowed",
    "9**9**9": "the exponent is too large",
    "2**100000": "the exponent is too large",
    "10**64*10**64": "a value is too large",
    "1+" * 100 + "1": "longer than 200 characters",
}


def test_calculator_refuses_quickly_and_never_raises():
    start = time.perf_counter()
    for expression, why in REFUSED.items():
        with pytest.raises(ToolError, match=why):
            calculate(expression)
        out = json.loads(BUILTIN.call("calculate_math", {"expression": expression}))
        assert list(out) == ["error"] and why in out["error"], expression
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "expression, value, text",
    [("17*23", 391, "391"), ("(3+4)×2", 14, "14"), ("2^10", 1024, "1024"), ("sqrt(144)", 12, "12")],
)
def test_calculator_computes(expression, value, text):
    assert calculate(expression) == value
    assert json.loads(BUILTIN.call("calculate_math", {"expression": expression})) == {"result": text}


def test_calculator_round_with_huge_negative_digits_finishes():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from minimind.toolbox import BUILTIN\n"
        "print(BUILTIN.call('calculate_math', {'expression': 'round(1, -10**60)'}))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("round(1, -10**60) ran past 3 s")
    assert proc.returncode == 0 and "error" in json.loads(proc.stdout), proc.stderr[-500:]


@pytest.mark.parametrize(
    "name, arguments, error",
    [
        ("calculate_math", {}, "missing argument 'expression'"),
        ("calculate_math", {"expression": 5}, "argument 'expression' must be of type string"),
        ("calculate_math", {"expression": "1", "x": 1}, "unknown argument 'x'"),
        (
            "unit_converter",
            {"value": True, "from_unit": "km", "to_unit": "miles"},
            "argument 'value' must be of type number",
        ),
        ("rm_rf", {}, "unknown tool 'rm_rf'"),
    ],
)
def test_toolbox_call_reports_bad_calls(name, arguments, error):
    assert json.loads(BUILTIN.call(name, arguments)) == {"error": error}


def test_toolbox_results_are_cut_to_max_result():
    @tool("echo", "Repeat x n times", {"n": "integer"})
    def echo(n: int) -> str:
        return "x" * n

    box = Toolbox([echo])
    assert box.call("echo", {"n": 10}) == "x" * 10
    assert box.call("echo", {"n": MAX_RESULT * 3}) == "x" * MAX_RESULT


# ---- 7. RL prompts with tools and gt --------------------------------------------------------------


def test_agent_rl_prompt_with_tools_and_gt(tmp_path):
    system = {"role": "system", "content": "", "tools": json.dumps(FUNCTIONS)}
    record = {"conversations": [system, {"role": "user", "content": "What is 17 * 23?"}, A | {"content": ""}]}
    rlaif = [Q, A, {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]
    f = write(tmp_path / "p.jsonl", [{**record, "gt": ["391"], "extra": 1}, {"conversations": rlaif, "gt": 7}])
    agent, multi = read_prompts([f])
    assert agent.tools == TOOLS and agent.gt == ["391"]  # unwrapped definitions come back wrapped
    assert agent.tool_names == {"calculate_math", "get_current_weather"}
    assert [m["role"] for m in agent.messages] == ["system", "user"]
    assert agent.messages[-1]["content"] == "What is 17 * 23?"
    assert agent.messages[0]["content"].startswith("# Tools") and json.dumps(TOOLS[0]) in agent.messages[0]["content"]
    assert multi.messages == [Q, A, {"role": "user", "content": "q2"}] and multi.gt == ["7"] and multi.tools is None


@pytest.mark.parametrize("gt", [{"a": 1}, [True], [["391"]], True])
def test_bad_gt_names_file_and_line(tmp_path, gt):
    f = write(tmp_path / "p.jsonl", [{"conversations": [Q]}, {"conversations": [Q], "gt": gt}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: 'gt' must be a list of strings or numbers"):
        read_prompts([f])


# ---- 8. run directories saved with an earlier template --------------------------------------------

# Our template before tools (git show HEAD~3:minimind/tokenizer.py), as old run directories hold it.
EARLIER = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is true -%}{{ '<think>\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def test_earlier_template_in_an_old_run_loads_as_the_current_one(tokenizer, tmp_path):
    assert hashlib.sha256(EARLIER.encode()).hexdigest() in EARLIER_TEMPLATES
    for name, template in (("old", EARLIER), ("custom", EARLIER + "{{ '' }}")):
        tokenizer.save(tmp_path / name)
        config_file = tmp_path / name / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config_file.write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    old, custom = Tokenizer.load(tmp_path / "old"), Tokenizer.load(tmp_path / "custom")
    assert old.chat_template == CHAT_TEMPLATE and "# Tools" in old.render_chat(RICH, tools=TOOLS)
    assert custom.chat_template == EARLIER + "{{ '' }}"  # only the known earlier templates are replaced
    # The swap is safe: on plain conversations both templates write the same text.
    before = Tokenizer(tokenizer.backend, EARLIER)
    for think in (None, True, False):
        assert old.render_chat(plain(0), True, think) == before.render_chat(plain(0), True, think)
