#!/usr/bin/env bash
# GPU check of the embedded engines on a lent CUDA machine without internet (one command, from the repo root):
#
#     bash scripts/device_check.sh
#
# 1. installs the wheels carried in .whl/ (deepspeed and the dependencies the machine lacks) into /tmp/site;
# 2. prints versions and nvidia-smi;
# 3. runs the `gpu` tests (tests/test_gpu.py) -> $OUT/gpu_tests.log;
# 4. times the engines on CUDA (tiny preset, and the SmolLM2-135M architecture with random weights: its real
#    weights are 517 MB and cannot travel) -> $OUT/gpu_timings.json.
#
# Worst case about 7.5 minutes (each stage has its own timeout). Exit status: that of the tests.
set -u
OUT="${OUT:-/tmp/device_check_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the rollback replay test
export DS_ACCELERATOR=cuda

echo "== wheels"
ls -l .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -n 5
export PYTHONPATH=/tmp/site:$PWD

echo "== versions"
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "nccl", torch.cuda.nccl.version())
for name in ("transformers", "tokenizers", "safetensors", "numpy", "yaml", "pydantic", "pydantic_core", "hjson",
             "msgpack", "psutil", "cpuinfo", "einops", "deepspeed"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # noqa: BLE001 - report every missing piece, then carry on
        print(name, "IMPORT FAILED:", type(exc).__name__, exc)
EOF
nvidia-smi 2>&1 | tee "$OUT/nvidia_smi.txt"

echo "== gpu tests"
timeout 240 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests exit status: $tests_rc" | tee -a "$OUT/gpu_tests.log"

echo "== timings"
timeout 180 python3 - "$OUT/gpu_timings.json" <<'EOF' 2>&1 | tee "$OUT/gpu_timings.log"
"""Step and generation timings on CUDA; every figure is a median of a few repetitions after a warm-up."""

import json
import statistics
import sys
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from npo.core.config import AlgoConfig
from npo.core.gate import build_mixed_groups
from npo.runtime.learner import TorchLearner
from npo.runtime.models import ModelConfig, load_policy
from npo.runtime.engine import SamplingParams, TransformersEngine
from npo.runtime.tasks import COMPACT_ALPHABET
from npo.core.types import Problem, Sample

PATH = sys.argv[1]
CUDA = torch.device("cuda")
ALGO = AlgoConfig(group_size=8, tau_gate=0.6, is_correction=True)
results = {
    "torch": torch.__version__,
    "device": torch.cuda.get_device_name(0),
    "note": "seconds are medians; smollm2 = SmolLM2-135M architecture with random weights (stop_on_eos=false)",
}


def save():
    with open(PATH, "w") as f:
        json.dump(results, f, indent=1)


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_section(name, fn):
    """results[name] = fn(), or the error; written to PATH at once (a timeout keeps the finished sections)."""
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - keep the other sections' figures
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    results[name + "_wall_s"] = time.perf_counter() - started
    print(name, json.dumps(results[name]), flush=True)
    save()


def generation(model, prompts, n, new_tokens, repeats=3):
    engine = TransformersEngine(model, eos_id=2, pad_id=0, batch_size=4096)
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_on_eos=False)
    seconds = timed(lambda: engine.generate(prompts, n, params, seed=0), repeats)
    rows = len(prompts) * n
    return {"rows": rows, "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": rows * new_tokens / seconds}


def npo_groups(model, prompts, n, new_tokens, seed):
    """One step's groups: sampled responses with their log-probs, random 0/1 rewards (some groups gated)."""
    engine = TransformersEngine(model, eos_id=2, pad_id=0, batch_size=4096)
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_on_eos=False)
    gens = engine.generate(prompts, n, params, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    groups = [
        [Sample(f"p{i}", g.token_ids, g.logprobs, reward=float(torch.rand(1, generator=gen) < 0.4)) for g in gs]
        for i, gs in enumerate(gens)
    ]
    guides = {f"p{i}": Sample(f"p{i}", gs[0].response_ids, gs[0].logprobs, reward=1.0) for i, gs in enumerate(groups)}
    mixed = build_mixed_groups(groups, guides, tau_gate=0.6, correct_threshold=1.0, is_correction=True)
    return mixed, {f"p{i}": p for i, p in enumerate(prompts)}


def learner_step(learner, batches, repeats):
    it = iter(range(1 << 30))

    def step():
        groups, ids = batches[next(it) % len(batches)]
        learner.train_step(groups, ids)

    return timed(step, repeats)


def learner_kwargs(micro_batch_size, dtype):
    return dict(pad_id=0, algo=ALGO, lr=1e-5, micro_batch_size=micro_batch_size, dtype=dtype, max_len=64)


# ---- tiny preset (default architecture, ~1M parameters, character vocabulary; random init: timing only)
tiny = load_policy(ModelConfig(warmup_steps=0, cache_dir="/tmp/npo-models"), seed=0, alphabet=COMPACT_ALPHABET)
tiny_prompts = [tiny.encode_prompt(Problem(f"p{i}", "", "", compact_prompt=f"{i % 10}+{i // 10 % 10}=")) for i in range(64)]


def tiny_generate():
    model = tiny.model.to(CUDA)
    return {
        "train_batch_32x8_6tok": generation(model, tiny_prompts[:32], 8, 6),
        "big_batch_64x16_32tok": generation(model, tiny_prompts, 16, 32),
    }


def tiny_learner_step():
    out = {}
    base = tiny.model.to(CUDA)
    batches = [npo_groups(base, tiny_prompts[:32], 8, 6, seed) for seed in range(3)]  # 256 rows a step
    for dtype in ("float32", "bfloat16"):
        model = LlamaForCausalLM(base.config).to(CUDA)
        model.load_state_dict(base.state_dict())
        learner = TorchLearner(model, **learner_kwargs(256, dtype))
        rng = torch.cuda.get_rng_state()  # does a training step draw from the global CUDA RNG (checkpoints)?
        out[f"torch_cuda_{dtype}"] = learner_step(learner, batches, 8)
        out[f"cuda_rng_touched_by_train_step_{dtype}"] = not torch.equal(rng, torch.cuda.get_rng_state())
    cpu_model = LlamaForCausalLM(base.config)
    cpu_model.load_state_dict({k: v.cpu() for k, v in base.state_dict().items()})
    cpu_learner = TorchLearner(cpu_model, **learner_kwargs(256, "float32"))
    out["torch_cpu_float32"] = learner_step(cpu_learner, batches, 3)
    out["cpu_threads"] = torch.get_num_threads()
    from services.learner.deepspeed_engine import DeepSpeedLearner

    for dtype in ("float32", "bfloat16"):
        model = LlamaForCausalLM(base.config).to(CUDA)
        model.load_state_dict(base.state_dict())
        learner = DeepSpeedLearner(model, **learner_kwargs(256, dtype), zero_stage=2)
        out[f"deepspeed_zero2_cuda_{dtype}"] = learner_step(learner, batches, 8)
    out["rows_per_step"] = 256
    return out


# ---- SmolLM2-135M architecture (random weights; the real ones are 517 MB and cannot travel)
SMOL = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
    rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def smol(dtype):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOL)).to(device=CUDA, dtype=dtype).eval()


gen = torch.Generator().manual_seed(0)
smol_prompts = [[1] + torch.randint(3, 49152, (31,), generator=gen).tolist() for _ in range(64)]


def smollm2_generate():
    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        model = smol(dtype)
        out[name] = {
            "batch_64x4_64tok": generation(model, smol_prompts, 4, 64, repeats=2),
            "batch_64x16_64tok": generation(model, smol_prompts, 16, 64, repeats=2),
        }
        del model
    return out


def smollm2_learner_step():
    out = {}
    base = smol(torch.float32)
    batches = [npo_groups(base, smol_prompts[:16], 4, 64, seed) for seed in range(2)]  # 64 rows x 64 tokens
    for dtype in ("float32", "bfloat16"):
        learner = TorchLearner(base, **learner_kwargs(32, dtype))
        out[f"torch_cuda_{dtype}"] = learner_step(learner, batches, 3)
        del learner
    from services.learner.deepspeed_engine import DeepSpeedLearner

    learner = DeepSpeedLearner(smol(torch.float32), **learner_kwargs(32, "bfloat16"), zero_stage=2)
    out["deepspeed_zero2_cuda_bfloat16"] = learner_step(learner, batches, 3)
    out["rows_per_step"], out["micro_batch_size"] = 64, 32
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


for section in (tiny_generate, tiny_learner_step, smollm2_generate, smollm2_learner_step):
    run_section(section.__name__, section)
print(json.dumps(results, indent=1))
EOF
echo "timings exit status: ${PIPESTATUS[0]}"
ls -l "$OUT"
exit "$tests_rc"
