"""Tools a model may call, run in a sandbox: upstream's six mock tools (deterministic tables), a safe
calculator, and a registry for your own.

Nothing a model writes is ever executed as code. A call is a name and a JSON object of arguments; the
toolbox checks the arguments against the tool's JSON schema (required keys, types), runs the tool's
Python function on them and returns the result as JSON text, cut to `MAX_RESULT` characters. A call
that cannot run (unknown tool, bad arguments, an expression the calculator refuses) returns
`{"error": "..."}`: the model sees what went wrong, training goes on.

The calculator parses arithmetic with Python's `ast` and evaluates only numbers, + - * / // % **,
unary signs, parentheses and a few math functions (sqrt, abs, round, min, max, floor, ceil, log,
exp, sin, cos, tan, pi, e): no names, attributes, subscripts or calls beyond those; the expression
is at most 200 characters and 64 nodes, exponents at most 64 in size, every intermediate value at
most 1e100 in size, so a call always finishes in microseconds. (Upstream's calculator runs `eval` on
the model's text.)

Your own tools:

    from minimind.toolbox import BUILTIN, Toolbox, tool

    @tool("lookup", "Look up a word", {"word": "string"})
    def lookup(word: str) -> dict:
        return {"meaning": MY_TABLE.get(word, "unknown")}

    box = Toolbox([*BUILTIN.tools.values(), lookup])

and `minimind chat/agent --tools my_tools.py` loads a file that defines a `TOOLS` list (or Toolbox).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.errors import ConfigError
from minimind.toolcalls import dumps

MAX_RESULT = 2048  # characters of a result handed back to the model
JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


class ToolError(Exception):
    """A call that cannot run; its message goes back to the model as {"error": ...}."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any]  # keyword arguments -> a JSON-able result

    @property
    def definition(self) -> dict[str, Any]:
        """The OpenAI function definition, as a prompt's tool list holds it."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}

    def check(self, arguments: dict[str, Any]) -> str:
        return check_arguments(self.parameters, arguments)


def check_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> str:
    """Why a call's arguments do not fit a tool's JSON schema ("" when they do): required keys, no
    unknown keys (when the schema lists its properties), JSON types, enums."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    required = schema.get("required", []) if isinstance(schema, dict) else []
    missing = [k for k in required if isinstance(k, str) and k not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    if not isinstance(props, dict):
        return ""
    for k, v in arguments.items():
        if k not in props:
            return f"unknown argument {k!r}"
        spec = props[k] if isinstance(props[k], dict) else {}
        kinds = spec.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else [t for t in kinds if isinstance(t, str)]
        if kinds and not any(_is(v, t) for t in kinds):
            return f"argument {k!r} must be of type {' or '.join(kinds)}"
        if isinstance(spec.get("enum"), list) and v not in spec["enum"]:
            return f"argument {k!r} must be one of {spec['enum']}"
    return ""


def _is(value: Any, kind: str) -> bool:
    """Whether a JSON value has a JSON-schema type (an unknown type name accepts anything)."""
    if kind == "null":
        return value is None
    want = JSON_TYPES.get(kind)
    return want is None or (isinstance(value, want) and (not isinstance(value, bool) or want is bool))


def tool(name: str, description: str, params: dict[str, str], required: Iterable[str] | None = None) -> Callable:
    """Decorator: a Python function as a Tool; `params` maps argument names to JSON types (all required
    unless `required` says which are)."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        schema = {
            "type": "object",
            "properties": {k: {"type": t} for k, t in params.items()},
            "required": list(params) if required is None else list(required),
        }
        return Tool(name, description, schema, fn)

    return wrap


class Toolbox:
    """Named tools; `call` runs one on a model's arguments and always returns text for the model."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self.tools = {t.name: t for t in tools}

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def definitions(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [self.tools[n].definition for n in (self.tools if names is None else names)]

    def check(self, name: str, arguments: dict[str, Any]) -> str:
        """Why this call cannot run ("" when it can)."""
        if name not in self.tools:
            return f"unknown tool {name!r}"
        return self.tools[name].check(arguments)

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        problem = self.check(name, arguments)
        if problem:
            return dumps({"error": problem})
        try:
            result = self.tools[name].fn(**arguments)
        except ToolError as e:
            return dumps({"error": str(e)})
        except Exception as e:  # a tool's own failure (yours too) is the model's problem, not the run's
            return dumps({"error": f"{type(e).__name__}: {e}"})
        text = result if isinstance(result, str) else dumps(result)
        return text[:MAX_RESULT]


# ---- the safe calculator ----------------------------------------------------------------------------

MAX_EXPRESSION, MAX_NODES, MAX_EXPONENT, MAX_VALUE = 200, 64, 64, 1e100
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**", "（": "(", "）": ")", "²": "**2", "³": "**3"}


def _bounded(x: Any) -> float | int:
    if isinstance(x, complex) or not isinstance(x, (int, float)):
        raise ToolError("the result is not a real number")
    if abs(x) > MAX_VALUE:
        raise ToolError("a value is too large")
    return x


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (left == 0 and right < 0)):
            raise ToolError("the exponent is too large" if abs(right) > MAX_EXPONENT else "0 to a negative power")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return _bounded(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FUNCTIONS
        and not node.keywords
        and 1 <= len(node.args) <= 2
    ):
        args = [_eval(a) for a in node.args]
        if node.func.id == "round" and len(args) == 2 and abs(args[1]) > MAX_EXPONENT:
            raise ToolError("round to at most 64 digits")  # round(1, -10**60) would compute 10**(10**60)
        return _bounded(FUNCTIONS[node.func.id](*args))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in FUNCTIONS:
        raise ToolError(f"{node.func.id}() takes one or two numbers")  # type: ignore[attr-defined]
    what = getattr(node, "id", None) or getattr(getattr(node, "func", None), "id", None) or type(node).__name__
    raise ToolError(f"{what!r} is not allowed in an expression")


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression, evaluated without `eval` (see the module's docstring).

    >>> calculate("2 ** 10 + sqrt(144)"), calculate("(3 + 4) × 2")
    (1036.0, 14)
    """
    text = expression
    for spelled, op in SPELLINGS.items():
        text = text.replace(spelled, op)
    if len(text) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError("not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError("the expression is too long")
    return _eval(tree)


def number_text(x: float | int) -> str:
    """A number as a short string: 391, 2.5, 0.3333333333."""
    return str(int(x)) if isinstance(x, int) or float(x).is_integer() else f"{x:.10g}"


# ---- upstream's mock tools, with deterministic tables --------------------------------------------

WEATHER = {
    "Beijing": ("28°C", "sunny"), "Shanghai": ("15°C", "cloudy"), "Guangzhou": ("32°C", "humid"),
    "Shenzhen": ("30°C", "sunny"), "Hangzhou": ("22°C", "overcast"), "Chengdu": ("18°C", "light rain"),
    "Tokyo": ("12°C", "sunny"), "New York": ("8°C", "cloudy"), "London": ("5°C", "light rain"),
    "Paris": ("10°C", "overcast"), "Sydney": ("25°C", "clear"),
    "北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
    "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"),
}  # fmt: skip
TIMES = {
    "Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
    "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
    "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00",
}  # fmt: skip
RATES = {
    ("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
    ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72,
}  # fmt: skip
UNITS = {
    ("km", "miles"): 0.621371, ("miles", "km"): 1.60934, ("kg", "pounds"): 2.20462, ("pounds", "kg"): 0.453592,
    ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048,
}  # fmt: skip
TRANSLATIONS = {
    ("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
    ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程",
    ("Happy birthday", "chinese"): "生日快乐", ("谢谢", "english"): "Thank you",
}  # fmt: skip


@tool("calculate_math", "Evaluate an arithmetic expression, e.g. 123+456, 2**10, sqrt(144)", {"expression": "string"})
def calculate_math(expression: str) -> dict[str, str]:
    return {"result": number_text(calculate(expression))}


def _convert(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    a, b = from_unit.lower(), to_unit.lower()
    if (a, b) == ("celsius", "fahrenheit"):
        out = value * 9 / 5 + 32
    elif (a, b) == ("fahrenheit", "celsius"):
        out = (value - 32) * 5 / 9
    elif (a, b) in UNITS:
        out = value * UNITS[(a, b)]
    else:
        raise ToolError(f"cannot convert {from_unit} to {to_unit}")
    return {"result": round(out, 4)}


unit_converter = tool(
    "unit_converter",
    "Convert a value between units: km/miles, kg/pounds, meters/feet, celsius/fahrenheit",
    {"value": "number", "from_unit": "string", "to_unit": "string"},
)(_convert)


@tool("get_current_weather", "The current weather of a city", {"location": "string"})
def get_current_weather(location: str) -> dict[str, str]:
    temperature, condition = WEATHER.get(location, ("22°C", "sunny"))
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


@tool("get_current_time", "The current date and time in a timezone", {"timezone": "string"}, required=[])
def get_current_time(timezone: str = "Asia/Shanghai") -> dict[str, str]:
    if timezone not in TIMES:
        raise ToolError(f"unknown timezone {timezone!r}")
    return {"datetime": TIMES[timezone], "timezone": timezone}


@tool(
    "get_exchange_rate",
    "The exchange rate between two currencies",
    {"from_currency": "string", "to_currency": "string"},
)
def get_exchange_rate(from_currency: str, to_currency: str) -> dict[str, Any]:
    pair = (from_currency.upper(), to_currency.upper())
    if pair not in RATES:
        raise ToolError(f"no rate for {pair[0]} to {pair[1]}")
    return {"from": pair[0], "to": pair[1], "rate": RATES[pair]}


@tool("translate_text", "Translate text into a target language", {"text": "string", "target_language": "string"})
def translate_text(text: str, target_language: str) -> dict[str, str]:
    return {"translated_text": TRANSLATIONS.get((text, target_language.lower()), text)}


BUILTIN = Toolbox(
    [calculate_math, unit_converter, get_current_weather, get_current_time, get_exchange_rate, translate_text]
)


def load_toolbox(spec: str, base: Toolbox = BUILTIN) -> Toolbox:
    """Tools from `--tools SPEC`, comma-separated: `builtin` (all built-in tools), a built-in tool's
    name, a .json file of function definitions (each run by the built-in tool of its name), or a .py
    file defining `TOOLS` (a list of Tool or a Toolbox; your own code, imported as a module)."""
    tools: dict[str, Tool] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "builtin":
            tools.update(base.tools)
        elif item in base:
            tools[item] = base.tools[item]
        elif item.endswith(".json"):
            tools.update(_json_tools(Path(item), base))
        elif item.endswith(".py"):
            tools.update(_python_tools(Path(item)))
        else:
            raise ConfigError(
                f"--tools: {item!r} is not builtin, a built-in tool ({', '.join(base.tools)}), .json or .py"
            )
    if not tools:
        raise ConfigError("--tools: no tools given")
    return Toolbox(tools.values())


def _json_tools(path: Path, base: Toolbox) -> dict[str, Tool]:
    try:
        defs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--tools {path}: {e}") from None
    out = {}
    for k, d in enumerate(defs if isinstance(defs, list) else [defs], start=1):
        fn = d.get("function", d) if isinstance(d, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in base:
            raise ConfigError(f"--tools {path}: tool {k} ({name!r}) has no built-in implementation")
        t = base.tools[name]
        out[name] = Tool(name, fn.get("description", t.description), fn.get("parameters", t.parameters), t.fn)
    return out


def _python_tools(path: Path) -> dict[str, Tool]:
    if not path.is_file():
        raise ConfigError(f"--tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"minimind_user_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    tools = getattr(module, "TOOLS", None)
    tools = list(tools.tools.values()) if isinstance(tools, Toolbox) else tools
    if not isinstance(tools, list) or not all(isinstance(t, Tool) for t in tools):
        raise ConfigError(f"--tools {path}: define TOOLS, a list of minimind.toolbox.Tool (see @tool)")
    return {t.name: t for t in tools}
