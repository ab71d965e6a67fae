# Every target builds what it needs on a fresh machine: the venv (torch 2.13.0 CPU first, so no
# other torch is pulled in), the project, and Debian's Fashion-MNIST when it is missing (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Which torch to install first, and from where: the defaults pick torch 2.13.0 from pip's default
# index (on this machine a CPU wheel on disk). On a GPU-less Linux box elsewhere that index serves
# the multi-GB CUDA build; choose PyTorch's CPU index instead:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
# or another build: make venv TORCH_SPEC="torch==2.13.0+cu126" TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: run test bench venv data browser tiny-reference clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Without root (or apt-get) nothing is installed: the first run downloads the original files into
# the cache folder instead (README, "Where the data comes from").
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
	      || echo "apt-get could not install dataset-fashion-mnist: the first run downloads Fashion-MNIST"; \
	  else echo "No Debian dataset-fashion-mnist here: the first run downloads Fashion-MNIST into the cache folder"; fi; \
	fi

# The main job: the default experiment (Fashion-MNIST, CNN, 100 clients, 10 per round, five budget
# tiers, Dirichlet alpha 0.5) through `flwr run . --stream` on a private SuperLink.
# Each `make run` writes a new results/default-<time>/; extra overrides: make run RUN_CONFIG="num-rounds=5".
# An interrupted run continues with its folder's name: make run RUN_NAME=default-<time> RUN_CONFIG=resume=true
ifndef RUN_NAME
RUN_NAME := default-$(shell date +%Y%m%d-%H%M%S)
endif
run: venv data
	@echo "run $(RUN_NAME); if interrupted, continue it: make run RUN_NAME=$(RUN_NAME) RUN_CONFIG=resume=true"
	$(PY) -m simulations.launch --supernodes 100 -c run-name=$(RUN_NAME) \
	  $(foreach kv,$(RUN_CONFIG),-c $(kv))

# The report's layout test renders a page in headless Chromium (Debian's chromium): installed here
# when missing and run as root; otherwise that one test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      || echo "apt-get could not install chromium: tests/test_browser.py will be skipped"; \
	  else echo "No chromium and not root: tests/test_browser.py will be skipped"; fi; \
	fi

test: venv data browser
	$(PY) -m pytest -q

# Speed targets live here, not in the tests; outputs are saved under results/bench/.
# Every benchmark runs even when one fails; the target fails if any did.
# BENCH_BASE: another checkout (e.g. of c89f1d9) whose comparison cost is measured side by side;
# BENCH_THREADS: torch threads of the throughput runs (on a busy shared machine, 1).
BENCH_BASE ?=
BENCH_THREADS ?=
bench: venv data
	status=0; \
	$(PY) -m simulations.bench_layers --out results/bench || status=1; \
	$(PY) -m simulations.bench_throughput --out results/bench $(if $(BENCH_THREADS),--threads $(BENCH_THREADS)) || status=1; \
	$(PY) -m simulations.bench_comparison --out results/bench $(if $(BENCH_BASE),--base $(BENCH_BASE)) || status=1; \
	$(PY) -m simulations.bench_federation --out results/bench || status=1; \
	exit $$status

# The small committed reference (results/reference/tiny: four methods x 3 seeds, 5 rounds, about
# 5 CPU-minutes in process). Re-make it when a change is meant to move its numbers;
# tests/test_reference.py checks that one of its cells re-runs to the committed numbers.
tiny-reference: venv data
	rm -rf results/reference/tiny/sweep
	OMP_NUM_THREADS=1 $(PY) -m simulations.sweep tiny --runner inprocess --out results/reference/tiny/sweep
	$(PY) -m simulations.report results/reference/tiny/sweep --out results/reference/tiny --baseline rankwise
	@echo "now copy results/reference/tiny/summary.md into results/reference/tiny/README.md with the commit"

clean:
	rm -rf $(VENV) .pytest_cache
