# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast lint test-deps bench clean

# torch first and alone: `torch==2.13.0` installs the CPU build from a local file; any other torch
# requirement would pull several GB of CUDA wheels. constraints.txt keeps it (and friends) pinned.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/atelier run campaigns/demo.yaml

# System libraries the ncnn reference runtime (a test-only dependency) links against, and Debian's
# headless Chromium + its driver (the contact-sheet test loads the HTML page in a real browser).
test-deps:
	@if ! ldconfig -p | grep -q 'libvulkan.so.1' || ! ldconfig -p | grep -q 'libomp.so.5'; then \
		echo "installing libvulkan1 libomp5 (needed by the Real-ESRGAN reference test)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libvulkan1 libomp5 >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium chromium-driver (needed by the contact-sheet browser test)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql (the store tests start a real server on loopback)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi

test: install test-deps lint
	$(PY) -m pytest -q --durations=25

# The fast tier (~4-5 min on 2 cores): everything but the tests marked slow (whole campaigns through Prefect,
# subprocess runs, database servers, browsers).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

# The CPU benchmark set (~9 min on 2 cores): results/*.json + a markdown table each, then the combined
# table (results/summary.md); see bench/README.md.
bench: install
	$(PY) -m bench.draft_efficiency
	$(PY) -m bench.campaign_overhead
	$(PY) -m bench.upscale
	$(PY) -m bench.summary

clean:
	rm -rf .atelier
