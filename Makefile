# ms-forecast-node — set up, run and test on a fresh machine.
#   make run    set everything up and start the DICOM node (deploy/demo.yaml: loopback, port 11112)
#   make demo   (in a second shell) send a simulated study to it and watch results arrive
#   make test   set everything up and run lint, type checks and the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := dicom3tools mricron-data dcmtk openssl orthanc orthanc-dicomweb chromium fonts-liberation

.PHONY: setup system-deps run demo test lint typecheck pytest clean

setup: $(VENV)/.installed

# torch: the project requires a range (torch>=2.4) so GPU sites get CUDA builds; here we install
# the CPU wheel first when pip can find it (a CUDA build is several GB), then the project.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" || echo "torch 2.13.0 CPU wheel not available; pip will resolve torch>=2.4"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Debian packages: dciodvfy (validator), Colin27 + atlases (anatomy), dcmtk (DICOM peers).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: install these Debian packages for full function:$$missing"; fi; \
	fi

run: setup system-deps
	$(VENV)/bin/ms-forecast-node serve --config deploy/demo.yaml

demo: setup system-deps
	$(VENV)/bin/ms-forecast-node demo --out var/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup system-deps
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
