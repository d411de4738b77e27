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

.PHONY: install browser demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,pretrained]"
	@# compile the CPU decode kernels ahead (~20 s), so no process meets numba's compiler
	$(PY) -m qkv.kernels.build
	touch $@

demo: install
	$(VENV)/bin/qkv demo

# Headless Chromium and its driver (Debian packages) for tests/test_viz_browser.py; `make demo`
# needs neither. CI runs as root with no stdin; elsewhere sudo is used when there is one.
# QKV_SKIP_BROWSER=1 skips the install (and the browser test).
browser:
	@[ "$$QKV_SKIP_BROWSER" = 1 ] || { test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "make browser: installing chromium needs root; run 'apt-get install chromium chromium-driver'" \
	         "as root, or set QKV_SKIP_BROWSER=1 to skip the browser test" >&2; exit 1; fi; \
	  echo "installing chromium and chromium-driver (apt-get)"; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: install browser
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

bench: install
	$(VENV)/bin/qkv bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
