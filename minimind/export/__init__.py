"""`minimind export RUN_DIR --format hf|gguf --out PATH`: take a run out of MiniMind.

- `hf`: a transformers folder (`minimind.export.hf.export_hf`) that `AutoModelForCausalLM` loads
  offline; `--from DIR` of any stage reads such a folder back (`minimind.export.hf_import.load_hf_run`).
- `gguf`: one .gguf file for llama.cpp / ollama (`minimind.export.gguf.export_gguf`), with an
  ollama Modelfile next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def add_arguments(p: Any) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or a transformers folder) to export")
    p.add_argument("--format", required=True, choices=("hf", "gguf"), help="hf: transformers folder; gguf: llama.cpp")
    p.add_argument("--out", required=True, metavar="PATH", help="hf: output folder; gguf: output .gguf file")
    p.add_argument("--dtype", default=None, help="gguf: f32|f16|q8_0 (default f16); hf: float32|bfloat16|float16")
    p.add_argument("--lora", default=None, metavar="DIR", help="merge this LoRA adapter into the weights first")


def main(args: Any) -> None:
    from minimind.inference import open_run

    run = open_run(args.run, "cpu", args.lora, merge_lora=True)
    out = Path(args.out)
    if args.format == "hf":
        from minimind.export.hf import export_hf

        export_hf(run, out, dtype=args.dtype or "float32")
    else:
        from minimind.export.gguf import export_gguf

        export_gguf(run, out, dtype=args.dtype or "f16")
