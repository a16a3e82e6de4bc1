# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (a CPU wheel on the build machines); the package itself asks for a range,
# so GPU users keep their CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
		$(PY) -m pytest -n 2 tests

demo: $(VENV)/.installed
	$(VENV)/bin/minimind demo --out runs/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check minimind tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
