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

# The whole loop on a digital phantom: maps and targets, a small U-Net trained on three subjects,
# synthesis with it for all four (sub-04 has no T1w), metrics. About 4 minutes on 2 cores.
DEMO = $(BIN)/bids-deepanat $(DEMO_DIR)/bids $(DEMO_DIR)/derivatives
demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/bids-deepanat-phantom $(DEMO_DIR)/bids --n-subjects 4 --voxel-size 2.5 --seed 1 \
		--without-t1w 04
	$(DEMO) participant -w $(DEMO_DIR)/work --nprocs 2
	$(DEMO) group -w $(DEMO_DIR)/work --nprocs 2 --unet-depth 3 --unet-filters 8 \
		--patch-size 32 --epochs 6 --lr 5e-4 --validation-fraction 0.34 --model-name demo
	$(DEMO) participant -w $(DEMO_DIR)/work --nprocs 2 \
		--model $(DEMO_DIR)/derivatives/group/models/demo.safetensors
	$(DEMO) group --evaluate-only
	@echo "Demo outputs in $(DEMO_DIR)/derivatives (synthesized T1w in sub-*/anat, metrics in group/)"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
