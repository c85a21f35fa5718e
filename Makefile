# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install quickstart test test-slow bench browser clean

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

quickstart: install
	$(VENV)/bin/tl-app quickstart

# Headless Chromium for the browser tests (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

test: install browser
	$(PY) -m pytest -q

test-slow: $(VENV)/.extras browser
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs .cache
