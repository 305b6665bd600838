# `make demo` and `make test` each set up what they need (virtualenv, packages, offline corpora)
# and then run. Everything is cached: a second run only does the work.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# pytest processes for `make test` (CI has 2 cores); each file stays in one process, so a file's
# tests run in order and module fixtures are built once. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | md5sum | cut -c1-12)
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup corpora demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"' \
		|| { echo "error: Python 3.11 or newer is needed (found $(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "error: cannot create a virtualenv; on Debian: apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,torch]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

corpora: setup
	$(PY) -m lm.data.corpora prepare austen kjv brown

demo: corpora
	$(PY) -m experiments.demo

test: corpora
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf runs .pytest_cache
