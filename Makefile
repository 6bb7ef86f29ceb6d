# Two entry points that work on a fresh clone:
#   make demo   -> venv + install + `sculpt demo` on the bundled emoji world
#   make test   -> venv + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/sculpt demo $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .cache
