# The two commands of the README:
#   make demo   sets up .venv and trains the digits quickstart (TensorBoard logs + samples.png under runs/quickstart)
#   make test   sets up .venv and runs the whole test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: venv demo test lint bench tensorboard clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/diffusion-lab fit --config configs/quickstart.yaml
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs   (sample grid: runs/quickstart/version_*/samples.png)"

test: venv
	$(BIN)/python -m pytest -q --durations=20

lint: venv
	$(BIN)/ruff check diffusion_lab tests tools benchmarks
	$(BIN)/ruff format --check diffusion_lab tests tools benchmarks

bench: venv
	$(BIN)/python -m benchmarks all

tensorboard: venv
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf runs predictions .pytest_cache
