# `make demo`: set up from nothing and pretrain on the built-in sample photos.
# `make test`: set up from nothing and run the test suite (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to a pair whose wheels timm imports cleanly with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test faults lock clean

setup: $(VENV)/.installed

# constraints.txt pins every dependency to the versions the suite passed on (`make lock` refreshes it).
PIP    = $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[test]"
	@for p in plugins/*/; do if [ -f $$p/pyproject.toml ]; then \
		$(PIP) -e $$p || exit 1; fi; done
	touch $@

demo: setup
	$(BIN)/localmim pretrain --preset demo --out runs/demo --overwrite
	$(BIN)/localmim visualize runs/demo --out runs/demo/reconstruction.png

# The tests mostly run one single-threaded process at a time: two pytest workers use both cores
# of a small machine (files stay whole on one worker, so module fixtures are built once).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Kill a tiny pretrain with SIGKILL at random moments, resume, compare bitwise (about a minute).
faults: setup
	LOCALMIM_FAULT_INJECTION=1 $(BIN)/python -m pytest -q -s tests/test_fault_injection.py

# Newest versions pyproject.toml allows, in a scratch venv, frozen into constraints.txt.
# Run `make test` afterwards: commit the new constraints only if the suite passes on them.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check $(TORCH)
	.venv-lock/bin/pip install -q --disable-pip-version-check -e ".[test]"
	@for p in plugins/*/; do .venv-lock/bin/pip install -q --disable-pip-version-check -e $$p || exit 1; done
	( echo "# Versions the test suite passed on; \`make setup\` installs with these as constraints."; \
	  echo "# Refresh with \`make lock\` (see README, Development)."; \
	  .venv-lock/bin/pip freeze --exclude-editable ) > constraints.txt
	rm -rf .venv-lock .venv/.installed

clean:
	rm -rf $(VENV) runs .pytest_cache
