"""`minimind chat`: talk to a run, one answer (`--prompt`) or a multi-turn session on stdin.

A chat-trained run (any stage after pretraining) gets the chat template with the conversation so
far; a pretrained-only run (stage `init` or `pretrain`) has never seen the template, so each line
is simply continued as text, `<|im_start|>` + text (upstream's "model_mode 0"). Answers stream
through the shared engine (`minimind.generate`). `<think>…</think>` reasoning is split from the
answer on the decoded text (so a tag spread over several tokens works too) and shown dim on a
terminal, as `[think] … [/think]` elsewhere, or not at all with `--no-think`.

`--tools SPEC` offers tools (the built-in sandboxed ones, a tools.json, your own .py; see
minimind/toolbox.py): their definitions go into the system message, each `<tool_call>` the model
writes is shown, run in the sandbox (never `eval` of model text) and its result shown and handed
back, and the model continues, up to `--max-turns` replies per message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from minimind.chatformat import THINK_OPEN, ThinkFilter, split_think
from minimind.errors import ConfigError
from minimind.generate import GenerateOutput, SamplingParams, generate
from minimind.inference import add_sampling_arguments, open_run, rope_overrides, sampling_params
from minimind.model import MiniMind
from minimind.rl.episodes import run_tools
from minimind.tokenizer import StreamDecoder, Tokenizer
from minimind.toolbox import Toolbox, load_toolbox
from minimind.toolcalls import dumps, find_calls, flatten, tool_turn


class Display:
    """Prints filtered pieces as they stream: reasoning dim (terminal) or in `[think] … [/think]`.

    Whitespace at the start and end of each part is dropped (the model writes `<think>\\n…\\n</think>\\n`),
    by holding trailing whitespace back until more text follows in the same part.
    """

    def __init__(self, out: TextIO, tty: bool, show_think: bool = True):
        self.out, self.show_think = out, show_think
        self.open, self.close = ("\033[2m", "\033[0m\n") if tty else ("[think] ", " [/think]\n")
        self.kind: str | None = None
        self.started, self.pending = False, ""

    def write(self, kind: str, text: str) -> None:
        if kind == "think" and not self.show_think:
            return
        if kind != self.kind:
            self._close()
            self.kind, self.started, self.pending = kind, False, ""
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
            if kind == "think":
                self.out.write(self.open)
        body = text.rstrip()
        if body:
            self.out.write(self.pending + body)
            self.pending = text[len(body) :]
        else:
            self.pending += text
        self.out.flush()

    def note(self, text: str) -> None:
        """A line about what happened beside the model's text (a tool call and its result)."""
        self.out.write((f"\033[36m{text}\033[0m" if self.open.startswith("\033") else f"[tool] {text}") + "\n")
        self.out.flush()

    def _close(self) -> None:
        if self.kind == "think" and self.started:
            self.out.write(self.close)

    def end(self) -> None:
        """Close the answer with a newline (or a reasoning part left open by a length cut)."""
        self._close()
        if self.kind == "answer" and self.started:
            self.out.write("\n")
        self.out.flush()
        self.kind, self.started, self.pending = None, False, ""


class Session:
    """The conversation so far and how it becomes prompt ids (no model: unit-testable)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat: bool = True,
        system: str | None = None,
        max_turns: int | None = None,
        budget: int | None = None,
        enable_thinking: bool | None = None,
    ):
        if max_turns is not None and max_turns < 0:
            raise ConfigError("--history must be >= 0")
        self.tokenizer, self.chat, self.system = tokenizer, chat, system
        self.max_turns, self.budget, self.enable_thinking = max_turns, budget, enable_thinking
        self.history: list[tuple[str, str | list[dict]]] = []  # (user, reply, or the messages after the user turn)
        self.tools: list[dict] | None = None  # definitions offered in the system message (--tools)

    def prompt(self, user: str, pending: list[dict] | None = None) -> tuple[list[int], int]:
        """(prompt ids, exchanges of history they include).

        Keeps the last `max_turns` exchanges, then drops the oldest until the prompt fits `budget`
        (max positions minus the tokens to generate). Text mode ignores history: it continues the line.
        `pending`: the messages of this exchange so far (replies that called tools, their results).
        """
        tok = self.tokenizer
        if not self.chat:
            ids, turns = [tok.bos_id] + tok.encode(user), []
        else:
            turns = self.history[len(self.history) - self.max_turns :] if self.max_turns is not None else self.history
            while True:
                messages = [{"role": "system", "content": self.system}] if self.system else []
                for u, a in turns:
                    messages.append({"role": "user", "content": u})
                    messages += a if isinstance(a, list) else [{"role": "assistant", "content": a}]
                messages += [{"role": "user", "content": user}, *(pending or [])]
                messages = flatten(messages, self.tools)  # as SFT, serve and the agent write tools
                ids = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=self.enable_thinking)
                if self.budget is None or len(ids) <= self.budget or not turns:
                    break
                turns = turns[1:]
        if self.budget is not None and len(ids) > self.budget:
            raise ConfigError(
                f"the prompt needs {len(ids)} tokens but only {max(self.budget, 0)} fit in the model's context "
                "beside --max-new-tokens; shorten the message or lower --max-new-tokens"
            )
        return ids, len(turns)

    def add(self, user: str, reply: str, pending: list[dict] | None = None) -> None:
        """Remember an exchange (text mode keeps none). Without thinking, the reasoning is not kept."""
        if not self.chat:
            return
        reply = self.stored(reply)
        self.history.append((user, [*pending, {"role": "assistant", "content": reply}] if pending else reply))
        if self.max_turns is not None:
            self.history = self.history[len(self.history) - self.max_turns :] if self.max_turns else []

    def stored(self, reply: str) -> str:
        """A reply as the history keeps it: without its reasoning when thinking is off, whole when on."""
        if self.enable_thinking is False:
            return split_think(reply)[1]
        return THINK_OPEN + "\n" + reply if self.enable_thinking else reply  # the prompt opened the block

    def reset(self) -> None:
        self.history = []


def reply(
    model: MiniMind,
    session: Session,
    user: str,
    params: SamplingParams,
    display: Display,
    toolbox: Toolbox | None = None,
    max_turns: int = 3,
) -> tuple[str, GenerateOutput]:
    """Generate, stream and remember one answer; returns (decoded reply without the stop token, output).
    With a toolbox, a reply that calls tools is followed by their results and another reply."""
    tok = session.tokenizer
    pending: list[dict] = []
    for turn in range(max_turns if toolbox else 1):
        ids, _ = session.prompt(user, pending)
        decoder, splitter = StreamDecoder(tok), ThinkFilter(in_think=bool(session.enable_thinking))

        def on_token(_row: int, token: int, decoder: StreamDecoder = decoder, splitter: ThinkFilter = splitter) -> None:
            if token not in params.stop_ids:
                for kind, text in splitter.push(decoder.push(token)):
                    display.write(kind, text)

        out = generate(model, [ids], params, on_token=on_token)
        for kind, text in splitter.push(decoder.flush()) + splitter.flush():
            display.write(kind, text)
        display.end()
        g = out.generations[0]
        text = tok.decode(g.tokens[:-1] if g.finish_reason == "stop" else g.tokens)
        calls = find_calls(text) if toolbox and g.finish_reason == "stop" and turn < max_turns - 1 else []
        if not calls:
            break
        results = run_tools(toolbox, calls)  # type: ignore[arg-type]
        for c, r in zip(calls, results):
            display.note(
                f"{c.name}({dumps(c.arguments)}) -> {r}" if not c.error else f"malformed call: {c.error} -> {r}"
            )
        pending += [
            {"role": "assistant", "content": session.stored(text)},
            {"role": "user", "content": tool_turn(results)},
        ]
    session.add(user, text, pending)
    return text, out


def read_lines(stdin: TextIO) -> Iterator[str]:
    """User lines: with a `> ` prompt and line editing on a terminal, plain lines from a pipe."""
    if stdin.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:
                print()
                return
    else:
        for line in stdin:
            yield line.rstrip("\r\n")


# ---- CLI: minimind chat RUN_DIR [--prompt TEXT] [...] -------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", help="answer this one message and exit (otherwise: chat on stdin)")
    p.add_argument("--system", help="a system message at the start of the conversation")
    p.add_argument("--lora", metavar="DIR", help="apply this LoRA adapter (from `minimind lora`) at load")
    p.add_argument(
        "--history", type=int, default=None, metavar="N", help="keep only the last N exchanges (default: all that fit)"
    )
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_const", const=True, help="open a <think> block")
    think.add_argument(
        "--no-think", dest="think", action="store_const", const=False, help="answer directly; hide any reasoning"
    )
    p.add_argument("--verbose", action="store_true", help="print token counts and speed to stderr after each answer")
    p.add_argument("--tools", metavar="SPEC", help="offer tools and run their calls in the sandbox: builtin, "
                   "tool names, tools.json, my_tools.py (comma-separated)")  # fmt: skip
    p.add_argument("--max-turns", type=int, default=3, help="with --tools: replies per message (each may call tools)")
    add_sampling_arguments(p)


def main(args: Any) -> None:
    from minimind.checkpoint import load_config

    run = open_run(args.run_dir, args.device, args.lora, **rope_overrides(args, load_config(args.run_dir)))
    tok = run.tokenizer
    params = sampling_params(args, tok.stop_ids)
    params.validate()
    chat = run.is_chat
    session = Session(
        tok,
        chat=chat,
        system=args.system,
        max_turns=args.history,
        budget=run.cfg.max_position_embeddings - params.max_new_tokens,
        enable_thinking=args.think,
    )
    toolbox = load_toolbox(args.tools) if args.tools else None
    if toolbox is not None:
        session.tools = toolbox.definitions()
    tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    display = Display(sys.stdout, tty, show_think=args.think is not False)

    def turn(text: str) -> None:
        _, out = reply(run.model, session, text, params, display, toolbox, args.max_turns)
        if args.verbose:
            print(
                f"[prompt {out.prompt_tokens} tokens, {out.new_tokens} tokens, {out.decode_tokens_per_s:.1f} tok/s]",
                file=sys.stderr,
                flush=True,
            )

    if args.prompt is not None:
        turn(args.prompt)
        return
    if not chat:
        print(f"({run.info.get('stage')} run: no chat template, each line is continued as text)", file=sys.stderr)
    elif sys.stdin.isatty():
        print("(/reset clears the conversation, /exit leaves)", file=sys.stderr)
    for line in read_lines(sys.stdin):
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        try:
            turn(line)
        except ConfigError as e:  # e.g. a message too long for the context: say so, keep chatting
            print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
