# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   create .venv, install, run the survey on the bundled real sample into out/demo/
#   make test   create .venv (same one), install, run the tests
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
DEMO_IMAGE := sample_tiles/lamberton_soybean_uav/20180815_Lamberton_clipped.tif
DEMO_FIELDS := sample_tiles/lamberton_soybean_uav/lamberton_plots.geojson

.PHONY: demo test venv lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch as pinned on x86_64 (other versions download GBs or break torchvision)
	if [ "$(ARCH)" = "x86_64" ]; then \
	  $(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1; \
	else \
	  $(BIN)/python -m pip install --quiet torch==2.9.1 torchvision==0.24.1; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/agriseg run $(DEMO_IMAGE) --fields $(DEMO_FIELDS) --out out/demo --overwrite --no-progress
	@echo
	@echo "Outputs: $(CURDIR)/out/demo/"
	@echo "Open in QGIS: qgis out/demo/project.qgs  (or drag out/demo/classes.tif into QGIS)"
	@echo "Quick look:   out/demo/quicklook.png   Report: out/demo/report.html"

test: venv
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: venv
	$(BIN)/ruff check agriseg tests benchmarks
	$(BIN)/mypy

bench: venv
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf out .pytest_cache .hypothesis
