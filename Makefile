# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: venv test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build that this project's machines carry; any other spec pulls a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/ruff check bids_deepanat tests benchmarks
	$(BIN)/python -m pytest

demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/bids-deepanat-phantom $(DEMO_DIR)/bids --n-subjects 2 --seed 1
	$(BIN)/bids-deepanat $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives participant --save-maps \
		-w $(DEMO_DIR)/work --nprocs 2
	@echo "Demo outputs in $(DEMO_DIR)/derivatives"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
