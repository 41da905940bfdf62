# make demo  - fresh venv, install, inspect + augment --render + strip on the paper's specs
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
	cd demo && ../$(BIN)/dksgraph inspect zoo:resnet32
	cd demo && ../$(BIN)/dksgraph augment ../specs/densenet100.yaml --render
	cd demo && ../$(BIN)/dksgraph augment ../specs/resnet18.yaml --render --save resnet18-init.pt
	cd demo && ../$(BIN)/dksgraph strip resnet18-init.pt -o resnet18.pt
	cd demo && ../$(BIN)/python -c "import torch, torchvision; m = torchvision.models.resnet18(); \
		m.load_state_dict(torch.load('resnet18.pt', weights_only=True)); \
		print('resnet18.pt loads into a stock torchvision.models.resnet18()')"
	@echo "demo outputs are in demo/: *.augmented.svg pictures, resnet18-init.pt, resnet18.pt"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python tools/bench_augment.py

clean:
	rm -rf demo .pytest_cache build *.egg-info
