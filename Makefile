# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install extras quickstart test test-fast test-slow bench browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The optional engines the slow tests exercise: Ray (scale-out) and ONNX export.
$(VENV)/.extras: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[test,ray,onnx]"
	touch $@

extras: $(VENV)/.extras

quickstart: install
	$(VENV)/bin/tl-app quickstart

# Headless Chromium for the browser tests (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

# What CI runs: every test, the slow ones included (kills, real sizes, BatchNorm, Ray, ONNX, load).
test: extras browser
	$(PY) -m pytest -q -m "slow or not slow" --durations=15

# Quicker loops while developing.
test-fast: install browser
	$(PY) -m pytest -q

test-slow: extras browser
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs .cache
