"""The package's layering, read from its source: stage files import only the shared stage layer, the
engine and the library; the demo reaches stages only through the command line; the import graph has
no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "minimind"
SHARED = {"minimind.stages.common", "minimind.stages.rl_common", "minimind.stages"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (late imports included; imports
    under `if TYPE_CHECKING:` left out: they never run)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in MODULES and m != name}


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: imports(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def test_no_stage_file_imports_another():
    stages = [m for m in MODULES if m.startswith("minimind.stages.") and m not in SHARED]
    assert len(stages) == 11
    for stage in stages:
        wrong = {m for m in imports(stage) if m.startswith("minimind.stages") and m not in SHARED}
        assert not wrong, f"{stage} imports {sorted(wrong)}: shared code belongs in stages/common.py or rl_common.py"
    for shared in SHARED - {"minimind.stages"}:
        assert not {m for m in imports(shared) if m.startswith("minimind.stages") and m not in SHARED}


def test_the_demo_reaches_stages_through_the_command_line_only():
    assert not {m for m in imports("minimind.demo") if m.startswith("minimind.stages")}


def test_conftest_is_one_module():
    """Imported as `conftest` everywhere: a second name (`tests.conftest`) runs its code twice."""
    assert "conftest" in sys.modules and "tests.conftest" not in sys.modules


def test_no_import_cycle():
    """Every module of the package can be read bottom-up: no two modules import each other, directly
    or around a loop, not even through a late import inside a function."""
    assert cycles() == []


def test_the_model_file_knows_no_fast_path():
    """model.py is the spec: the native decode path is the sampler's choice (generate -> fastdecode ->
    native), never reached from the model (which imports only the config and the attention masks)."""
    assert imports("minimind.model") == {"minimind.attention", "minimind.config"}
    assert "minimind.fastdecode" in imports("minimind.generate")
    assert "minimind.native" not in imports("minimind.attention")


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The check itself: two modules that import each other are reported."""
    fake = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", dict.fromkeys(fake, Path()))
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda m: fake[m])
    assert cycles() == [["a", "b"]]


def test_the_worked_example_stage_is_sft_at_smoothing_0(pipeline, tmp_path, monkeypatch):
    """docs/architecture.md's example stage, as printed there, registered as a command: at smoothing 0
    it trains exactly as `minimind sft` (same weights after 3 steps); at 0.1 it trains to others."""
    import re

    from safetensors.torch import load_file

    from minimind import cli

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    code = re.search(r"Save it as\s+`minimind/stages/smooth.py`:\s+```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "smooth_stage.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "smooth", ("smooth_stage", "SFT with label smoothing"))
    common = ["--from", pipeline["pretrain"], "--data", pipeline["files"]["sft"], "--max-steps", 3]
    common += ["--batch-size", 4, "--max-seq-len", 64, "--device", "cpu", "--seed", 0]
    weights = {}
    for name, argv in {
        "sft": ["sft", *common],
        "smooth0": ["smooth", *common, "--smoothing", 0],
        "smooth": ["smooth", *common, "--smoothing", 0.1],
    }.items():
        cli.main([str(a) for a in [*argv, "--out", tmp_path / name]])
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(weights["sft"][k], weights["smooth0"][k]) for k in weights["sft"])
    assert not all(torch.equal(weights["sft"][k], weights["smooth"][k]) for k in weights["sft"])
