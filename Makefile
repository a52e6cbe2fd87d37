# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean

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

test: install
	$(PY) -m pytest -q

clean:
	rm -rf .atelier
