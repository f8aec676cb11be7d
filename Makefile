VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# On a GPU node: make install CONSTRAINTS= (torch's CUDA wheel, which brings NCCL and Triton).
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: install demo test lint dashboards clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,lab]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/balancerd demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Regenerate dashboards/balancerd.json after changing dashboards/generate.py or balancerd/metrics.py.
# `make test` checks it (generate.py --check) and runs `promtool test rules` through pytest
# (tests/unit/test_dashboards.py).
dashboards: install
	$(PY) dashboards/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
