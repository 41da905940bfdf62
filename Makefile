# make demo  - fresh venv, install, inspect, augment --render, a short DKS training run on CIFAR-10, strip
# make test     - fresh venv, install, the fast tier of the test suite (every module's fast tests, minutes)
# make test-all - the whole suite: also the slow models, the kill -9 trials and the GPU check's dry run (CI)
# make reproduce-cpu - baseline/DS/DKS/equal-compute grid where the networks fit (docs/results/cpu_cifar10_fit,
#                     31 min on 2 cores with AVX-512, 122 min on a slower 2-core CPU without)
# make reproduce-cpu-underfit - the earlier 75-minute grid in the underfitting regime (docs/results/cpu_cifar10)
# make reproduce-family - baseline, DS, DKS, BYOT, DHM, SDN at the reproduce-cpu budget (docs/results/cpu_cifar10_family;
#                        its baseline/DS/DKS runs are reproduce-cpu's committed records)
# make wheels     - dksgraph's dependencies besides PyTorch as wheels in wheels/, for an offline GPU server's
#                   Python (PY_VERSION=3.12 by default; PY_VERSION="3.11 3.12" for several)
# make gpu-data   - the CIFAR-10 tarball copied to data/, where the GPU check looks (wheels/ and data/ travel)
# make gpu-check  - on a machine with one CUDA GPU: cuda tests, throughput, evidence run, at most 9 minutes
#                   (tools/gpu_check.sh; options through ARGS, e.g. make gpu-check ARGS=--dry-run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The PyTorch build to install first; any torch>=2.3 / torchvision>=0.18 pair works.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

CIFAR  ?= ../shared/data/cifar10-jpeg.tar.gz
# The GPU server's Python version(s), for make wheels
PY_VERSION ?= 3.12

.PHONY: install demo test test-all bench reproduce-cpu reproduce-cpu-underfit reproduce-family wheels gpu-data gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: install
	mkdir -p demo
	cd demo && ../tools/demo.sh

test: install
	$(BIN)/python -m pytest -q -m "not slow and not faults"

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python tools/bench_augment.py

data/cifar10: $(CIFAR)
	mkdir -p $@.tmp && tar xzf $(CIFAR) -C $@.tmp && mv $@.tmp $@

reproduce-cpu: install data/cifar10
	$(BIN)/python tools/reproduce.py specs/grids/cpu_cifar10_fit.yaml --jobs 2 --report-dir docs/results/cpu_cifar10_fit

reproduce-family: install data/cifar10
	$(BIN)/python tools/reproduce.py specs/grids/cpu_cifar10_family.yaml --jobs 2 --report-dir docs/results/cpu_cifar10_family

reproduce-cpu-underfit: install data/cifar10
	$(BIN)/python tools/reproduce.py specs/grids/cpu_cifar10.yaml --report-dir docs/results/cpu_cifar10

wheels:
	$(PYTHON) tools/wheels.py --dest wheels --python $(PY_VERSION)

gpu-data: data/cifar10-jpeg.tar.gz

data/cifar10-jpeg.tar.gz: $(CIFAR)
	mkdir -p data && cp $(CIFAR) $@

gpu-check:
	bash tools/gpu_check.sh $(ARGS)

clean:
	rm -rf demo .pytest_cache build *.egg-info
