# Every target builds what it needs on a fresh machine: the venv (torch 2.13.0 CPU first, so no
# other torch is pulled in), the project, and Debian's Fashion-MNIST when it is missing (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: run test bench venv data clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
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
run: venv data
	$(PY) -m simulations.launch --supernodes 100 -c run-name=default-$$(date +%Y%m%d-%H%M%S) \
	  $(foreach kv,$(RUN_CONFIG),-c $(kv))

test: venv data
	$(PY) -m pytest -q

# Speed targets live here, not in the tests; outputs are saved under results/bench/.
bench: venv data
	$(PY) -m simulations.bench_layers --out results/bench
	$(PY) -m simulations.bench_throughput --out results/bench
	$(PY) -m simulations.bench_federation --out results/bench

clean:
	rm -rf $(VENV) .pytest_cache
