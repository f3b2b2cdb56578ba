# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TORCH := torch==2.13.0
TORCHVISION := torchvision==0.28.0

.PHONY: setup browser demo test docs bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,serve,docs]'
	# torchvision's real model classes for the tests (not a dependency): --no-deps keeps torch 2.13.0
	$(BIN)/pip install -q --no-deps $(TORCHVISION)
	touch $(STAMP)

# Debian's Fashion-MNIST when apt-get is usable; otherwise the loader downloads and checks the files.
data:
	@if [ ! -f $(FASHION) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "apt-get could not install dataset-fashion-mnist; the loader will download it"; \
	fi

# Debian's Chromium for the viewer's browser tests (Playwright drives /usr/bin/chromium; it never
# downloads a browser); without it those tests are skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "apt-get could not install chromium; the browser tests will be skipped"; \
	fi

# The whole paper on Fashion-MNIST: trains zfnet-small, runs every analysis, writes report/index.html.
# Cached per step: rerunning (or rerunning after an interruption) redoes nothing finished. Its steps are
# sized to end within 19 minutes, so that with the set-up (about a minute) the demo ends within 20.
demo: setup
	$(BIN)/deconvnet reproduce --out report --time-budget 19

test: setup browser
	$(BIN)/python -m pytest -q

# The documentation site into site/, warnings as errors (the tests build it too: tests/test_docs.py).
docs: setup
	$(BIN)/mkdocs build --strict

# Benchmarks print ratios against a baseline run in the same process; Captum is installed only here.
bench: setup
	$(BIN)/pip install -q --no-deps captum
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs report site
