# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (a CPU wheel on the build machines); the package itself asks for a range,
# so GPU users keep their CUDA build.
TORCH_PIN ?= torch==2.13.0
# llama-cpp-python (the real llama.cpp, for the GGUF export test) builds from source: ~7 min once,
# then pip's wheel cache serves it.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: test demo lint clean gpu-check

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[test]"
	touch $@

# The web page test drives Debian's Chromium (no `playwright install`, no internet): installed here
# when we are root and it is missing; without it that one test skips and says why.
$(VENV)/.chromium:
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the web page test will be skipped"
	touch $@

test: $(VENV)/.installed $(VENV)/.chromium
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
		$(PY) -m pytest -n 2 tests

demo: $(VENV)/.installed
	$(VENV)/bin/minimind demo --out runs/demo

# On a CUDA machine: every training stage in bf16 without the math attention kernel, DDP on NCCL,
# tokens/s + MFU + peak memory, decode speed (benchmarks/gpu_check.py). Without CUDA it says so, exits 0.
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py --json runs/gpu_check.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check minimind tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
