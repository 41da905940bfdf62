# make demo  - fresh venv, install, inspect, augment --render, a short DKS training run on CIFAR-10, strip
# make test  - fresh venv, install, the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The PyTorch build to install first; any torch>=2.2 / torchvision>=0.17 pair works.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

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
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python tools/bench_augment.py

clean:
	rm -rf demo .pytest_cache build *.egg-info
