# `make demo`: set up from nothing and pretrain on the built-in sample photos.
# `make test`: set up from nothing and run the test suite (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to a pair whose wheels timm imports cleanly with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	@for p in plugins/*/; do if [ -f $$p/pyproject.toml ]; then \
		$(BIN)/pip install -q --disable-pip-version-check -e $$p || exit 1; fi; done
	touch $@

demo: setup
	$(BIN)/localmim pretrain --preset demo --out runs/demo --overwrite
	$(BIN)/localmim visualize runs/demo --out runs/demo/reconstruction.png

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
