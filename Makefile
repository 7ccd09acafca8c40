# `make demo` and `make test` set themselves up on a fresh machine: a .venv with Relay
# and its CPU extras, Debian's redis-server and bubblewrap, and for the tests Debian's chromium, prometheus,
# openssh-server and rsync.
# Re-running is quick once set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := configs/demo.yaml

.PHONY: setup demo test gpu-check lint format clean

setup: $(INSTALLED)
	@deploy/setup/ensure_command.sh redis-server redis-server "Relay's embedded buffer"
	@deploy/setup/ensure_command.sh bwrap bubblewrap "the code task's sandbox"

# Reinstall when the dependencies change. vLLM's CPU build drags in PyPI's torchvision,
# torchaudio and torchcodec, which do not match its CPU torch and break `transformers`.
$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

# Build and warm-start the tiny model once, then asynchronous RL on it; `relay run`
# reports held-out accuracy before (the warm start) and after (the RL policy).
demo: setup
	$(BIN)/relay model init -c $(DEMO)
	test -f models/tiny-warm/config.json || $(BIN)/relay warmstart -c $(DEMO)
	rm -rf runs/demo
	$(BIN)/relay run -c $(DEMO) model.path=models/tiny-warm

test: setup
	@deploy/setup/ensure_command.sh chromium chromium "the dashboard's browser test"
	@deploy/setup/ensure_command.sh prometheus prometheus "the docker-compose test"
	@deploy/setup/ensure_command.sh sshd openssh-server "the ray up test" ssh
	@deploy/setup/ensure_command.sh rsync rsync "the ray up test"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The GPU smoke suite (tests/gpu): vLLM on CUDA, the learner in bf16, a short run. On a
# machine with CUDA, in a venv of its own with the regular (CUDA) vLLM; within 10 minutes.
GPU_VENV := .venv-gpu
gpu-check:
	@$(PYTHON) -c "import shutil, sys; sys.exit(shutil.which('nvidia-smi') is None)" || { echo "gpu-check needs a machine with an NVIDIA GPU (nvidia-smi not found)" >&2; exit 1; }
	@test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet -e ".[gpu,dev]"
	@deploy/setup/ensure_command.sh redis-server redis-server "Relay's embedded buffer"
	timeout 600 $(GPU_VENV)/bin/python -m pytest tests/gpu -m gpu -x -v

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs models .pytest_cache
